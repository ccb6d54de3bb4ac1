"""Prune rewrite: regenerate a slim GraphModule without the removed channels.

Given a keep-mask per group, the rewrite

1. copies the GraphModule (the input and its parameters are never modified);
2. slices every parameter and buffer dimension linked to channels (tied tensors stay tied);
3. runs each node's registry ``rewrite``: module size attributes (``in_channels``,
   ``groups``, ``num_features``, ``normalized_shape`` ...) and constant arguments that encode
   a channel count, recomputed from the symbolic shapes with the kept counts substituted;
4. recompiles, so the slim model's code is regenerated.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.errors import RewriteError

from .bias_fold import fold_biases
from .channel_deps import META_CHANNELS, ChannelAnalysis
from .channels import TensorChannels, Track
from .op_semantics import META_SPEC
from .symbolic import META_SHAPE, SymbolicShapes

_MISSING = object()


class RewriteContext:
    """What a registry ``rewrite`` sees: the node of the slim graph, its (already sliced)
    module, the original channel tracks, and the new sizes."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, ca: ChannelAnalysis,
                 sym: SymbolicShapes, keep: Mapping, alive: Optional[np.ndarray] = None):
        """``alive``: bool per channel element, False where removed (:func:`element_keep`)."""
        self.gm = gm
        self.node = node
        self.ca = ca
        self.sym = sym
        self.keep = keep
        self.alive = alive if alive is not None else element_keep(ca, keep)
        self.module = gm.get_submodule(node.target) if node.op == "call_module" else None

    def ch(self, value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return self.ca.analysis.channels.get(value.name)
        return None

    @property
    def out_ch(self) -> Any:
        return self.ca.analysis.channels.get(self.node.name)

    def new_size(self, track: Optional[Track], concrete: int = 0) -> int:
        """Size of a dimension after pruning, from its symbolic size."""
        return self.sym.evaluate(self.sym.size(track, concrete), self.keep)

    def new_shape(self, tc: TensorChannels) -> Tuple[int, ...]:
        return tuple(self.new_size(t, s) for s, t in zip(tc.shape, tc.dims))

    def arg(self, index: Optional[int], name: Optional[str] = None, default: Any = _MISSING) -> Any:
        if index is not None and index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        if default is _MISSING:
            raise RewriteError(f"missing argument {name or index}", self.node)
        return default

    def replace_module(self, module: torch.nn.Module) -> None:
        """Put ``module`` in place of the node's module (same qualified name, train/eval flag
        kept); every node calling that name now calls ``module``."""
        module.train(self.module.training)
        path, _, attr = str(self.node.target).rpartition(".")
        setattr(self.gm.get_submodule(path) if path else self.gm, attr, module)
        self.module = module

    def set_arg(self, index: Optional[int], name: Optional[str], value: Any) -> None:
        if index is not None and index < len(self.node.args):
            args = list(self.node.args)
            args[index] = value
            self.node.args = tuple(args)
        else:
            kwargs = dict(self.node.kwargs)
            kwargs[name] = value
            self.node.kwargs = kwargs


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Deep copy of a GraphModule's modules and tensors; analysis metadata is shared, not copied."""
    memo: Dict[int, Any] = {}
    heavy = [gm.meta.get("fxprune")]
    for node in gm.graph.nodes:
        heavy += [node.meta.get(k) for k in (META_CHANNELS, META_SHAPE, META_SPEC)]
    for v in heavy:
        if v is not None:
            memo[id(v)] = v
    return copy.deepcopy(gm, memo)


def element_keep(ca: ChannelAnalysis, keep: Mapping[int, np.ndarray]) -> np.ndarray:
    """Bool per channel element: False where its group channel is removed."""
    out = np.ones(len(ca.index.group), bool)
    for g, mask in keep.items():
        sel = ca.index.group == g
        out[sel] = np.asarray(mask, bool)[ca.index.channel[sel]]
    return out


def prune_rewrite(gm: torch.fx.GraphModule, keep: Mapping[int, np.ndarray],
                  example_inputs: Optional[Sequence] = None) -> torch.fx.GraphModule:
    """Slim copy of ``gm`` (analysed by the pipeline) keeping ``keep[g]`` channels of group ``g``.

    ``example_inputs`` are needed when a removed channel holds a constant that a consumer's
    bias takes over (:mod:`fxprune.passes.bias_fold`)."""
    ca: ChannelAnalysis = gm.meta["fxprune"]
    sym: SymbolicShapes = ca.sym
    new = copy_graph_module(gm)
    alive = element_keep(ca, keep)
    new_biases = fold_biases(gm, new, ca.analysis, alive, example_inputs, _get)
    _slice_tensors(new, ca, alive)
    for module, bias in new_biases:
        new.get_submodule(module).bias = torch.nn.Parameter(bias)
    for node in new.graph.nodes:
        spec = node.meta.get(META_SPEC)
        if spec is None or spec.rewrite is None:
            continue
        try:
            spec.rewrite(RewriteContext(new, node, ca, sym, keep, alive))
        except RewriteError:
            raise
        except Exception as exc:
            raise RewriteError(f"rewrite '{spec.name}' failed: {type(exc).__name__}: {exc}", node) from exc
    _drop_stale_assertions(new, ca, alive)
    for node in new.graph.nodes:
        for k in [k for k in node.meta if k.startswith("fxprune") or k == "tensor_meta"]:
            del node.meta[k]
    new.meta.pop("fxprune", None)
    new.graph.lint()
    new.recompile()
    return new


ASSERTIONS = tuple(t for t in (torch._assert, getattr(torch, "_assert_async", None),
                               getattr(torch.ops.aten, "_assert_scalar", None) and torch.ops.aten._assert_scalar.default,
                               getattr(torch.ops.aten, "_assert_async", None) and torch.ops.aten._assert_async.msg)
                   if t is not None)


def _drop_stale_assertions(gm: torch.fx.GraphModule, ca: ChannelAnalysis, alive: np.ndarray) -> None:
    """Delete assertions whose condition is computed from a channel count that the rewrite
    changed (EvoNorm's ``torch._assert(C % groups == 0)``): they checked the full model's
    sizes, which the slim model no longer has, and the graph's other constants on those sizes
    are recomputed from the symbolic shapes. An assertion computes nothing the graph uses."""
    sizes = ca.analysis.sizes
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in ASSERTIONS or node.users:
            continue
        tracks = _size_tracks(sizes.get(node.name)) + [t for a in node.all_input_nodes
                                                      for t in _size_tracks(sizes.get(a.name))]
        if any(not alive[t.units].all() for t in tracks):
            gm.graph.erase_node(node)


def _size_tracks(value) -> list:
    if isinstance(value, Track):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _size_tracks(v)]
    return []


def _slice_tensors(gm: torch.fx.GraphModule, ca: ChannelAnalysis, alive: np.ndarray) -> None:
    cuts: Dict[str, list] = defaultdict(list)
    for (name, dim), info in ca.analysis.params.items():
        mask = alive[info.track.units]
        if not mask.all():
            cuts[name].append((dim, torch.from_numpy(np.flatnonzero(mask))))
    if not cuts:
        return
    aliases: Dict[str, list] = defaultdict(list)
    for alias, canonical in ca.analysis.canonical.items():
        aliases[canonical].append(alias)
    for name, dims in cuts.items():
        old = _get(gm, name)
        with torch.no_grad():
            t = old.detach()
            for dim, idx in dims:
                t = t.index_select(dim, idx.to(t.device))
            t = t.clone()
        if isinstance(old, torch.nn.Parameter):
            t = torch.nn.Parameter(t, requires_grad=old.requires_grad)
        for alias in aliases.get(name, [name]):
            _set(gm, alias, t)


def _get(gm: torch.nn.Module, name: str) -> torch.Tensor:
    path, _, attr = name.rpartition(".")
    return getattr(gm.get_submodule(path) if path else gm, attr)


def _set(gm: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    owner = gm.get_submodule(path) if path else gm
    if isinstance(value, torch.nn.Parameter):
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)
