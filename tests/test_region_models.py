"""Region compile on the models that motivated it: every torchvision detector, torchvision's
video and optical-flow models, HuggingFace mixture-of-experts models.

The central check is ``fxprune.testing.check_equivalence``: a random 30-50% of every prunable
exact group zeroed, the slim model against the zeroed full model in float64 on the example
inputs (detections box by box in a canonical order, labels equal), no hint from the user. The
fast tier runs the smallest model of each kind; the rest is marked ``slow``
(``pytest -m slow tests/test_region_models.py``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _region_models as RM  # noqa: E402

import fxprune  # noqa: E402
from fxprune.regions import RegionProgram  # noqa: E402
from fxprune.report import count_params  # noqa: E402
from fxprune.testing import check_equivalence  # noqa: E402

FAST = {"fasterrcnn_mobilenet_v3_large_320_fpn", "ssdlite320_mobilenet_v3_large", "mvit_v1_mini", "mixtral",
        "qwen2_moe"}


def _param(name):
    return pytest.param(name, id=name, marks=() if name in FAST else pytest.mark.slow)


@pytest.mark.parametrize("name", [_param(n) for n in RM.DETECTION])
def test_detector_equivalence(name):
    model, x = RM.build(name)
    r = check_equivalence(model, x, randomize=False)  # norms calibrated by the builder
    prog = r.prog
    assert isinstance(prog, RegionProgram)
    assert "backbone" in [reg.name for reg in prog.regions]
    assert r.max_rel_diff <= 1e-6 and r.params_slim < r.params_full
    out = prog.module(*prog.example_inputs)
    assert len(out[0]["boxes"]) > 0 and out[0]["labels"].dtype == torch.int64  # detections were compared
    # a frozen group is frozen for a reason that names where
    for g in prog.groups:
        assert g.prunable or g.reason


@pytest.mark.slow
@pytest.mark.parametrize("name", RM.RESNET50_FPN)
def test_resnet50_fpn_detectors_lose_half_their_parameters(name):
    model, x = RM.build(name, )
    prog = fxprune.compile(model, x)
    masks = {g.id: np.arange(g.size) >= g.size // 2 for g in prog.groups if g.prunable and g.exact and g.size > 1}
    prog.zero_(masks)
    slim = prog.construct_subnet()
    assert 1 - count_params(slim) / count_params(model) >= 0.5


@pytest.mark.parametrize("name", [_param("mvit_v1_mini"), _param("swin3d_t"), _param("mvit_v1_b")])
def test_video_equivalence(name):
    model, x = RM.build(name)
    r = check_equivalence(model, x)
    assert r.max_rel_diff <= 1e-6 and r.params_slim < r.params_full


@pytest.mark.slow
def test_raft_small_equivalence():
    """RAFT casts its coordinate grid to float32 inside ``forward``, so its eager model does not
    run in float64 at all; it is compared in float32, where 12 recurrent updates through
    ``grid_sample`` leave rounding differences of a few 1e-6."""
    model, x = RM.build("raft_small")
    r = check_equivalence(model, x, dtype=torch.float32, rtol=1e-4)
    assert r.params_slim < r.params_full
    assert sum(g.prunable for g in r.prog.groups) >= len(r.prog.groups) - 2


@pytest.mark.parametrize("name", [_param(n) for n in RM.MOE])
def test_mixture_of_experts_prunes_each_expert(name):
    model, x = RM.build(name)
    r = check_equivalence(model, x)
    assert r.max_rel_diff <= 1e-6 and r.params_slim < r.params_full
    prog, user = r.prog, r.prog._model  # the float64 copy check_equivalence compiled
    assert isinstance(prog, RegionProgram)
    experts = [reg for reg in prog.regions if ".mlp.experts." in reg.name]
    assert len(experts) == 2 * 4  # one region per expert and layer
    for reg in experts:
        inner = [prog.groups[g] for g in reg.groups if prog.groups[g].prunable]
        assert len(inner) == 1 and inner[0].params == [f"{reg.name}.gate_up_proj.weight"]
        assert inner[0].size == reg.module.gate_up_proj.weight.shape[0] // 2
    assert "region boundary" in prog.rejected["model.layers.0.mlp.gate"]  # the router's width is never pruned
    # the expert weights of prog.module view the user's stacked tensors
    stacked = user.model.layers[0].mlp.experts.down_proj
    view = prog.module.get_parameter("model.layers.0.mlp.experts.1.down_proj.weight")
    assert view.data_ptr() == stacked[1].data_ptr()
    # experts pruned to different widths; another sequence length runs through every region
    widths = {r.slim.get_submodule(e.name).gate_up_proj.weight.shape[0] for e in experts}
    assert len(widths) > 1
    longer = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        a = prog.module(longer, use_cache=False).logits
        b = r.slim(longer, use_cache=False).logits
    assert (a - b).abs().max() <= 1e-9


def _detection_batch(n: int, side: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, side, side, generator=g) for _ in range(n)]
    targets = []
    for _ in range(n):
        xy = torch.rand(2, 2, generator=g) * side * 0.6
        wh = 16 + torch.rand(2, 2, generator=g) * side * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=side)], dim=1)
        targets.append({"boxes": boxes, "labels": torch.randint(1, 91, (2,), generator=g)})
    return images, targets


@pytest.mark.slow
def test_dhspg_trains_a_detector():
    """A short DHSPG run with the detection loss on synthetic images and boxes: the loss falls,
    the target group sparsity is reached, and the slim detector equals the trained one."""
    from fxprune.program import max_output_difference

    torch.manual_seed(0)
    model, x = RM.build_detection("fasterrcnn_mobilenet_v3_large_320_fpn", side=128, calibrate=False)
    prog = fxprune.compile(model, x)
    steps = 30
    opt = fxprune.DHSPG(prog, lr=0.01, momentum=0.9, target_group_sparsity=0.3, start_pruning_step=5,
                        pruning_steps=15)
    images, targets = _detection_batch(2, 128, seed=1)
    prog.module.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(prog.module(images, targets).values())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    zero = prog.zero_channels()
    assert sum(int(z.sum()) for z in zero.values()) == opt.target_channels > 0
    prog.module.eval()
    slim = prog.construct_subnet()
    prog.module.double()
    slim.double()
    test = ([images[0].double()],)
    diff, scale = max_output_difference(prog.module, slim, test)
    assert diff <= 1e-9 * max(1.0, scale)
