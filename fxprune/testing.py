"""Equivalence checking: the contract every rewrite is held to.

:func:`check_equivalence` zeroes a random 30-50% of the channels of every prunable exact
group, constructs the slim model and compares it with the zeroed full model in float64, eval
mode, with randomised normalisation statistics and affine parameters (so that a constant a
zeroed channel leaves behind cannot hide behind default zero biases).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import numpy as np
import torch

from .program import Program, _normalize_inputs, compile, max_output_difference
from .report import count_params


@dataclass
class EquivalenceResult:
    max_abs_diff: float
    max_rel_diff: float
    params_full: int
    params_slim: int
    zeroed_channels: int
    prog: Program
    slim: torch.nn.Module


@torch.no_grad()
def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Random running statistics and affine parameters for every normalisation layer."""
    g = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)
    for m in model.modules():
        if not isinstance(m, norm_types):
            continue
        for name in ("running_mean",):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g).to(t) * 0.5)
        t = getattr(m, "running_var", None)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            t.copy_((torch.rand(t.shape, generator=g) * 1.5 + 0.5).to(t))
        for name, scale, shift in (("weight", 0.5, 1.0), ("bias", 0.5, 0.0)):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                t.copy_((torch.randn(t.shape, generator=g) * scale + shift).to(t))


@torch.no_grad()
def calibrate_norms(model: torch.nn.Module, *inputs: Any, seed: int = 0, call=None) -> None:
    """Batch-norm running statistics measured on ``inputs`` and random affine parameters.

    The model runs once in eval mode with only its batch norms in training mode (cumulative
    averages, ``momentum=None``), so each norm's statistics are those of the data it sees; its
    weight and bias are then drawn from N(1, 0.2^2) and N(0, 0.2^2). Activations of a random
    network then keep their scale through depth, instead of saturating into features that are
    constant over space (whose exact ties make a detector's detections depend on the last bit
    of rounding). ``call(model, *inputs)`` runs the model (default ``model(*inputs)``); a norm
    that sees a single value per channel keeps its statistics.
    """
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    flags = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum) for m in norms]
    model.eval()
    skip = set()

    def check(m, args):
        x = args[0]
        if x.numel() // max(1, x.shape[1]) < 2:
            skip.add(m)
            m.eval()

    handles = [m.register_forward_pre_hook(check) for m in norms]
    try:
        for m in norms:
            if m.track_running_stats:
                m.reset_running_stats()
                m.momentum = None
                m.train()
        (call or (lambda mod, *a: mod(*a)))(model, *inputs)
    finally:
        for h in handles:
            h.remove()
        for m, momentum in saved:
            m.momentum = momentum
        for m, flag in flags:
            m.training = flag
    for m in norms:
        if m.affine:
            m.weight.copy_((1 + 0.2 * torch.randn(m.weight.shape, generator=g)).to(m.weight))
            m.bias.copy_((0.2 * torch.randn(m.bias.shape, generator=g)).to(m.bias))


def _convert(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, (list, tuple)):
        return type(x)(_convert(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _convert(v, dtype) for k, v in x.items()}
    return x


def random_masks(prog: Program, seed: int = 0, frac: Tuple[float, float] = (0.3, 0.5)) -> Dict[int, np.ndarray]:
    """Keep-masks dropping a random ``frac`` of each prunable exact group (at least one channel
    kept, at least one dropped when the group has two or more)."""
    rng = np.random.default_rng(seed)
    masks = {}
    for g in prog.groups:
        if not (g.prunable and g.exact) or g.size < 2:
            continue
        n_drop = int(round(rng.uniform(*frac) * g.size))
        n_drop = min(max(n_drop, 1), g.size - 1)
        keep = np.ones(g.size, bool)
        keep[rng.choice(g.size, n_drop, replace=False)] = False
        masks[g.id] = keep
    return masks


def check_equivalence(model: torch.nn.Module, example_inputs: Any, *, seed: int = 0,
                      frac: Tuple[float, float] = (0.3, 0.5), dtype: torch.dtype = torch.float64,
                      rtol: float = 1e-6, require_smaller: bool = True, randomize: bool = True,
                      **compile_kwargs) -> EquivalenceResult:
    """Zero random channels, construct, and assert the slim model equals the zeroed full one.

    The model is copied (the caller's is untouched), converted to ``dtype`` and put in eval
    mode; ``randomize`` draws random normalisation statistics (:func:`randomize_norms`; pass
    False for a model whose statistics were set already, e.g. by :func:`calibrate_norms`).
    Detections are compared in a canonical order (:func:`fxprune.program.canonical_detections`).
    Raises ``AssertionError`` if ``max |slim - full| > rtol * max |full|`` or, with
    ``require_smaller``, if the slim model is not strictly smaller while some group was zeroed.
    """
    model = copy.deepcopy(model).to(dtype).eval()
    inputs = _convert(_normalize_inputs(model, example_inputs), dtype)
    if randomize:
        randomize_norms(model, seed)
    prog = compile(model, inputs, **compile_kwargs)
    masks = random_masks(prog, seed, frac)
    prog.zero_(masks)
    slim = prog.construct_subnet(verify=False)
    diff, scale = max_output_difference(prog.module, slim, prog.example_inputs)
    rel = diff / scale if scale > 0 else diff
    pf, ps = count_params(prog.module), count_params(slim)
    zeroed = int(sum((~m).sum() for m in masks.values()))
    assert rel <= rtol, f"slim output differs from the zeroed full model: max abs {diff:.3e}, relative {rel:.3e}"
    if require_smaller and zeroed:
        assert ps < pf, f"slim model is not smaller ({ps} vs {pf} parameters) although {zeroed} channels were zeroed"
    return EquivalenceResult(diff, rel, pf, ps, zeroed, prog, slim)
