"""Region compile (fxprune.regions): models that neither front end traces whole.

Hand-written models cover the mechanism (data-dependent branches, a call that leaves torch,
user-named and excluded regions, modules called twice, shared parameters, call conventions,
save/export refusal, DOT and summaries, DHSPG/H2SPG/ATO on a region program); the torchvision
detectors, video models and HuggingFace mixture-of-experts models are in
``test_region_models.py``.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.regions import RegionGraphModule, RegionProgram
from fxprune.testing import check_equivalence, random_masks


def block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                         nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


class DataDependent(nn.Module):
    """``if x.sum() > 0:`` between two conv stacks."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = block(3, 16), block(16, 16), block(16, 8)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = self.b(x)
        else:
            x = -x
        return self.c(x)


def third_party(x: torch.Tensor) -> torch.Tensor:
    """A function outside torch: numpy's tanh on the tensor's values."""
    return torch.from_numpy(np.tanh(x.detach().numpy())).to(x.dtype)


class LeavesTorch(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = block(3, 12), block(12, 6)

    def forward(self, x):
        return self.head(third_party(self.stem(x)))


X = torch.randn(2, 3, 16, 16)


def test_data_dependent_branch_compiles_as_regions_and_is_exact():
    model = DataDependent().eval()
    prog = fxprune.compile(model, X)
    assert isinstance(prog, RegionProgram)
    assert [r.name for r in prog.regions] == ["a", "b", "c"]
    assert all(r.frontend == "fx" for r in prog.regions)
    assert "data-dependent" in prog.rejected[""]
    # the inner width of every stack is prunable; each stack's output is a boundary
    assert sum(g.prunable for g in prog.groups) == 3
    for g in prog.groups:
        if not g.prunable:
            assert "region boundary" in g.reason and f"region '{g.params[0].split('.')[0]}'" in g.reason
    # names from the root of prog.module, which shares the model's parameters
    assert prog.groups[0].params[0].startswith("a.")
    assert prog.module.get_parameter("a.0.weight") is model.a[0].weight
    r = check_equivalence(model, X)
    assert r.max_rel_diff <= 1e-12 and r.params_slim < r.params_full


def test_the_input_model_is_not_modified():
    model = DataDependent().eval()
    before = {n: m for n, m in model.named_modules()}
    prog = fxprune.compile(model, X)
    assert {n: m for n, m in model.named_modules()} == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert isinstance(prog.module.a, RegionGraphModule) and not isinstance(model.a, RegionGraphModule)
    prog.zero_(random_masks(prog))
    slim = prog.construct_subnet()
    assert slim is not prog.module and slim.a is not prog.module.a
    assert all(p is not q for p in slim.parameters() for q in model.parameters())


def test_a_call_that_leaves_torch_splits_the_model():
    model = LeavesTorch().eval()
    prog = fxprune.compile(model, X)
    assert [r.name for r in prog.regions] == ["stem", "head"]
    assert "numpy" in prog.rejected[""]
    r = check_equivalence(model, X)
    assert r.max_rel_diff <= 1e-12 and r.params_slim < r.params_full


def test_named_regions_and_exclude():
    model = DataDependent().eval()
    prog = fxprune.compile(model, X, regions=["b", "c"])
    assert [r.name for r in prog.regions] == ["b", "c"]
    prog = fxprune.compile(model, X, exclude=["b"])
    assert [r.name for r in prog.regions] == ["a", "c"] and prog.rejected["b"] == "excluded"
    with pytest.raises(fxprune.RegionError, match="no submodule 'nope'"):
        fxprune.compile(model, X, regions=["nope"])
    with pytest.raises(fxprune.RegionError, match="overlap"):
        fxprune.compile(model, X, regions=["a", "a.0"])
    with pytest.raises(fxprune.RegionError, match="'head' cannot be a region: called with different non-tensor"):
        fxprune.compile(Twice().eval(), X, regions=["head"])


class Twice(nn.Module):
    """One block called on two inputs of the same shape, and a head with a flag that differs
    between its calls."""

    def __init__(self):
        super().__init__()
        self.shared = block(3, 8)
        self.head = Head()

    def forward(self, x):
        y = self.shared(x) + self.shared(x.flip(-1))
        if y.mean() > -1e9:
            y = y * 1.0
        return self.head(y, scale=True) + self.head(y, scale=False)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x, scale: bool = False):
        y = self.conv2(torch.relu(self.conv1(x)))
        return y * 2 if scale else y


class ScaledHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = block(3, 8)
        self.head = Head()

    def forward(self, x):
        y = self.stem(x)
        if y.sum() > -1e9:
            y = y + 1
        return self.head(y, scale=True)


def test_modules_called_twice():
    model = Twice().eval()
    prog = fxprune.compile(model, X)
    shared = next(r for r in prog.regions if r.name == "shared")
    assert shared.calls == 2 and len(shared.recorded) == 2
    assert "different non-tensor inputs" in prog.rejected["head"]
    r = check_equivalence(model, X)
    assert r.max_rel_diff <= 1e-12


class Shared(nn.Module):
    """``tied`` is used by two regions; ``outside``'s weight is also read by the root's code."""

    def __init__(self):
        super().__init__()
        tied = nn.Conv2d(8, 8, 1)
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), tied, nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), tied, nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.outside = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1))

    def forward(self, x):
        x = self.a(x)
        if x.sum() > -1e9:
            x = self.b(x)
        x = self.outside(x)
        return x * self.outside[0].weight.mean()


def test_shared_parameters_freeze_what_they_touch():
    model = Shared().eval()
    prog = fxprune.compile(model, X)
    assert {r.name for r in prog.regions} >= {"a", "b"}
    touched = [g for g in prog.groups if any(p.startswith(("a.2.", "b.2.")) for p in g.params)]
    assert touched and all(not g.prunable and "shared with" in g.reason for g in touched)
    out = next((r for r in prog.regions if r.name == "outside"), None)
    if out is not None:
        g = [g for g in out.program.groups if "0.weight" in g.params]
        assert g and all(not x.prunable and "module '<root>'" in x.reason for x in g)
    r = check_equivalence(model, X)
    assert r.max_rel_diff <= 1e-12


def test_region_calls_check_their_constants():
    model = DataDependent().eval()
    prog = fxprune.compile(model, X)
    region = prog.module.a
    assert torch.equal(region(X), model.a(X)) and torch.equal(region(input=X), model.a(X))
    spec = region.region_call
    assert spec.names == ["input"] and spec.num_tensors == 1
    with pytest.raises(fxprune.RegionError, match="region 'a'"):
        region(X, X)
    head = fxprune.compile(Head().eval(), torch.randn(2, 8, 16, 16), regions=["conv1"]).module
    scaled = fxprune.compile(ScaledHead().eval(), X).module.head
    assert scaled.region_call.constants[-1] is True
    with pytest.raises(fxprune.RegionError, match="constant argument #1 = True, called with False"):
        scaled(torch.randn(2, 8, 16, 16), scale=False)
    assert isinstance(head.conv1, RegionGraphModule)
    # another spatial size: a symbolic trace is shape-generic
    big = torch.randn(1, 3, 24, 24)
    assert torch.allclose(prog.module(big), model(big))


def test_save_and_export_refuse_a_region_model_and_take_a_region(tmp_path):
    model = DataDependent().eval()
    prog = fxprune.compile(model, X)
    prog.zero_(random_masks(prog))
    slim = prog.construct_subnet()
    with pytest.raises(fxprune.UnsupportedInputError, match="region-compiled model.*each slim region"):
        fxprune.save(slim, tmp_path / "slim")
    with pytest.raises(fxprune.UnsupportedInputError, match="region-compiled model"):
        fxprune.export(slim, X, tmp_path / "slim.pt2", format="pt2")
    region = slim.get_submodule("b")
    fxprune.save(region, tmp_path / "b")
    loaded = fxprune.load(tmp_path / "b")
    inputs = prog.regions[1].example_inputs
    assert torch.allclose(loaded(*inputs), region(*inputs))
    result = fxprune.export(region, inputs, tmp_path / "b.pt2", format="pt2")
    assert result.max_abs_diff <= 1e-5


def test_summary_dot_and_dump(tmp_path):
    prog = fxprune.compile(LeavesTorch().eval(), X)
    text = prog.summary()
    assert "Region('stem', fx" in text and "not a region: <root>" in text
    dot = prog.to_dot(str(tmp_path / "g.dot"))
    assert "cluster_region_0" in dot and '"stem:' in dot and "group 0" in dot
    written = prog.dump(str(tmp_path / "ir"))
    assert any("stem" in w for w in written) and any("head" in w for w in written)
    assert "RegionProgram(LeavesTorch, regions=2" in repr(prog)
    with pytest.raises(fxprune.FxPruneError, match="one analysis per region"):
        prog.analysis


def test_nothing_traces_gives_a_trace_error():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    with pytest.raises(fxprune.TraceError, match="Region compile found no submodule"):
        fxprune.compile(Opaque().eval(), X)


def test_dhspg_trains_a_region_program():
    torch.manual_seed(0)
    model = DataDependent()
    prog = fxprune.compile(model.eval(), X)
    model.train()
    opt = fxprune.DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=2, pruning_steps=4)
    target = torch.randn(2, 8, 16, 16)
    for _ in range(10):
        opt.zero_grad()
        loss = ((prog.module(X) - target) ** 2).mean()
        loss.backward()
        opt.step()
    zero = prog.zero_channels()
    assert sum(int(z.sum()) for z in zero.values()) == opt.target_channels
    prog.module.eval()
    slim = prog.construct_subnet()
    assert torch.allclose(slim(X), prog.module(X), atol=1e-5)
    # the user's model was trained: it shares the program's parameters
    assert torch.equal(model.b[0].weight, prog.module.get_parameter("b.0.weight"))


def test_h2spg_erases_operators_of_a_region_program():
    class Cell(nn.Module):
        def __init__(self):
            super().__init__()
            self.ops = nn.ModuleList([block(8, 8) for _ in range(3)])

        def forward(self, x):
            return x + sum(op(x) for op in self.ops)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = block(3, 8)
            self.cell = Cell()
            self.head = block(8, 4)

        def forward(self, x):
            x = self.cell(self.stem(x))
            if x.sum() > -1e9:
                x = x * 1.0
            return self.head(x)

    torch.manual_seed(0)
    model = Net().eval()
    prog = fxprune.compile(model, X, mode="erase")
    cell = next(r for r in prog.regions if r.name == "cell")
    assert len(cell.erasables) >= 3 and all(prog.erasables[e].params[0].startswith("cell.") for e in cell.erasables)
    opt = fxprune.H2SPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=1, pruning_steps=3)
    target = torch.randn(2, 4, 16, 16)
    for _ in range(8):
        opt.zero_grad()
        ((prog.module(X) - target) ** 2).mean().backward()
        opt.step()
    erased = prog.zero_erasables()
    assert erased
    slim = prog.construct_subnet()
    assert torch.allclose(slim(X), prog.module(X), atol=1e-5)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in prog.module.parameters())


def test_auto_train_once_on_a_region_program():
    from fxprune.ato import ATO

    torch.manual_seed(0)
    model = DataDependent()
    prog = fxprune.compile(model.eval(), X)
    target = torch.randn(2, 8, 16, 16)
    data = [(X, target)]
    ato = ATO(prog, 0.6, total_steps=12, controller_every=1, controller_lr=1e-2,
              loss_fn=lambda out, t: ((out - t) ** 2).mean(), controller_data=data)
    assert ato.gated.group_ids == [g.id for g in prog.groups if g.prunable]
    full = ato.flops.full
    assert full > ato.flops.fixed >= 0
    # the region FLOPs model agrees with torch's flop counter on the slim model
    opt = torch.optim.SGD(prog.module.parameters(), lr=0.01)
    model.train()
    for _ in range(12):
        opt.zero_grad()
        ((prog.module(X) - target) ** 2).mean().backward()
        opt.step()
        ato.step(opt)
    prog.module.eval()
    slim = ato.finalize()
    rep = fxprune.report(prog.module, slim, (X,))
    assert abs(rep.flops_slim / rep.flops_full - ato.flops_ratio()) < 0.02
    assert abs(ato.flops_ratio() - 0.6) < 0.1
    with ato.gated.gated(None):
        assert torch.allclose(ato.gated(X), prog.module(X))


def test_a_child_called_from_outside_freezes_its_parameters():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(block(3, 8), block(8, 8))
            self.head = block(8, 4)

        def forward(self, x):
            y = self.backbone(x)
            if y.sum() > -1e9:
                y = y + self.backbone[1](y)  # a child of the backbone, called from outside it
            return self.head(y)

    model = Outer().eval()
    prog = fxprune.compile(model, X)
    assert {"backbone", "head"} <= {r.name for r in prog.regions}
    touched = [g for g in prog.groups if any(p.startswith("backbone.1.") for p in g.params)]
    assert touched and all(not g.prunable for g in touched)
    assert any("called from outside the region" in g.reason for g in touched)
    assert _inner_prunable(prog, "backbone.0.0.weight")
    r = check_equivalence(model, X)
    assert r.params_slim < r.params_full


def _inner_prunable(prog, param):
    return next(g for g in prog.groups if param in g.params).prunable
