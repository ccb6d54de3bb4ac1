"""Equivalence over the torchvision model zoo.

For every classification model of ``torchvision.models`` and every segmentation model of
``torchvision.models.segmentation`` (random weights, small inputs, see benchmarks/_models.py):
zero a random 30-50% of the channels of every prunable exact group, construct the slim model
and check, in float64 and eval mode, that its output equals

* the zeroed traced model's (``fxprune.testing.check_equivalence``), and
* the zeroed *eager* model's, i.e. the user's own ``nn.Module`` run without torch.fx, so that
  a tracing mistake cannot hide behind a traced reference.

Every model must have at least one prunable exact group and come out strictly smaller; in the
transformer-style models (ConvNeXt, ViT, Swin, MaxViT) that includes the residual stream
through their LayerNorms (the group owning ``conv_proj`` / the stem's weight). Groups left
whole carry a reason.

The fast tier runs a representative subset; every other model is marked ``slow``
(``pytest -m slow tests/test_torchvision_zoo.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _models  # noqa: E402  (benchmarks/_models.py: model list, builders, input sizes)
from fxprune.program import max_output_difference  # noqa: E402
from fxprune.testing import check_equivalence  # noqa: E402

RTOL = 1e-6

# One or two of each family: plain chains, residual, depthwise/SE, channel shuffle, dense
# concatenation, fire modules (concat), inception branches, group conv (RegNet), LayerNorm
# over channels (ConvNeXt), segmentation heads with dict outputs and upsampling, and a ViT.
FAST = [
    "resnet18",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "densenet121",
    "efficientnet_b0",
    "squeezenet1_0",
    "googlenet",
    "regnet_x_400mf",
    "convnext_tiny",
    "lraspp_mobilenet_v3_large",
    "mnasnet0_5",
    "alexnet",
    "vit_b_32",
]

ALL = _models.ALL
assert set(FAST) <= set(ALL), sorted(set(FAST) - set(ALL))

PARAMS = [pytest.param(name, id=name, marks=() if name in FAST else pytest.mark.slow) for name in ALL]


@pytest.mark.parametrize("name", PARAMS)
def test_zoo_equivalence(name):
    model = _models.build(name, seed=0).double()
    inputs = _models.example_inputs(name, seed=0, dtype=torch.float64)

    res = check_equivalence(model, inputs, seed=0, frac=(0.3, 0.5), dtype=torch.float64, rtol=RTOL)
    groups = res.prog.groups
    assert groups, f"{name}: no groups found"
    assert res.max_rel_diff <= RTOL

    for g in groups:
        if not (g.prunable and g.exact):
            assert g.reason, f"{name}: group {g.id} is frozen or inexact without a reason: {g!r}"

    exact = [g for g in groups if g.prunable and g.exact]
    assert exact, f"{name}: no prunable exact group:\n" + res.prog.summary()
    assert res.zeroed_channels > 0
    assert res.params_slim < res.params_full, (
        f"{name}: slim model not smaller ({res.params_slim} vs {res.params_full} parameters)")
    if _models.is_transformer(name):  # the residual stream: the widest group, through the norms
        norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
        normed = [g for g in exact if any(p.rpartition(".")[0] in norms for p in g.params)]
        assert normed, f"{name}: no prunable exact group through a LayerNorm:\n" + res.prog.summary()

    # The same comparison against the eager model: copy the zeroed, randomised tensors of the
    # traced module into the user's model (same qualified names) and run it without torch.fx.
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    traced = dict(res.prog.module.named_parameters())
    traced.update(res.prog.module.named_buffers())
    # Tensors the tracer lifted out of forward() (``_tensor_constant0``, ...) are not the
    # model's state; the eager model makes them itself.
    traced = {k: v for k, v in traced.items() if not k.rpartition(".")[2].startswith("_tensor_constant")}
    missing = set(traced) - set(own)
    assert not missing, f"{name}: traced module has tensors the model lacks: {sorted(missing)[:5]}"
    with torch.no_grad():
        for key, t in traced.items():
            own[key].copy_(t)
    model.eval()
    diff, scale = max_output_difference(model, res.slim, tuple(inputs))
    assert scale > 0, f"{name}: the eager model's output is all zero"
    assert diff <= RTOL * scale, (
        f"{name}: slim output differs from the zeroed eager model: max abs {diff:.3e}, "
        f"relative {diff / scale:.3e}")
