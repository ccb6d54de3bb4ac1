"""Region compile: pruning models that neither front end traces whole.

A detector's box decoding and non-maximum suppression, a mixture-of-experts layer's token
routing, an ``if x.sum() > 0:`` or a call into a third-party library branch on tensor values
or leave torch, so neither symbolic tracing nor ``torch.export`` captures the whole model as
one graph. The parts that hold nearly all the parameters (a backbone and its feature pyramid,
a box head, an expert's MLP) usually do trace. Region compile analyses those parts, each on
its own, and leaves the code between them as the user's Python.

Design
------
**Recording** (:mod:`.record`). The model runs once on the example inputs (eval mode, no
autograd) with forward hooks on every module. For each candidate submodule the hooks keep the
inputs of its first calls (cloned before it runs) and its outputs, bound to its ``forward``
signature and flattened with ``torch.utils._pytree`` (:class:`.calls.CallSpec`: tensor
leaves are the region's inputs, every other leaf is a constant). A dispatch mode notes every
module running when an op with a value-dependent output (ATen tags ``dynamic_output_shape`` and
``data_dependent_output``: ``nonzero``, boolean masks, ``.item()``, ``bool(tensor)``) runs or a
tensor leaves torch (``.numpy()``, ``.tolist()``) on a value computed from the inputs, and which
modules are running whenever a parameter is read.

**The walk** (:func:`.build.find_regions`). From the top of the module tree, a submodule becomes
a *region* when it is the largest one that (1) holds parameters, (2) was called by the run and
is not data-dependent, (3) traces on its recorded inputs, symbolic tracing first and
``torch.export`` second (the front ends of :func:`fxprune.compile`), and (4) gives the same
outputs as the eager submodule on every recorded call (integers equal, floating point within
1e-5 of the largest magnitude; the check is the shape-propagation pass's own run of the graph).
Otherwise the walk goes down to its children. Not tried: submodules without parameters
(nothing to prune), single torch.nn layers (a region's inputs come from outside and its outputs
are boundaries, so a lone layer has nothing prunable), excluded ones and their ancestors.
``compile(model, x, regions=[...])`` compiles exactly the named submodules (each must pass or
:class:`fxprune.RegionError` says why); ``exclude=[...]`` keeps submodules out.

**Calls.** A region is called as the submodule was; its graph takes the tensor leaves and has
the constants built in. A submodule called several times is a region only if every call has the
same structure and constants and the graph reproduces every recorded call (a graph from
``torch.export`` is specialised to the recorded shapes, so such a region is usually refused and
its children tried). At run time a call with other constants or structure raises
:class:`fxprune.RegionError` naming the region and the argument. A region traced by
``torch.export`` only takes the shapes it was recorded with and has eval-mode semantics built
in, as a whole model from that front end has; symbolic tracing is tried first and gives
shape-generic graphs that train.

**Boundaries.** A region's outputs are read by code fxprune has not analysed, so the channels
that reach them are frozen with a reason naming the region; its inputs come from outside and
carry no channels. Nothing is assumed about the code between two regions.

**Shared parameters.** A region's parameter or buffer that is also registered outside it (tied
weights) or that is read while the region's module is not running (by the code around it, or
through a child the code around it calls) freezes every group that touches it, with the other
user in the reason; its erasable operators are dropped.

**The program** (:class:`.program.RegionProgram`). ``prog.module`` is the user's model with
every region's :class:`.calls.RegionGraphModule` in place of its submodule: the modules on the
way to a region are shallow copies, everything else (parameters included) is the user's own
object, and the user's model is never modified. ``prog.groups`` and ``prog.erasables`` are
every region's, with global ids (region by region) and parameter names from the root of
``prog.module`` (``backbone.body.layer1.0.conv1.weight``), so ``zero_``, ``zero_channels``,
DHSPG, H2SPG and Auto-Train-Once (through ``prog.gated_module()`` and ``prog.flops_model()``,
:mod:`.training`) work on it unchanged.

**The slim model.** ``construct_subnet()`` rewrites each region that lost channels (the region's
own ``prune_rewrite``/``erase_rewrite``), checks it against the full region on every recorded
call, and returns a deep copy of ``prog.module`` with the slim regions in place; the copy is
checked end to end against ``prog.module`` on the example inputs (detections box by box, labels
equal). ``fxprune.save`` and ``fxprune.export`` refuse such a model and say what to do: the code
between the regions is the user's Python, which fxprune neither serialises nor exports.

**Mixture of experts** (:mod:`fxprune.moe`). A HuggingFace experts module with stacked 3-D
weights computes every expert in one batched op, so an expert's width cannot differ from the
others'. Region compile replaces it by a dispatch module with one MLP per expert, whose
weights are views of the stacked ones; each expert's MLP is then a region of its own (its
intermediate width prunable per expert) and the router's output (the number of experts) is a
boundary.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from fxprune.errors import TraceError, UnsupportedInputError

from .build import Plan, Region, _short, find_regions, freeze_shared, shared_tensors, swap_in
from .calls import CallSpec, KwargsCall, RegionGraphModule
from .program import RegionEraseGraph, RegionProgram
from .record import Recording, record


def candidate_paths(model: torch.nn.Module, names: Optional[Sequence[str]] = None) -> Dict[int, str]:
    """``{id(module): first qualified name}`` of the modules whose calls are recorded: the
    named ones, or every module with parameters that is not a single torch.nn layer."""
    from .build import _builtin_leaf, _has_params

    if names is not None:
        out = {}
        for n in names:
            try:
                out.setdefault(id(model.get_submodule(n)), n)
            except AttributeError:
                pass
        return out
    return {id(m): name for name, m in model.named_modules(remove_duplicate=True)
            if name and _has_params(m) and not _builtin_leaf(m)}


def module_paths(model: torch.nn.Module) -> Dict[int, str]:
    return {id(m): name for name, m in model.named_modules(remove_duplicate=True)}


def record_model(model: torch.nn.Module, inputs: tuple, names: Optional[Sequence[str]] = None,
                 kwargs: Optional[dict] = None) -> Recording:
    """The recording run of region compile (see :mod:`.record`)."""
    if kwargs:
        call = KwargsCall(model, kwargs)
        return record(call, inputs, candidate_paths(model, names), {**module_paths(model), id(call): ""})
    return record(model, inputs, candidate_paths(model, names), module_paths(model))


def compile_regions(model: torch.nn.Module, inputs: tuple, *, names: Optional[Sequence[str]] = None,
                    exclude: Sequence[str] = (), modes: tuple = ("prune",), frontend: str = "auto",
                    leaf_modules=(), allow_inexact: bool = False, kwargs: Optional[dict] = None,
                    cause: Optional[BaseException] = None) -> RegionProgram:
    """Region compile of ``model`` (see the module docstring); what :func:`fxprune.compile`
    calls when the whole model does not trace, or with ``regions=``/``exclude=``.

    Args:
        inputs: the normalised example inputs (a tuple), ``kwargs`` keyword arguments of the
            call (parameters fixed by ``concrete_args``).
        names: the regions to compile (qualified names), or None to find them.
        exclude: qualified names of submodules kept out of every region.
        cause: why the whole model did not trace (quoted if no region is found).

    Raises:
        fxprune.RegionError: a named region cannot be compiled.
        fxprune.TraceError: no submodule can be compiled as a region.
    """
    from fxprune.moe import unstack_experts
    from fxprune.program import _gc_paused

    if frontend not in ("auto", "fx", "export"):
        raise UnsupportedInputError(f"frontend must be 'auto', 'fx' or 'export', not {frontend!r}")
    exclude = tuple(exclude or ())
    work = unstack_experts(model)
    with _gc_paused():
        rec = record_model(work, inputs, names, kwargs)
        plan = find_regions(work, rec, module_paths(work), names=names, exclude=exclude, modes=modes,
                            frontend=frontend, leaf_modules=tuple(leaf_modules), allow_inexact=allow_inexact)
    if names is None:
        root = rec.data_dependent.get(id(work)) or (_short(cause) if cause is not None else "")
        if root:
            plan.rejected = {"": root, **plan.rejected}
    if not plan.regions:
        why = "; ".join(f"{k or '<root>'}: {v}" for k, v in list(plan.rejected.items())[:6])
        head = f"{cause}\n\n" if cause is not None else ""
        err = TraceError(f"{head}Region compile found no submodule that traces and reproduces its recorded "
                         f"calls ({why})")
        err.modules_done = getattr(cause, "modules_done", 0)
        raise err from cause
    for r in plan.regions:
        freeze_shared(r, shared_tensors(work, r, rec))
    module = swap_in(work, {p: r.module for r in plan.regions for p in r.paths})
    return RegionProgram(module, inputs, plan.regions, model=model, modes=modes, rejected=plan.rejected,
                         call_kwargs=kwargs)


__all__ = ["CallSpec", "Plan", "Recording", "Region", "RegionEraseGraph", "RegionGraphModule", "RegionProgram",
           "compile_regions", "record_model"]
