"""The ordered pass pipeline: list it, run it step by step, extend it, dump it.

Passes are :class:`torch.fx.passes.infra.pass_base.PassBase` objects over a GraphModule;
analyses write to ``node.meta`` under ``fxprune.*`` keys and to ``gm.meta["fxprune"]``.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple, Union

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase

from .channel_deps import ChannelDepsPass
from .op_semantics import OpSemanticsPass
from .registry import REGISTRY, Registry
from .shape_prop import ShapePropPass
from .symbolic import SymbolicShapesPass


class Pipeline:
    """An ordered list of passes. ``list(pipeline)`` gives their names."""

    def __init__(self, passes: Sequence[PassBase]):
        self.passes: List[PassBase] = list(passes)

    @classmethod
    def default(cls, example_inputs, *, allow_inexact: bool = False, registry: Registry = REGISTRY) -> "Pipeline":
        return cls([ShapePropPass(example_inputs), OpSemanticsPass(registry),
                    ChannelDepsPass(allow_inexact, registry), SymbolicShapesPass()])

    def names(self) -> List[str]:
        return [pass_name(p) for p in self.passes]

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.passes)

    def __repr__(self) -> str:
        return "Pipeline(" + " -> ".join(self.names()) + ")"

    def index(self, name: str) -> int:
        return self.names().index(name)

    def insert(self, where: Union[int, str], p: PassBase, after: bool = True) -> None:
        """Insert ``p`` at a position, or after (``after=True``) / before the pass named ``where``."""
        i = where if isinstance(where, int) else self.index(where) + (1 if after else 0)
        self.passes.insert(i, p)

    def append(self, p: PassBase) -> None:
        self.passes.append(p)

    def run(self, gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
        """Run every pass in order (fxprune's own errors propagate unchanged)."""
        for _, gm in self.steps(gm):
            pass
        return gm

    def steps(self, gm: torch.fx.GraphModule) -> Iterator[Tuple[str, torch.fx.GraphModule]]:
        """Run pass by pass, yielding ``(name, graph_module)`` after each."""
        for p in self.passes:
            result = p(gm)
            if result is not None:
                gm = result.graph_module
            yield pass_name(p), gm


def pass_name(p) -> str:
    return getattr(p, "name", None) or type(p).__name__
