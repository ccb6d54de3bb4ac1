"""Folding removed constant channels into their consumer's bias.

A zeroed channel is not always zero where it is read: a StarReLU ``s * relu(x)**2 + b`` turns
it into ``b``, a gate ``sigmoid(0)`` into 0.5. Such a value is data-independent (its track
state is ``CONST``), so a linear layer or an unpadded convolution that reads it adds the same
``sum_k weight[o, c, k] * value_c`` to output ``o`` at every position. The slim model drops
channel ``c`` and adds that sum to the consumer's bias instead, which keeps it exact.

The channel-deps pass records such consumers (:class:`~fxprune.passes.rule_context.FoldSite`);
the values are read here, by running the full (zeroed) graph once on the example inputs, and
checked to be the same at every batch and spatial position.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
import torch.fx

from fxprune.errors import RewriteError

from .modes import eval_mode
from .rule_context import Analysis


class _CaptureInputs(torch.fx.Interpreter):
    """Runs the graph and keeps the first argument of the named nodes."""

    def __init__(self, gm: torch.fx.GraphModule, names: Iterable[str]):
        super().__init__(gm)
        self.names = set(names)
        self.captured: Dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node):
        if n.name in self.names:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.captured[n.name] = args[0]
        return super().run_node(n)


def fold_biases(gm: torch.fx.GraphModule, slim: torch.fx.GraphModule, analysis: Analysis, alive: np.ndarray,
                example_inputs: Sequence, get, rtol: float = 1e-5) -> List[Tuple[str, torch.Tensor]]:
    """Add to the biases of ``slim`` (an unsliced copy of ``gm``) the constants of the removed
    channels each fold site reads. ``alive[e]`` is False for a removed element; ``get(module,
    name)`` looks a tensor up by qualified name.

    Returns ``(module name, bias)`` for consumer modules without a bias: the caller gives
    them this one (already cut to their kept output channels) once the weights are sliced.

    Raises:
        fxprune.RewriteError: no example inputs, a removed channel's value varies, or the tensors
            are on the meta device (no values to read).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = [(site, units) for site, units in analysis.folds if site.node in nodes and not alive[units].all()]
    new_biases: List[Tuple[str, torch.Tensor]] = []
    if not sites:
        return new_biases
    if example_inputs is None:
        raise RewriteError("constant channels must be folded into a bias: example inputs are needed",
                           nodes[sites[0][0].node])
    if any(t.is_meta for t in gm.parameters()):
        raise RewriteError("a removed channel holds a constant that the slim model folds into a bias, and on "
                           "the meta device its value cannot be read; build this slim model from real "
                           "weights (or keep this group's channels)", nodes[sites[0][0].node])
    capture = _CaptureInputs(gm, [site.node for site, _ in sites])
    with torch.no_grad(), eval_mode(gm):
        capture.run(*example_inputs)
    for site, units in sites:
        removed = torch.from_numpy(np.flatnonzero(~alive[units]))
        x = capture.captured[site.node]
        per_channel = x.movedim(site.channel_dim, 0).reshape(x.shape[site.channel_dim], -1)[removed]
        value = per_channel[:, 0]
        spread = (per_channel - value[:, None]).abs().max() if per_channel.numel() else 0.0
        if spread > rtol * max(1.0, float(value.abs().max())):
            raise RewriteError(f"a removed channel read by '{site.node}' is not one constant (it varies by "
                               f"{float(spread):.3e} across positions); it cannot be folded into a bias",
                               nodes[site.node])
        weight = get(slim, site.weight)
        cols = weight.detach().index_select(site.in_dim, removed.to(weight.device)).movedim(site.in_dim, -1)
        delta = (cols * value.to(cols)).reshape(cols.shape[0], -1).sum(1)
        if site.bias is not None:
            with torch.no_grad():
                get(slim, site.bias).add_(delta.to(weight.dtype))
            continue
        rows = analysis.params.get((site.weight, 0))
        if rows is not None:
            delta = delta[torch.from_numpy(alive[rows.track.units]).to(delta.device)]
        new_biases.append((site.module, delta.clone()))
    return new_biases
