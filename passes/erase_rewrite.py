"""Erase rewrite: regenerate a GraphModule without chosen erasable operators (OTOv3).

Given the ids of erasable units (``gm.meta["fxprune.erasables"]``, see
:mod:`fxprune.passes.erasable`) whose parameters are zero, the rewrite

1. plans the erasure (:meth:`~fxprune.passes.erasable.EraseGraph.plan`) and refuses a set that
   would leave an invalid network;
2. copies the GraphModule (the input and its parameters are never modified);
3. folds every add left with one input into that input, drops the erased inputs of every
   concat (a concat left with one input becomes it), deletes the erased nodes and every node
   left without users;
4. removes the channels the dropped concat inputs fed from everything downstream (a
   consumer's input columns, a norm's entries, ``view``/``split`` constants) with the prune
   rewrite, together with any channels the caller prunes (``keep``);
5. deletes the modules no node calls any more, and recompiles.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.fx

from fxprune.errors import RewriteError

from .erasable import META_ERASABLES, META_REJECTED, ErasePlan, erase_graph
from .prune_rewrite import copy_graph_module, prune_rewrite


def erase_keep(gm: torch.fx.GraphModule, plan: ErasePlan,
               keep: Optional[Mapping[int, np.ndarray]] = None) -> dict:
    """The prune rewrite's keep-masks: ``keep`` with the channels the plan drops removed."""
    ca = gm.meta["fxprune"]
    out = {g: np.asarray(m, bool).copy() for g, m in (keep or {}).items()}
    for g, ch in plan.drop.items():
        mask = out.get(g)
        if mask is None:
            mask = np.ones(ca.groups[g].size, bool)
        mask[ch] = False
        out[g] = mask
    return out


def apply_plan(gm: torch.fx.GraphModule, plan: ErasePlan) -> None:
    """Edit ``gm``'s graph in place: fold joints, drop concat inputs, delete removed nodes.
    Parameters and modules are left as they are."""
    nodes = {n.name: n for n in gm.graph.nodes}
    gone = set(plan.removed)
    replace = dict(plan.folds)
    for name, kept in plan.cats.items():
        n = nodes[name]
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        new = [tensors[i] for i in kept]
        if len(new) == 1:
            replace[name] = new[0].name
        elif n.args:
            n.args = (type(tensors)(new),) + tuple(n.args[1:])
        else:
            kwargs = dict(n.kwargs)
            kwargs["tensors"] = type(tensors)(new)
            n.kwargs = kwargs

    def final(name: str) -> str:
        while name in replace:
            name = replace[name]
        return name

    for name in replace:
        nodes[name].replace_all_uses_with(nodes[final(name)])
        gone.add(name)
    for n in reversed(list(gm.graph.nodes)):
        if n.name not in gone:
            continue
        if n.users:
            raise RewriteError(f"cannot erase it: still read by {', '.join(u.name for u in n.users)}", n)
        gm.graph.erase_node(n)


def erase_rewrite(gm: torch.fx.GraphModule, erasables: Iterable[int],
                  keep: Optional[Mapping[int, np.ndarray]] = None,
                  example_inputs: Optional[Sequence] = None) -> torch.fx.GraphModule:
    """Slim copy of ``gm`` (analysed with mode ``"erase"``) without the erasable units
    ``erasables`` (and the units they contain), optionally also pruning channels: ``keep[g]``
    is a bool keep-mask of group ``g``, as for :func:`~fxprune.passes.prune_rewrite`.

    The units' parameters (and ``Erasable.slices``) must be zero for the result to equal
    ``gm``; this is not checked here (``Program.construct_subnet`` verifies its output).

    Raises:
        fxprune.RewriteError: erasing these units together would leave an invalid network
            (the message says why).
    """
    plan = erase_graph(gm).plan(erasables)
    if not plan.valid:
        raise RewriteError(f"erasables {list(plan.units)} cannot be erased together: {plan.reason}")
    masks = erase_keep(gm, plan, keep)
    work = copy_graph_module(gm)
    apply_plan(work, plan)
    slim = prune_rewrite(work, masks, example_inputs)
    for key in (META_ERASABLES, META_REJECTED):
        slim.meta.pop(key, None)
    slim.delete_all_unused_submodules()
    slim.graph.lint()
    slim.recompile()
    return slim


__all__ = ["apply_plan", "erase_keep", "erase_rewrite"]
