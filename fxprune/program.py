"""``fxprune.compile`` and the :class:`Program` it returns."""
from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from .errors import FxPruneError, UnsupportedInputError, VerificationError
from .ir import Group


def _normalize_inputs(model: torch.nn.Module, example_inputs: Any) -> tuple:
    """A tensor, a tuple/list of positional inputs, or a dict of keyword inputs -> a tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 0:
            raise UnsupportedInputError("example_inputs is empty: pass the tensors the model's forward takes")
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping):
        sig = inspect.signature(model.forward)
        try:
            bound = sig.bind(**example_inputs)
        except TypeError as exc:
            raise UnsupportedInputError(f"example_inputs do not match {type(model).__name__}.forward{sig}: {exc}")
        bound.apply_defaults()
        return tuple(bound.arguments.values())
    raise UnsupportedInputError(
        f"example_inputs must be a tensor, a tuple/list of inputs or a dict of keyword inputs, "
        f"not {type(example_inputs).__name__}")


def compile(model: torch.nn.Module, example_inputs: Any, *, mode: str = "prune",
            leaf_modules: Iterable[Union[type, str]] = (), concrete_args: Optional[Dict[str, Any]] = None,
            tracer: Optional[torch.fx.Tracer] = None, allow_inexact: bool = False,
            pipeline=None) -> "Program":
    """Trace ``model`` and find its zero-invariant groups.

    Args:
        model: any ``nn.Module`` torch.fx can trace (or a ``torch.fx.GraphModule``).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs;
            used for shape propagation and to verify the slim model.
        mode: ``"prune"`` (channel groups).
        leaf_modules: module classes or qualified names kept opaque by the tracer.
        concrete_args: arguments fixed at trace time (``torch.fx.Tracer.trace``).
        tracer: a ``torch.fx.Tracer`` of your own.
        allow_inexact: let groups that are not zero-invariant (e.g. normalised by a LayerNorm)
            be pruned; their slim model then differs from the full one.
        pipeline: a :class:`fxprune.passes.Pipeline` to run instead of the default.

    Returns:
        A :class:`Program` whose ``module`` shares parameters with ``model``.

    Raises:
        fxprune.TraceError: symbolic tracing failed (names module, source line and fixes).
        fxprune.UnsupportedInputError: bad ``example_inputs`` or options.
    """
    from fxprune.passes import Pipeline, trace

    if mode not in ("prune",):
        raise UnsupportedInputError(f"mode must be 'prune', not {mode!r}")
    if not isinstance(model, torch.nn.Module):
        raise UnsupportedInputError(f"model must be a torch.nn.Module, not {type(model).__name__}")
    inputs = _normalize_inputs(model, example_inputs)
    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args, tracer=tracer)
    if concrete_args:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(inputs) > len(placeholders):
            names = list(inspect.signature(model.forward).parameters)
            inputs = tuple(x for name, x in zip(names, inputs) if name not in concrete_args)
    pipe = pipeline if pipeline is not None else Pipeline.default(inputs, allow_inexact=allow_inexact)
    gm = pipe.run(gm)
    return Program(gm, inputs, pipe, model=model, trace_options=dict(
        leaf_modules=tuple(leaf_modules), concrete_args=concrete_args, tracer=tracer))


class Program:
    """A traced model and its analyses.

    Attributes:
        module: the traced ``torch.fx.GraphModule``; shares parameters with the user's model,
            so training either trains both.
        groups: list of :class:`fxprune.Group`, in order of first appearance.
        example_inputs: the normalised example inputs (a tuple).
        pipeline: the passes that produced the analyses.
    """

    def __init__(self, module: torch.fx.GraphModule, example_inputs: tuple, pipeline, *, model=None,
                 trace_options=None):
        self.module = module
        self.example_inputs = example_inputs
        self.pipeline = pipeline
        self._model = model
        self._trace_options = trace_options or {}

    # ------------------------------------------------------------------ groups
    @property
    def analysis(self):
        return self.module.meta["fxprune"]

    @property
    def groups(self) -> List[Group]:
        return self.analysis.groups

    @property
    def prunable_groups(self) -> List[Group]:
        return [g for g in self.groups if g.prunable]

    @property
    def passes(self) -> List[str]:
        return ["trace"] + self.pipeline.names()

    def group(self, gid: int) -> Group:
        return self.groups[gid]

    def _tensor(self, name: str) -> torch.Tensor:
        path, _, attr = name.rpartition(".")
        return getattr(self.module.get_submodule(path) if path else self.module, attr)

    @torch.no_grad()
    def zero_(self, masks: Mapping[int, Any]) -> None:
        """Zero chosen channels: ``masks[group_id]`` is a bool keep-mask of length ``size``
        (False = zero that channel in every producer slice of the group)."""
        for gid, keep in masks.items():
            g = self.groups[gid]
            keep = torch.as_tensor(np.asarray(keep, dtype=bool))
            if keep.shape != (g.size,):
                raise UnsupportedInputError(f"mask for group {gid} has shape {tuple(keep.shape)}, expected ({g.size},)")
            for s in g.slices:
                drop = s.index[~keep[s.channel]]
                if len(drop):
                    t = self._tensor(s.param)
                    t.index_fill_(s.dim, drop.to(t.device), 0)

    @torch.no_grad()
    def zero_channels(self) -> Dict[int, np.ndarray]:
        """For each prunable group, a bool array: True where the channel is zero in every
        producer slice (these are the channels ``construct_subnet`` removes)."""
        out = {}
        for g in self.prunable_groups:
            nonzero = torch.zeros(g.size, dtype=torch.bool)
            for s in g.slices:
                t = self._tensor(s.param).detach()
                per_pos = t.index_select(s.dim, s.index.to(t.device)).movedim(s.dim, 0).reshape(len(s.index), -1)
                nz = (per_pos != 0).any(dim=1).cpu()
                nonzero.index_put_((s.channel,), nz, accumulate=True)
            out[g.id] = ~nonzero.numpy()
        return out

    def construct_subnet(self, verify: bool = True, rtol: float = 1e-4) -> torch.fx.GraphModule:
        """Build the slim model: every channel zero in all its group's producer slices is removed.

        Returns a new ``torch.fx.GraphModule`` with regenerated code; the program and the
        user's model are left untouched. With ``verify`` (default) the slim model's outputs
        on the example inputs are compared with the full model's (eval mode) and a
        :class:`fxprune.VerificationError` is raised if the max abs difference exceeds
        ``rtol * max(1, max |full output|)``.
        """
        from fxprune.passes import prune_rewrite

        keep = {gid: ~zero for gid, zero in self.zero_channels().items() if zero.any()}
        slim = prune_rewrite(self.module, keep)
        slim.train(self.module.training)
        if verify:
            diff, scale = max_output_difference(self.module, slim, self.example_inputs)
            if diff > rtol * max(1.0, scale):
                raise VerificationError(
                    f"the slim model's output differs from the full model's: max abs difference {diff:.3e} "
                    f"(max |output| {scale:.3e}, tolerance {rtol:g} relative)")
        return slim

    # ------------------------------------------------------------------ inspection
    def to_dot(self, path: Optional[str] = None) -> str:
        """The group graph as DOT (pydot); written to ``path`` if given. Returns the DOT text."""
        from .dot import program_to_dot

        text = program_to_dot(self).to_string()
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text

    def dump(self, directory: str) -> List[str]:
        """Re-run the pipeline pass by pass and write the IR after each one, as text
        (``NN_pass.txt``) and DOT (``NN_pass.dot``). Returns the written paths."""
        from fxprune.passes import trace

        from .dot import graph_to_dot, ir_text

        os.makedirs(directory, exist_ok=True)
        written = []
        gm = trace(self._model if self._model is not None else self.module, **self._trace_options)
        steps = [("trace", gm)] + list(self.pipeline.steps(gm))
        for i, (name, g) in enumerate(steps):
            base = os.path.join(directory, f"{i:02d}_{name}")
            with open(base + ".txt", "w") as f:
                f.write(ir_text(g))
            with open(base + ".dot", "w") as f:
                f.write(graph_to_dot(g).to_string())
            written += [base + ".txt", base + ".dot"]
        return written

    def summary(self) -> str:
        lines = [f"Program: {len(self.module.graph.nodes)} nodes, {len(self.groups)} groups "
                 f"({len(self.prunable_groups)} prunable, {sum(g.size for g in self.prunable_groups)} channels)"]
        for g in self.groups:
            lines.append("  " + repr(g))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Program({type(self.module).__name__}, groups={len(self.groups)}, "
                f"prunable={len(self.prunable_groups)})")


def _run(module: torch.nn.Module, inputs: Sequence) -> list:
    was = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(*inputs)
    finally:
        module.train(was)
    leaves, _ = tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def max_output_difference(full: torch.nn.Module, slim: torch.nn.Module, inputs: Sequence):
    """``(max abs difference, max |full output|)`` over all output tensors, in eval mode."""
    a, b = _run(full, inputs), _run(slim, inputs)
    if len(a) != len(b):
        raise VerificationError(f"the slim model returns {len(b)} tensors, the full model {len(a)}")
    diff, scale = 0.0, 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise VerificationError(f"output shape changed: {tuple(x.shape)} -> {tuple(y.shape)}")
        if x.is_floating_point():
            diff = max(diff, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
            scale = max(scale, x.double().abs().max().item() if x.numel() else 0.0)
        elif not torch.equal(x, y):
            raise VerificationError("an integer output changed")
    return diff, scale


__all__ = ["compile", "Program", "max_output_difference", "FxPruneError"]
