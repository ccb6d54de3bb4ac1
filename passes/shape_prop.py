"""Shape propagation: real shapes and dtypes on every node (``node.meta["tensor_meta"]``),
by :class:`torch.fx.passes.shape_prop.ShapeProp` on the example inputs, in eval mode and
without autograd so that the model's state (BatchNorm statistics) is left untouched."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import ShapeProp

from fxprune.errors import UnsupportedInputError

from .modes import eval_mode


class ShapePropPass(PassBase):
    name = "shape_prop"

    def __init__(self, example_inputs: Sequence):
        super().__init__()
        self.example_inputs = tuple(example_inputs)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        try:
            with torch.no_grad(), eval_mode(gm):
                ShapeProp(gm).propagate(*self.example_inputs)
        except Exception as exc:
            raise UnsupportedInputError(
                f"the model does not run on the example inputs "
                f"({', '.join(_describe(x) for x in self.example_inputs)}): {type(exc).__name__}: {exc}") from exc
        return PassResult(gm, False)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"Tensor{tuple(x.shape)} {x.dtype}"
    return type(x).__name__
