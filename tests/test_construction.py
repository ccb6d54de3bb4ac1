"""Training that could silently go wrong: parameters edited in ``forward``, groups that cannot be
built found before training, the slim model's train/eval modes, and the meta device."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import UnsupportedInputError
from fxprune.testing import random_masks, randomize_norms


class EditsItsWeights(nn.Module):
    """Weight clipping and scaling in ``forward``, through ``.data``, as training code does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        self.conv.weight.data.clamp_(-1, 1)
        self.c2.weight.data.mul_(0.999)
        k = self.c3.weight.shape[-1]  # reading a shape is not a use of the values
        y = torch.relu(self.c2(torch.relu(self.bn(self.conv(x)))))
        return self.fc(torch.relu(self.c3(y)).mean((2, 3))) / k


def _groups_of(prog, param):
    return [g for g in prog.groups if any(s.param == param for s in g.slices)]


def test_parameters_edited_in_forward_freeze_their_dims():
    torch.manual_seed(0)
    model, x = EditsItsWeights(), torch.randn(2, 3, 8, 8)
    prog = fxprune.compile(model, (x,))
    for param, node in (("conv.weight", "clamp_"), ("c2.weight", "mul_")):
        groups = _groups_of(prog, param)
        assert len(groups) == 3  # out channels, kernel height, kernel width
        for g in groups:
            assert not g.prunable
            assert f"{param} belongs to module '{param.split('.')[0]}'" in g.reason
            assert f"node '{node}' (call_method {node})" in g.reason
    assert all(g.prunable for g in _groups_of(prog, "c3.weight") if g.size == 6)
    assert not any(g.prunable for g in prog.groups if g.size == 3)  # no kernel dim is a channel group
    # a full run: DHSPG prunes what is left, construction and verification pass
    opt = fxprune.DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=3)
    for _ in range(6):
        opt.zero_grad()
        F.mse_loss(prog.module(x), torch.zeros(2, 4)).backward()
        opt.step()
    assert opt.metrics()["zero_channels"] > 0
    slim = prog.construct_subnet()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


def test_a_group_that_cannot_be_built_is_found_when_the_optimizer_is_created(monkeypatch):
    """Without the freeze above (an analysis gap of the same kind), the kernel dims would be
    prunable groups; the construction check finds them before the first step."""
    from fxprune.passes import channel_deps

    monkeypatch.setattr(channel_deps, "_freeze_outside_uses", lambda gm, an: None)
    torch.manual_seed(0)
    model, x = EditsItsWeights(), torch.randn(2, 3, 8, 8)
    prog = fxprune.compile(model, (x,))
    kernel_groups = [g for g in prog.groups if g.size == 3 and g.params[0] in ("conv.weight", "c2.weight")]
    assert kernel_groups and all(g.prunable for g in kernel_groups)
    with pytest.warns(UserWarning, match=r"group\(s\) frozen before training"):
        fxprune.DHSPG(prog, lr=0.05, target_group_sparsity=0.5)
    for g in kernel_groups:
        assert not g.prunable
        assert "cannot be built" in g.reason and "flow through" in g.reason
    assert any(g.prunable for g in prog.groups if g.size == 8)  # the channels are still pruned
    found = prog.check_construction()  # cached: the same answer, nothing run again
    assert {g.id for g in kernel_groups} <= set(found)
    assert all(not g.prunable for g in prog.groups if g.size == 3)
    prog.zero_(random_masks(prog))
    prog.construct_subnet()


def test_check_passes_quietly_on_a_healthy_model():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    randomize_norms(model)
    prog = fxprune.compile(model, (torch.randn(1, 3, 32, 32),))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prog.check_construction() == {}
    assert all(g.prunable for g in prog.groups if g.reason is None)


def test_slim_model_takes_each_submodules_mode_from_the_model():
    """model.eval() then prog.construct_subnet(): the slim BatchNorms are in eval mode, so the
    first forward uses the running statistics and leaves them as they are."""
    import torchvision

    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(num_classes=10), torch.randn(4, 3, 32, 32)
    model.train()
    prog = fxprune.compile(model, (x,))
    opt = fxprune.DHSPG(prog, lr=0.01, target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=2)
    for _ in range(3):  # training updates the running statistics
        opt.zero_grad()
        F.cross_entropy(prog.module(torch.randn(8, 3, 32, 32)), torch.arange(8)).backward()
        opt.step()
    model.eval()
    slim = prog.construct_subnet()
    norms = [m for m in slim.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and not slim.training
    before = [m.running_mean.clone() for m in norms]
    with torch.no_grad():
        full_out, slim_out = model(x), slim(x)  # the first call, as a user makes it
    torch.testing.assert_close(slim_out, full_out, rtol=1e-4, atol=1e-4 * full_out.abs().max().item())
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms))
    # and a model left in training mode gives a slim model in training mode, module by module
    model.train()
    model.layer1.eval()
    slim = prog.construct_subnet()
    assert slim.training and slim.bn1.training and not slim.get_submodule("layer1.0.bn1").training


# ---------------------------------------------------------------------------- the meta device


def _llama(device):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from transformers import LlamaForCausalLM
    from transformers_sweep import llama_config

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config()).eval()
    return model, (torch.randint(0, 96, (1, 8), device=device),)


def _half_masks(prog):
    masks = {}
    for g in prog.groups:
        if g.prunable and g.exact and g.size > 1:
            keep = np.ones(g.size, bool)
            keep[g.size // 2:] = False
            masks[g.id] = keep
    return masks


@pytest.fixture(scope="module")
def llama_cpu():
    model, ids = _llama("cpu")
    prog = fxprune.compile(model, ids)
    prog.zero_(_half_masks(prog))
    slim = prog.construct_subnet()
    return model, prog, slim, ids


def test_meta_device_slim_model_has_the_real_models_shapes_counts_and_flops(llama_cpu):
    model_cpu, prog_cpu, slim_cpu, ids_cpu = llama_cpu
    model, ids = _llama("meta")
    prog = fxprune.compile(model, ids)
    assert [(g.size, g.prunable) for g in prog.groups] == [(g.size, g.prunable) for g in prog_cpu.groups]
    masks = _half_masks(prog)
    assert masks
    prog.zero_(masks)  # on meta: recorded, as nothing can be zeroed
    slim = prog.construct_subnet()  # no values to compare: shapes only
    assert all(t.is_meta for t in slim.parameters())
    assert {k: tuple(v.shape) for k, v in slim.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in slim_cpu.state_dict().items()}
    rep, rep_cpu = fxprune.report(prog.module, slim, ids), fxprune.report(prog_cpu.module, slim_cpu, ids_cpu)
    assert (rep.params_full, rep.params_slim) == (rep_cpu.params_full, rep_cpu.params_slim)
    assert (rep.flops_full, rep.flops_slim) == (rep_cpu.flops_full, rep_cpu.flops_slim)
    assert rep.flops_slim < rep.flops_full
    hf, hf_cpu = fxprune.hf_config(model, slim), fxprune.hf_config(model_cpu, slim_cpu)
    assert hf.changed == hf_cpu.changed and hf.changed["num_key_value_heads"] == (2, 1)
    # construct_subnet(keep=...) and verify=False do the same without zero_()
    again = prog.construct_subnet(keep=masks, verify=False)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in slim.state_dict().items()}


def test_meta_device_errors_say_what_cannot_work():
    model, ids = _llama("meta")
    prog = fxprune.compile(model, ids)
    with pytest.raises(UnsupportedInputError, match="meta device.*construct_subnet\\(keep="):
        prog.construct_subnet()
    with pytest.raises(UnsupportedInputError, match="meta device"):
        prog.zero_channels()
    frozen = next(g for g in prog.groups if not g.prunable)
    with pytest.raises(UnsupportedInputError, match=f"groups \\[{frozen.id}\\] are frozen"):
        prog.construct_subnet(keep={frozen.id: np.arange(frozen.size) > 0})


def test_meta_device_bias_folding_gives_a_clear_error():
    """A removed channel whose constant would be folded into a bias has no value on meta."""

    class StarMLP(nn.Module):  # relu(x)**2 + 0.5: a removed channel holds 0.5
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)) ** 2 + 0.5)

    with torch.device("meta"):
        model = StarMLP()
    prog = fxprune.compile(model, (torch.randn(2, 4, device="meta"),))
    g = next(g for g in prog.groups if g.size == 6)
    assert g.prunable and g.exact
    with pytest.raises(fxprune.RewriteError, match="meta device its value cannot be read"):
        prog.construct_subnet(keep={g.id: np.arange(6) < 3})
