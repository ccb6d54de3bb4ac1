"""H2SPG (OTOv3): the hierarchical partition never breaks the network, the target is met
exactly, the scores are averaged over the warm-up, and the trained model's slim version is exact.

The validity check: random architectures drawn with hypothesis (random DAGs of operators
joined by sums and concats, one or two inputs, one or several outputs), 200 random score
orders in the fast tier; for every chosen set the erasure is checked independently of the
planner: the zeroed full model and the constructed slim model agree (float64), and every input
of the slim graph still reaches its output (networkx).
"""
from __future__ import annotations

import copy
import math
from typing import List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fxprune
import fxprune.optim.h2spg as h2spg_mod
from models_zoo_small import inputs_reaching_output
from fxprune.optim.h2spg import select_units, unit_saliency
from fxprune.program import max_output_difference
from fxprune.supernet import DartsSupernet
from fxprune.testing import randomize_norms


# ----------------------------------------------------------------------------------------------
# random DAGs
# ----------------------------------------------------------------------------------------------


class Edge(nn.Module):
    def __init__(self, kind: str, c: int):
        super().__init__()
        if kind == "conv":
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        elif kind == "sep":
            self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Conv2d(c, c, 1),
                                      nn.BatchNorm2d(c))
        elif kind == "pool":
            self.body = nn.MaxPool2d(3, 1, 1)
        else:
            self.body = nn.Identity()

    def forward(self, x):
        return self.body(x)


class RandomDAG(nn.Module):
    """Node ``j`` combines edges ``(pred, kind)`` from earlier nodes by a sum, or by a concat
    followed by a 1x1 conv (``fix="conv"``) or a BatchNorm-ReLU-1x1 conv (``fix="bn"``)."""

    def __init__(self, spec, two_inputs: bool = False, head: str = "last", c: int = 4):
        super().__init__()
        self.spec = spec
        self.two_inputs = two_inputs
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c))
        self.stem2 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c)) if two_inputs else None
        self.edges = nn.ModuleList()
        self.fix = nn.ModuleList()
        for combine, ins, fix in spec:
            self.edges.append(nn.ModuleList([Edge(k, c) for _, k in ins]))
            n = len(ins) * c
            if combine == "sum":
                self.fix.append(nn.Identity())
            elif fix == "bn":
                self.fix.append(nn.Sequential(nn.BatchNorm2d(n), nn.ReLU(), nn.Conv2d(n, c, 1)))
            else:
                self.fix.append(nn.Sequential(nn.Conv2d(n, c, 1), nn.BatchNorm2d(c)))
        n_nodes = len(spec) + (2 if two_inputs else 1)
        used = {p for _, ins, _ in spec for p, _ in ins}
        self.sinks = [i for i in range(n_nodes) if i not in used] if head == "all" else [n_nodes - 1]
        self.fc = nn.Linear(c * len(self.sinks), 5)

    def forward(self, x, x2):
        states = [self.stem(x)] + ([self.stem2(x2)] if self.two_inputs else [])
        for (combine, ins, _), edges, fix in zip(self.spec, self.edges, self.fix):
            outs = [e(states[p]) for (p, _), e in zip(ins, edges)]
            if combine == "sum":
                y = outs[0]
                for o in outs[1:]:
                    y = y + o
            else:
                y = fix(torch.cat(outs, 1))
            states.append(y)
        feats = torch.cat([states[i] for i in self.sinks], 1)
        return self.fc(feats.mean((2, 3)))


@st.composite
def dag_models(draw):
    two = draw(st.booleans())
    base = 2 if two else 1
    spec = []
    for j in range(draw(st.integers(2, 5))):
        k = draw(st.integers(1, 3))
        preds = draw(st.lists(st.integers(0, base + j - 1), min_size=k, max_size=k))
        kinds = draw(st.lists(st.sampled_from(["conv", "sep", "conv", "pool", "id"]), min_size=k, max_size=k))
        combine, fix = draw(st.sampled_from(["sum", "cat"])), draw(st.sampled_from(["bn", "conv"]))
        spec.append((combine, list(zip(preds, kinds)), fix))
    return spec, two, draw(st.sampled_from(["last", "all"]))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64),
            torch.randn(1, 3, 6, 6, generator=g, dtype=torch.float64))


def _check_erasure(prog, chosen: List[int]) -> None:
    """Independent of the planner: zero ``chosen``, construct, compare, check connectivity."""
    saved = {k: v.clone() for k, v in prog.module.state_dict().items()}
    try:
        prog.zero_(erasables=chosen)
        assert set(chosen) <= set(prog.zero_erasables())
        slim = prog.construct_subnet(verify=False)
        removed = {n for e in chosen for n in prog.erasables[e].nodes}
        assert not removed & {n.name for n in slim.graph.nodes}, "a chosen operator was not erased"
        diff, scale = max_output_difference(prog.module, slim, prog.example_inputs)
        assert diff <= 1e-6 * max(scale, 1e-12), f"slim differs: {diff:.3e}"
        assert inputs_reaching_output(slim) == inputs_reaching_output(prog.module), "an input no longer reaches the output"
    finally:
        prog.module.load_state_dict(saved)


def _check_orders(data, spec, two, head, orders: int, construct_every: int) -> None:
    torch.manual_seed(0)
    model = RandomDAG(spec, two, head).double().eval()
    randomize_norms(model)
    prog = fxprune.compile(model, _inputs(), mode="erase")
    eg = prog.erase_graph
    ids = [e.id for e in prog.erasables]
    assume(ids)  # a DAG without erasable operators has nothing to order
    for k in range(orders):
        scores = data.draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=len(ids), max_size=len(ids)))
        target = data.draw(st.integers(0, len(ids)))
        chosen = select_units(eg, ids, scores, target_units=target)
        assert len(chosen) <= target
        assert eg.plan(chosen).valid
        # short of the target only when no further unit fits
        if len(chosen) < target:
            for u in ids:
                if u not in chosen:
                    bigger = eg.closure(set(chosen) | {u})
                    assert len(bigger) > target or not eg.plan(bigger).valid
        if k % construct_every == 0:
            _check_erasure(prog, chosen)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=dag_models(), data=st.data())
def test_partition_keeps_random_dags_valid(model, data):
    """20 random DAGs x 10 random score orders = 200 orders, every chosen set erased and checked
    (100 DAGs in the slow tier)."""
    spec, two, head = model
    _check_orders(data, spec, two, head, orders=10, construct_every=1)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=dag_models(), data=st.data())
def test_partition_keeps_random_dags_valid_exhaustive(model, data):
    spec, two, head = model
    _check_orders(data, spec, two, head, orders=10, construct_every=1)


def test_disconnecting_unit_is_never_chosen():
    """out = a(x) + b(x) with a residual c: scores a > b > c, target 2 -> {a, c}; b would
    leave the sum without inputs."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.a = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
            self.c = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            x = self.stem(x)
            y = torch.relu(self.a(x) + self.b(x))
            return self.fc((y + self.c(y)).mean((2, 3)))

    prog = fxprune.compile(Net().eval(), torch.randn(1, 3, 6, 6), mode="erase")
    eg = prog.erase_graph
    a, b, c = (next(e.id for e in prog.erasables if e.nodes[0].startswith(p)) for p in ("a_", "b_", "c_"))
    assert select_units(eg, [a, b, c], [0.9, 0.8, 0.1], target_units=2) == sorted([a, c])
    assert select_units(eg, [a, b, c], [0.9, 0.8, 0.1], target_units=3) == sorted([a, c])
    assert not eg.plan([a, b]).valid and "reads" in eg.plan([a, b]).reason


# ----------------------------------------------------------------------------------------------
# the optimizer
# ----------------------------------------------------------------------------------------------


def _data(n: int = 16, side: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(prog, opt, steps: int, x, y, batch: int = 8):
    model = prog.module.train()
    for t in range(steps):
        i = (t * batch) % len(x)
        xb, yb = x[i:i + batch], y[i:i + batch]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def _supernet_prog(seed: int = 0, **kw):
    torch.manual_seed(seed)
    net = DartsSupernet(num_classes=5, width=4, **kw)
    return net, fxprune.compile(net.eval(), torch.randn(1, 3, 32, 32), mode="erase")


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_exact_target_and_exact_slim(variant):
    net, prog = _supernet_prog()
    x, y = _data()
    opt = fxprune.H2SPG(prog, lr=0.05 if variant == "sgd" else 1e-3, variant=variant, target_group_sparsity=0.4,
                        start_pruning_step=3, pruning_steps=5)
    assert opt.target_units == math.floor(0.4 * 45)
    _train(prog, opt, 3, x, y)
    assert opt.chosen == [] and opt.metrics()["erased_units"] == 0
    _train(prog, opt, 7, x, y)
    assert len(opt.chosen) == opt.target_units
    assert sorted(opt.erased()) == opt.chosen == sorted(set(opt.chosen) & set(prog.zero_erasables()))
    assert prog.erase_graph.plan(opt.chosen).valid
    m = opt.metrics()
    assert m["erased_units"] == m["target_units"] == 18
    slim = prog.construct_subnet()  # verified against the full model
    assert len(slim.graph.nodes) < len(prog.module.graph.nodes)
    # it stays zero afterwards
    _train(prog, opt, 2, x, y)
    assert set(opt.chosen) <= set(prog.zero_erasables())


def test_fused_kernels_match_the_stock_step():
    """Warm-up (scores every step, nothing shrinks), partition and pruning steps take the same
    values with the fused kernels as with stock ops (float64, up to rounding)."""
    runs = []
    for fused in (False, True):
        net, prog = _supernet_prog()
        net.double()
        x, y = _data()
        opt = fxprune.H2SPG(prog, lr=0.05, target_group_sparsity=0.4, start_pruning_step=3, pruning_steps=3,
                            fused=fused)
        assert opt.fused is fused
        before = [p.detach().clone() for p in prog.module.parameters()]
        _train(prog, opt, 7, x.double(), y)
        after = list(prog.module.named_parameters())
        assert all(p.dtype == torch.float64 for _, p in after)
        assert sum(not torch.equal(p0, p) for p0, (_, p) in zip(before, after)) > len(before) // 2
        runs.append((after, opt))
    (a, oa), (b, ob) = runs
    assert oa.chosen == ob.chosen and len(ob.chosen) == ob.target_units
    assert torch.equal(oa.projected, ob.projected)
    for (n, p), (_, q) in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=n)


def test_partition_uses_momentum_averaged_scores(monkeypatch):
    seen, passed = [], {}
    real_saliency, real_select = h2spg_mod.unit_saliency, h2spg_mod.select_units

    def spy_saliency(*a):
        s = real_saliency(*a)
        seen.append(s.clone())
        return s

    def spy_select(eg, cands, scores, **kw):
        passed["scores"] = list(scores)
        return real_select(eg, cands, scores, **kw)

    monkeypatch.setattr(h2spg_mod, "unit_saliency", spy_saliency)
    monkeypatch.setattr(h2spg_mod, "select_units", spy_select)
    net, prog = _supernet_prog()
    x, y = _data()
    opt = fxprune.H2SPG(prog, lr=0.05, target_group_sparsity=0.3, start_pruning_step=4, pruning_steps=2,
                        score_momentum=0.7)
    _train(prog, opt, 5, x, y)
    assert len(seen) == 5  # 4 warm-up steps + the partition step
    avg = seen[0]
    for s in seen[1:]:
        avg = 0.7 * avg + 0.3 * s
    assert torch.allclose(torch.tensor(passed["scores"], dtype=avg.dtype), avg)
    assert torch.allclose(opt.scores, avg)


def test_unit_saliency_formula():
    xx = torch.tensor([4.0, 1.0, 9.0, 0.0], dtype=torch.float64)
    xd = torch.tensor([2.0, -1.0, 3.0, 0.0], dtype=torch.float64)
    dd = torch.tensor([1.0, 4.0, 1.0, 0.0], dtype=torch.float64)
    n = torch.tensor([2.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    s = unit_saliency(xx, xd, dd, n)
    cos = torch.tensor([2 / (2 * 1), -1 / (1 * 2), 3 / (3 * 1)], dtype=torch.float64)
    inv = 1 / (xx[:3].sqrt() / n[:3] + 1e-6)
    want = 0.5 * cos / cos.norm() + 0.5 * inv / inv.norm()
    assert torch.allclose(s[:3], want) and s[3] == -math.inf


def test_flops_target():
    net, prog = _supernet_prog()
    x, y = _data()
    opt = fxprune.H2SPG(prog, lr=0.05, target_group_sparsity=0.5, target="flops", start_pruning_step=1,
                        pruning_steps=3)
    _train(prog, opt, 5, x, y)
    plan = prog.erase_graph.plan(opt.chosen)
    assert plan.valid and 0 < plan.flops <= opt.flops_budget
    assert set(opt.chosen) <= set(prog.zero_erasables())


def test_densenet_shared_slices():
    """A DenseNet layer's erasure zeroes the later layers' BatchNorm entries of its channels,
    which belong to those layers' own units: they are zeroed and kept zero too."""
    torch.manual_seed(0)
    net = torchvision.models.DenseNet(growth_rate=4, block_config=(3, 3), num_init_features=8, bn_size=2,
                                      num_classes=5)
    prog = fxprune.compile(net.eval(), torch.randn(1, 3, 16, 16), mode="erase")
    x, y = _data(side=16)
    opt = fxprune.H2SPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=2, pruning_steps=4)
    assert opt._shared  # rows owned by one unit and zeroed with another
    _train(prog, opt, 8, x, y)
    assert len(opt.chosen) == opt.target_units == 3
    assert set(opt.chosen) <= set(prog.zero_erasables())
    slim = prog.construct_subnet()
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in prog.module.parameters())


def test_state_dict_resume_is_bit_exact():
    x, y = _data()
    net_a, prog_a = _supernet_prog()
    opt_a = fxprune.H2SPG(prog_a, lr=0.05, target_group_sparsity=0.3, start_pruning_step=2, pruning_steps=4)
    _train(prog_a, opt_a, 3, x, y)
    sd_model = copy.deepcopy(prog_a.module.state_dict())
    sd_opt = copy.deepcopy(opt_a.state_dict())
    _train(prog_a, opt_a, 4, x, y)

    net_b, prog_b = _supernet_prog(seed=1)
    prog_b.module.load_state_dict(sd_model)
    opt_b = fxprune.H2SPG(prog_b, lr=0.05, target_group_sparsity=0.3, start_pruning_step=2, pruning_steps=4)
    opt_b.load_state_dict(sd_opt)
    _train(prog_b, opt_b, 4, x, y)
    assert opt_a.chosen == opt_b.chosen
    for (k, a), b in zip(prog_a.module.state_dict().items(), prog_b.module.state_dict().values()):
        assert torch.equal(a, b), k


def test_arguments():
    net, prog = _supernet_prog()
    with pytest.raises(ValueError):
        fxprune.H2SPG(prog, lr=0.1, target="params")
    with pytest.raises(ValueError):
        fxprune.H2SPG(prog, lr=0.1, target_group_sparsity=1.0)
    with pytest.raises(ValueError, match="mode='erase'"):
        fxprune.H2SPG(fxprune.compile(net, torch.randn(1, 3, 32, 32)), lr=0.1)
    opt = fxprune.H2SPG(prog, lr=0.1, target_group_sparsity=0.0)
    x, y = _data()
    _train(prog, opt, 2, x, y)
    assert opt.chosen == [] and prog.zero_erasables() == []
    sub = fxprune.H2SPG(prog, lr=0.1, target_group_sparsity=0.5, erasables=[0, 1, 2, 3])
    assert sub.target_units == 2
    # a network without erasable operators trains as with the base optimizer
    chain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5))
    p2 = fxprune.compile(chain, torch.randn(1, 3, 6, 6), mode="erase")
    assert p2.erasables == []
    o2 = fxprune.H2SPG(p2, lr=0.1, target_group_sparsity=0.5, start_pruning_step=1, pruning_steps=2)
    before = chain[3].weight.detach().clone()
    _train(p2, o2, 3, torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,)))
    assert o2.chosen == [] and not torch.equal(before, chain[3].weight)


def test_train_cli_erase_mode(tmp_path):
    """``fxprune train --mode erase`` on the super-network: H2SPG, exact slim model."""
    import json

    from fxprune.cli import main

    args = ["train", "--mode", "erase", "--model", "fxprune.supernet:darts_supernet", "--train-subset", "96",
            "--test-subset", "48", "--batch-size", "32", "--epochs", "2", "--lr", "0.05",
            "--start-pruning-epoch", "0.34", "--pruning-epochs", "1", "--target-group-sparsity", "0.3",
            "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "report.json") as f:
        rep = json.load(f)
    assert rep["erased_operators"] == math.floor(0.3 * 45) and rep["erasable_operators"] == 45
    assert rep["accuracy"]["equal"] and rep["max_abs_output_diff"] < 1e-4
    assert rep["flops"]["slim"] < rep["flops"]["full"] and rep["config"]["mode"] == "erase"
