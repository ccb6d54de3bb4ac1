"""Tests of fxprune.optim.DHSPG (OTOv2's dual half-space projected gradient).

Covers: the exact sparsity target over models x variants x targets (never above it, met at
the end of the pruning phase, then construct_subnet), agreement with torch.optim outside the
pruning phase, agreement with a channel-by-channel reference implementation of the DHSPG
formulas inside it, bit-identical resume from a torch.save'd state dict, zero channels that
stay zero, metrics, and the corner cases (capped target, several learning rates, frozen
parameters).
"""
from __future__ import annotations

import copy
import io
import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxprune
from fxprune.optim import DHSPG

# --------------------------------------------------------------------------- models and data


class ConvNet(nn.Module):
    """Residual add, concat, a depthwise conv and a Linear head: several kinds of group."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.c2 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 6, 1)
        self.dw = nn.Conv2d(14, 14, 3, padding=1, groups=14)
        self.c3 = nn.Conv2d(14, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.c1(x)))
        x = F.relu(x + self.bn2(self.c2(y)))
        x = torch.cat([x, F.relu(self.branch(x))], 1)
        x = F.relu(self.dw(x))
        x = F.relu(self.bn3(self.c3(x)))
        return self.fc(x.mean((2, 3)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 32)
        self.l2 = nn.Linear(32, 16)
        self.l3 = nn.Linear(16, 5)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(F.relu(self.l1(x)))))


class Mixed(nn.Module):
    """Parameters the fused kernels do not take whole: ``x @ w`` (channels along dim 1 of ``w``),
    a transposed convolution (out channels along dim 1), 1-d bias and layer scale."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(20, 24) * 0.2)
        self.b = nn.Parameter(torch.zeros(24))
        self.gamma = nn.Parameter(torch.ones(24))
        self.up = nn.ConvTranspose1d(1, 6, 3, padding=1)
        self.l2 = nn.Linear(30, 16)
        self.l3 = nn.Linear(16, 5)

    def forward(self, x):
        h = F.relu(x @ self.w + self.b) * self.gamma
        u = F.relu(self.up(x[:, None, :])).mean(2)
        return self.l3(F.relu(self.l2(torch.cat([h, u], 1))))


def _resnet18():
    return torchvision.models.resnet18(num_classes=10)


MODELS = {
    # name: (factory, input shape, classes, batch)
    "convnet": (ConvNet, (3, 8, 8), 10, 4),
    "mlp": (MLP, (20,), 5, 8),
    "mixed": (Mixed, (20,), 5, 8),
    "resnet18": (_resnet18, (3, 32, 32), 10, 2),
}


def make(name: str, seed: int = 0, dtype=torch.float32):
    factory, shape, _, _ = MODELS[name]
    torch.manual_seed(seed)
    model = factory().to(dtype)
    prog = fxprune.compile(model, (torch.randn(1, *shape, dtype=dtype),))
    return model, prog


def batch(name: str, step: int, dtype=torch.float32):
    """The batch of a given step: a pure function of (model, step) so that runs can be replayed."""
    _, shape, classes, n = MODELS[name]
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, *shape, generator=gen).to(dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def train_step(model, opt, name, step, dtype=torch.float32):
    x, y = batch(name, step, dtype)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def producer_entries(prog, gid, channel):
    """(param name, dim, positions) of one channel in each producer slice of group ``gid``."""
    g = prog.groups[gid]
    return [(s.param, s.dim, s.index[s.channel == channel]) for s in g.slices]


def zero_channel_count(prog) -> int:
    return int(sum(z.sum() for z in prog.zero_channels().values()))


# --------------------------------------------------------------------------- exact target

CASES = [(m, v, t) for m in ("convnet", "mlp") for v in ("sgd", "adam", "adamw")
         for t in (0.3, 0.5, 0.7)]
CASES += [("resnet18", "sgd", 0.3), ("resnet18", "adam", 0.5), ("resnet18", "adamw", 0.7)]


@pytest.mark.parametrize("name,variant,target", CASES)
def test_exact_target_then_construct(name, variant, target):
    model, prog = make(name)
    start, steps = 1, 3
    lr = 0.05 if variant == "sgd" else 0.01
    opt = DHSPG(prog, lr=lr, variant=variant, target_group_sparsity=target,
                start_pruning_step=start, pruning_steps=steps, weight_decay=1e-4)
    C = sum(g.size for g in prog.groups if g.prunable)
    K = opt.target_channels
    assert K == int(Fraction(str(target)) * C)
    for t in range(start + steps + 1):
        train_step(model, opt, name, t)
        m = opt.metrics()
        assert m["zero_channels"] <= K and m["projected_channels"] <= K
        if t < start:
            assert m["zero_channels"] == 0 and m["redundant_channels"] == 0
        else:
            assert m["redundant_channels"] == K
            # Linear quota of the default schedule: floor(K (k+1) / P) after pruning step k.
            k = min(t - start, steps - 1)
            assert m["projected_channels"] >= (K * (k + 1)) // steps
    m = opt.metrics()
    assert abs(m["zero_channels"] - K) <= 1 and m["projected_channels"] == K
    assert m["group_sparsity"] == pytest.approx(m["zero_channels"] / C)
    assert m["norm_redundant"] == 0.0 and m["norm_important"] > 0.0
    # Only redundant channels are zero, and the program sees exactly the projected ones.
    assert bool((opt.projected <= opt.redundant).all())
    zeros = prog.zero_channels()
    masks = opt.masks()
    for gid, zero in zeros.items():
        assert (torch.as_tensor(zero) == ~masks[gid]).all()
        assert not zero.all(), f"group {gid} lost every channel"
    model.eval()
    slim = prog.construct_subnet()  # verifies against prog.module
    n_full = sum(p.numel() for p in model.parameters())
    n_slim = sum(p.numel() for p in slim.parameters())
    assert n_slim < n_full


def test_final_schedule_projects_on_last_step():
    model, prog = make("convnet")
    opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=4,
                projection_schedule="final")
    K = opt.target_channels
    for t in range(4):
        train_step(model, opt, "convnet", t)
        assert opt.metrics()["projected_channels"] <= K
    assert opt.metrics()["zero_channels"] == K


# --------------------------------------------------------------------------- base variants


@pytest.mark.parametrize("variant", ["sgd", "sgd-nesterov", "sgd-nomomentum", "adam", "adamw"])
def test_plain_phase_equals_torch(variant):
    """Before start_pruning_step DHSPG is exactly its base optimizer."""
    model, prog = make("convnet", dtype=torch.float64)
    ref = copy.deepcopy(model)
    kw = dict(lr=0.05, weight_decay=1e-3)
    if variant == "sgd":
        opt = DHSPG(prog, variant="sgd", momentum=0.9, start_pruning_step=100, **kw)
        tor = torch.optim.SGD(ref.parameters(), momentum=0.9, **kw)
    elif variant == "sgd-nesterov":
        opt = DHSPG(prog, variant="sgd", momentum=0.9, nesterov=True, start_pruning_step=100, **kw)
        tor = torch.optim.SGD(ref.parameters(), momentum=0.9, nesterov=True, **kw)
    elif variant == "sgd-nomomentum":
        opt = DHSPG(prog, variant="sgd", momentum=0.0, start_pruning_step=100, **kw)
        tor = torch.optim.SGD(ref.parameters(), momentum=0.0, **kw)
    elif variant == "adam":
        opt = DHSPG(prog, variant="adam", start_pruning_step=100, **kw)
        tor = torch.optim.Adam(ref.parameters(), **kw)
    else:
        opt = DHSPG(prog, variant="adamw", start_pruning_step=100, **kw)
        tor = torch.optim.AdamW(ref.parameters(), **kw)
    for t in range(5):
        train_step(model, opt, "convnet", t, torch.float64)
        train_step(ref, tor, "convnet", t, torch.float64)
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)


def test_defaults_follow_reference():
    _, prog = make("mlp")
    sgd = DHSPG(prog, lr=0.1)
    assert (sgd.lmbda, sgd.lmbda_amplify, sgd.hat_lmbda_coeff) == (1e-3, 2.0, 10.0)
    for v in ("adam", "adamw"):
        o = DHSPG(prog, lr=0.1, variant=v)
        assert (o.lmbda, o.lmbda_amplify, o.hat_lmbda_coeff) == (1e-2, 20.0, 1e3)
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.target_group_sparsity == 0.5
    with pytest.raises(ValueError):
        DHSPG(prog, lr=0.1, variant="rmsprop")
    with pytest.raises(ValueError):
        DHSPG(prog, lr=0.1, target_group_sparsity=1.0)
    with pytest.raises(ValueError):
        DHSPG(prog, lr=0.1, pruning_steps=0)
    with pytest.raises(ValueError):
        DHSPG(prog, lr=0.1, epsilon=1.0)


# --------------------------------------------------------------------------- reference math


def _reference_run(model, prog, name, steps, *, lr, momentum, target, start, pruning_steps,
                   epsilon, lmbda, amplify, hat, dtype, partition):
    """DHSPG (SGD variant) written channel by channel from the documented formulas."""
    params = dict(prog.module.named_parameters())
    groups = [g for g in prog.groups if g.prunable]
    chans = [(g, c) for g in groups for c in range(g.size)]
    C = len(chans)
    K = math.floor(target * C)
    bufs = {}
    redundant, projected = None, set()

    def gather(tensors, gc):
        g, c = gc
        return torch.cat([tensors[s.param].index_select(s.dim, s.index[s.channel == c]).reshape(-1)
                          for s in g.slices])

    for t in range(steps):
        x, y = batch(name, t, dtype)
        for p in params.values():
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            d = {}
            for n, p in params.items():
                if n not in bufs:
                    bufs[n] = p.grad.clone()
                else:
                    bufs[n] = momentum * bufs[n] + p.grad
                d[n] = bufs[n]
            new = {n: p - lr * d[n] for n, p in params.items()}
            if K and start <= t < start + pruning_steps:
                xs = [gather(params, gc) for gc in chans]
                ds = [gather(d, gc) for gc in chans]
                if redundant is None:
                    cos = torch.stack([torch.dot(a, b) / (a.norm() * b.norm()) for a, b in zip(xs, ds)])
                    inv = torch.stack([1.0 / (a.norm() / a.numel() + 1e-6) for a in xs])
                    sal = 0.5 * cos / cos.norm() + 0.5 * inv / inv.norm()
                    members = [[i for i, (h, _) in enumerate(chans) if h is g] for g in groups]
                    if partition == "global":
                        protected = {min(idx, key=lambda i: (float(sal[i]), i)) for idx in members}
                        order = sorted((i for i in range(C) if i not in protected),
                                       key=lambda i: -float(sal[i]))
                        redundant = set(order[:K])
                    else:
                        # floor(r * size) per group, then one more for the largest remainders.
                        quota = [math.floor(target * len(idx)) for idx in members]
                        by_rest = sorted(range(len(groups)),
                                         key=lambda j: (quota[j] - target * len(members[j]), j))
                        for j in by_rest[:K - sum(quota)]:
                            quota[j] += 1
                        redundant = set()
                        for idx, q in zip(members, quota):
                            redundant |= set(sorted(idx, key=lambda i: (-float(sal[i]), i))[:q])
                rows = {}
                for i in sorted(redundant - projected):
                    xg, dg = xs[i], ds[i]
                    nx, xd = xg.norm(), torch.dot(xg, dg)
                    lam = torch.tensor(lmbda, dtype=dtype)
                    if xd < 0:
                        lo = -xd / nx
                        hi = -dg.dot(dg) * nx / xd
                        lam = torch.clamp(amplify * lo, lmbda, hat * lmbda)
                        if lam >= hi:
                            lam = (lo + hi) / 2
                    trial = xg - lr * dg - lr * lam * xg / nx
                    rows[i] = (lam / nx, float(trial.dot(xg) / xg.dot(xg)))
                proj = {i for i, (_, r) in rows.items() if r < epsilon}
                k = t - start
                quota = K * (k + 1) // pruning_steps
                missing = quota - len(projected) - len(proj)
                if missing > 0:
                    rest = sorted((i for i in rows if i not in proj), key=lambda i: rows[i][1])
                    proj |= set(rest[:missing])
                projected |= proj
                for i, (c_g, _) in rows.items():
                    if i in proj:
                        continue
                    g, c = chans[i]
                    for s in g.slices:
                        pos = s.index[s.channel == c]
                        old = params[s.param].index_select(s.dim, pos)
                        cur = new[s.param].index_select(s.dim, pos)
                        new[s.param].index_copy_(s.dim, pos, cur - lr * c_g * old)
            for i in projected:
                g, c = chans[i]
                for s in g.slices:
                    pos = s.index[s.channel == c]
                    new[s.param].index_fill_(s.dim, pos, 0.0)
                    bufs[s.param].index_fill_(s.dim, pos, 0.0)
            for n, p in params.items():
                p.copy_(new[n])
    return redundant, projected


@pytest.mark.parametrize("fused", [False, True], ids=["stock", "fused"])
@pytest.mark.parametrize("epsilon,partition,target",
                         [(0.0, "global", 0.5), (0.9, "global", 0.5), (0.0, "uniform", 0.5),
                          (0.9, "uniform", 0.3)])
def test_matches_channelwise_reference(epsilon, partition, target, fused):
    dtype = torch.float64
    hyper = dict(lr=0.1, momentum=0.9, target=target, start=1, pruning_steps=4, epsilon=epsilon,
                 lmbda=0.05, amplify=2.0, hat=10.0, partition=partition)
    model, prog = make("convnet", dtype=dtype)
    ref_model, ref_prog = make("convnet", dtype=dtype)
    opt = DHSPG(prog, lr=hyper["lr"], momentum=hyper["momentum"],
                target_group_sparsity=hyper["target"], start_pruning_step=hyper["start"],
                pruning_steps=hyper["pruning_steps"], epsilon=epsilon, lmbda=hyper["lmbda"],
                lmbda_amplify=hyper["amplify"], hat_lmbda_coeff=hyper["hat"], partition=partition,
                fused=fused)
    steps = 6
    for t in range(steps):
        train_step(model, opt, "convnet", t, dtype)
    redundant, projected = _reference_run(ref_model, ref_prog, "convnet", steps, dtype=dtype, **hyper)
    assert set(torch.nonzero(opt.redundant).reshape(-1).tolist()) == redundant
    assert set(torch.nonzero(opt.projected).reshape(-1).tolist()) == projected
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


@pytest.mark.parametrize("variant,kw", [("sgd", {}), ("sgd", {"weight_decay": 1e-3}),
                                        ("sgd", {"nesterov": True}), ("adamw", {"weight_decay": 1e-2})],
                         ids=["sgd", "sgd-wd", "sgd-nesterov", "adamw"])
@pytest.mark.parametrize("name", ["resnet18", "mixed"])
def test_fused_kernels_match_the_stock_step(name, variant, kw):
    """``fused=True`` (C++ momentum, row reductions and update; the stock path for what the
    kernels do not take: Nesterov, Adam, channels along dim 1) takes the same steps as
    ``fused=False``, projections included (float64: the two paths round differently, and this
    toy training amplifies rounding about 1000-fold per step, so the run stops when the target
    is reached)."""
    runs = []
    for fused in (False, True):
        model, prog = make(name, dtype=torch.float64)
        opt = DHSPG(prog, lr=0.05, variant=variant, target_group_sparsity=0.5, start_pruning_step=1,
                    pruning_steps=3, epsilon=0.5, fused=fused, **kw)
        assert opt.fused is fused
        for t in range(4):
            train_step(model, opt, name, t, torch.float64)
        runs.append((model, opt))
    (a, oa), (b, ob) = runs
    assert torch.equal(oa.redundant, ob.redundant) and torch.equal(oa.projected, ob.projected)
    assert int(ob.projected.sum()) == ob.target_channels > 0
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        # relative to the tensor's scale: the amplified rounding of the large entries (|x| ~ 1e3
        # after four steps) is carried into the small ones by the momentum
        diff = (x - y).abs().max().item()
        assert diff <= 1e-6 * max(1.0, x.abs().max().item()), (n, diff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernels_match_torch_ops(dtype):
    """The kernels themselves, on tensors of several ranks and row lengths (a 100000-row
    tensor spans several parallel work items): momentum, row sums, deferred rows, scaled update."""
    from fxprune.optim import _fused

    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 3, 3), (256,), (5, 7), (100000, 1), (3, 2000)]
    xs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    gs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    bufs = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    starts = [0, 64, -1, 330, 100330]  # the third has no rows in the flat space
    R = 100333
    defer = torch.rand(R, generator=gen) < 0.5
    stats = torch.zeros(3, R, dtype=dtype)
    x1, b1 = [x.clone() for x in xs], [b.clone() for b in bufs]
    _fused.sgd_step(x1, gs, b1, starts, 0.9, 1e-3, 0.1, defer, stats)
    # written in place: autograd must see it, as with torch's in-place ops
    assert all(t._version == 1 for t in x1 + b1) and all(g._version == 0 for g in gs)
    scales = torch.rand(R, generator=gen, dtype=dtype)
    x2 = [x.clone() for x in x1]
    rows = [i for i, s in enumerate(starts) if s >= 0]
    _fused.scale_sub_([x2[i] for i in rows], [b1[i] for i in rows], [starts[i] for i in rows], 0.1, scales, defer)
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else {}
    for i, (x, g, b) in enumerate(zip(xs, gs, bufs)):
        d = g + 1e-3 * x + 0.9 * b
        torch.testing.assert_close(b1[i], d, **tol)
        stepped = x - 0.1 * d
        if starts[i] < 0:
            torch.testing.assert_close(x1[i], stepped, **tol)
            continue
        n, s = x.shape[0], starts[i]
        view = (n,) + (1,) * (x.dim() - 1)
        held = defer[s:s + n].view(view)
        torch.testing.assert_close(x1[i], torch.where(held, x, stepped), **tol)
        torch.testing.assert_close(x2[i], torch.where(held, scales[s:s + n].view(view) * x - 0.1 * d, stepped), **tol)
        x64, d64 = x.double().reshape(n, -1), d.double().reshape(n, -1)
        want = torch.stack([(x64 * x64).sum(1), (x64 * d64).sum(1), (d64 * d64).sum(1)]).to(dtype)
        torch.testing.assert_close(stats[:, s:s + n], want, **tol)
    assert not stats[:, 320:330].any()  # rows of no tensor stay untouched
    one = torch.zeros(3, 10, dtype=dtype)
    _fused.row_stats(xs[2], bufs[2], one, 3)
    a, c = xs[2].double(), bufs[2].double()
    torch.testing.assert_close(one[:, 3:8], torch.stack([(a * a).sum(1), (a * c).sum(1), (c * c).sum(1)]).to(dtype))


@pytest.fixture
def no_compiler(monkeypatch):
    """``torch.utils.cpp_extension.load`` failing as on a machine without a C++ compiler."""
    from torch.utils import cpp_extension

    from fxprune.optim import _fused

    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("g++: command not found")

    _fused._build.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", load)
    yield calls
    _fused._build.cache_clear()


def test_fused_without_a_compiler_says_so(no_compiler):
    for _ in range(2):
        with pytest.raises(fxprune.UnsupportedInputError, match="C\\+\\+ compiler.*g\\+\\+: command not found"):
            DHSPG(make("mlp")[1], lr=0.1, fused=True)
    assert len(no_compiler) == 1  # a failed build is not retried


def test_default_falls_back_to_the_stock_step_without_a_compiler(no_compiler):
    """``fused=None`` (the default) takes the stock path, with a warning naming the cause, and
    trains as ``fused=False`` does."""
    runs = []
    for fused in (None, False):
        model, prog = make("convnet", dtype=torch.float64)
        if fused is None:
            with pytest.warns(UserWarning, match="g\\+\\+: command not found.*stock step"):
                opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=1, pruning_steps=2)
        else:
            opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=1, pruning_steps=2,
                        fused=False)
        assert opt.fused is False
        for t in range(4):
            train_step(model, opt, "convnet", t, torch.float64)
        runs.append(model)
    for (n, a), b in zip(runs[0].named_parameters(), runs[1].parameters()):
        assert torch.equal(a, b), n


def test_default_is_fused_on_the_cpu():
    assert DHSPG(make("mlp")[1], lr=0.1).fused is True


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("variant", ["sgd", "adam", "adamw"])
def test_resume_is_bit_identical(variant):
    name = "convnet"
    kw = dict(lr=0.05 if variant == "sgd" else 0.01, variant=variant, target_group_sparsity=0.5,
              start_pruning_step=2, pruning_steps=4, weight_decay=1e-3, epsilon=0.5)
    total, cut = 9, 4

    model, prog = make(name)
    opt = DHSPG(prog, **kw)
    for t in range(total):
        train_step(model, opt, name, t)

    model2, prog2 = make(name)
    opt2 = DHSPG(prog2, **kw)
    for t in range(cut):
        train_step(model2, opt2, name, t)
    blob = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, blob)
    del model2, prog2, opt2

    blob.seek(0)
    ckpt = torch.load(blob, weights_only=True)
    model3, prog3 = make(name, seed=123)  # different init: everything must come from the checkpoint
    opt3 = DHSPG(prog3, **kw)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    assert opt3.step_count == cut
    for t in range(cut, total):
        train_step(model3, opt3, name, t)

    for (n, a), b in zip(model.state_dict().items(), model3.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(opt.projected, opt3.projected) and torch.equal(opt.redundant, opt3.redundant)
    assert opt.metrics() == opt3.metrics()


def test_state_dict_contents():
    model, prog = make("mlp")
    opt = DHSPG(prog, lr=0.05, start_pruning_step=0, pruning_steps=2)
    train_step(model, opt, "mlp", 0)
    sd = opt.state_dict()
    assert set(sd) >= {"state", "param_groups", "dhspg"}
    d = sd["dhspg"]
    assert d["step"] == 1 and d["partitioned"] is True
    assert d["redundant"].dtype == torch.bool and int(d["redundant"].sum()) == opt.target_channels
    # A state dict for a different program is refused.
    _, other = make("convnet")
    with pytest.raises(ValueError):
        DHSPG(other, lr=0.05).load_state_dict(sd)


# --------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_zero_channels_stay_zero(variant):
    model, prog = make("convnet")
    opt = DHSPG(prog, lr=0.05, variant=variant, target_group_sparsity=0.5, start_pruning_step=0,
                pruning_steps=2)
    for t in range(2):
        train_step(model, opt, "convnet", t)
    before = {gid: z.copy() for gid, z in prog.zero_channels().items()}
    params = dict(prog.module.named_parameters())
    for t in range(2, 6):
        train_step(model, opt, "convnet", t)
        after = prog.zero_channels()
        for gid in before:
            assert (after[gid] == before[gid]).all()
    # The optimizer state of the zeroed entries is zero too.
    masks = opt.masks()
    for gid, keep in masks.items():
        for c in torch.nonzero(~keep).reshape(-1).tolist():
            for pname, dim, pos in producer_entries(prog, gid, c):
                p = params[pname]
                assert not p.index_select(dim, pos).any()
                for v in opt.state[p].values():
                    if torch.is_tensor(v) and v.shape == p.shape:
                        assert not v.index_select(dim, pos).any()


def test_parameters_outside_groups_take_plain_step():
    model, prog = make("convnet", dtype=torch.float64)
    ref = copy.deepcopy(model)
    opt = DHSPG(prog, lr=0.05, momentum=0.9, target_group_sparsity=0.5, start_pruning_step=0,
                pruning_steps=3, lmbda=0.1)
    tor = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    train_step(model, opt, "convnet", 0, torch.float64)
    train_step(ref, tor, "convnet", 0, torch.float64)
    in_groups = {s.param for g in prog.groups if g.prunable for s in g.slices}
    named_ref = dict(ref.named_parameters())
    checked = 0
    for n, p in model.named_parameters():
        if n not in in_groups:
            torch.testing.assert_close(p, named_ref[n], rtol=1e-12, atol=1e-14)
            checked += 1
    assert checked >= 1  # at least fc.weight / fc.bias
    assert opt.metrics()["projected_channels"] == opt.target_channels // 3


def test_metrics_keys():
    model, prog = make("mlp")
    opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=1, pruning_steps=2)
    m = opt.metrics()
    for key in ("step", "group_sparsity", "zero_channels", "target_channels", "norm_important",
                "norm_redundant"):
        assert key in m
    assert m["step"] == 0 and m["zero_channels"] == 0 and m["norm_redundant"] == 0.0
    for t in range(3):
        train_step(model, opt, "mlp", t)
    m = opt.metrics()
    assert m["step"] == 3 and m["zero_channels"] == m["target_channels"] == 24
    assert 0.0 < m["group_sparsity"] < 1.0


def test_target_capped_so_every_group_keeps_a_channel():
    model, prog = make("mlp")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.99, start_pruning_step=0, pruning_steps=2)
    assert any("capped" in str(x.message) for x in w)
    assert opt.target_channels == (32 - 1) + (16 - 1)
    for t in range(2):
        train_step(model, opt, "mlp", t)
    for zero in prog.zero_channels().values():
        assert zero.sum() == len(zero) - 1
    model.eval()
    slim = prog.construct_subnet()
    assert slim.l1.out_features == 1 and slim.l2.out_features == 1


@pytest.mark.parametrize("target", [0.3, 0.7])
def test_uniform_partition_takes_the_same_fraction_of_every_group(target):
    model, prog = make("resnet18")
    opt = DHSPG(prog, lr=0.05, target_group_sparsity=target, start_pruning_step=0, pruning_steps=1)
    train_step(model, opt, "resnet18", 0)
    L = opt._layout
    taken = torch.bincount(L.channel_group[opt.redundant], minlength=len(L.groups))
    sizes = torch.tensor([g.size for g in L.groups])
    floor = torch.floor(target * sizes + 1e-9).long()
    assert int(taken.sum()) == opt.target_channels
    assert bool(((taken == floor) | (taken == floor + 1)).all()), (taken, sizes)
    # The scope travels with the checkpoint: it wins over the constructor's on load.
    _, prog_g = make("resnet18")
    opt_g = DHSPG(prog_g, lr=0.05, target_group_sparsity=target, start_pruning_step=0,
                  pruning_steps=1, partition="global")
    opt_g.load_state_dict(opt.state_dict())
    assert opt_g.partition == "uniform" and torch.equal(opt_g.redundant, opt.redundant)


def test_param_groups_with_different_lr():
    model, prog = make("convnet")
    convs = [p for n, p in model.named_parameters() if p.dim() == 4]
    rest = [p for n, p in model.named_parameters() if p.dim() != 4]
    opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=3,
                params=[{"params": convs, "lr": 0.02}, {"params": rest}])
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.05]
    for t in range(3):
        train_step(model, opt, "convnet", t)
    assert opt.metrics()["zero_channels"] == opt.target_channels
    model.eval()
    prog.construct_subnet()


def test_frozen_parameter_is_still_zeroed():
    model, prog = make("convnet")
    model.bn0.weight.requires_grad_(False)
    opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=2)
    assert all(p is not model.bn0.weight for g in opt.param_groups for p in g["params"])
    frozen = model.bn0.weight.detach().clone()
    for t in range(3):
        train_step(model, opt, "convnet", t)
    assert opt.metrics()["zero_channels"] == opt.target_channels
    w = model.bn0.weight.detach()
    changed = w != frozen
    assert bool((w[changed] == 0).all())  # only zeroing touched it
    model.eval()
    prog.construct_subnet()


def test_closure_and_no_pruning_target():
    model, prog = make("mlp")
    opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.0, start_pruning_step=0, pruning_steps=1)
    x, y = batch("mlp", 0)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    m = opt.metrics()
    assert m["target_channels"] == 0 and m["zero_channels"] == 0 and m["redundant_channels"] == 0


def test_channels_last_weights_match_contiguous():
    """Non-contiguous parameters (channels_last convs) take the generic reduction path."""
    dtype = torch.float64
    model, prog = make("convnet", dtype=dtype)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not cl.c1.weight.is_contiguous()
    prog_cl = fxprune.compile(cl, (torch.randn(1, 3, 8, 8, dtype=dtype),))
    kw = dict(lr=0.05, target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=3, epsilon=0.5)
    opt, opt_cl = DHSPG(prog, **kw), DHSPG(prog_cl, **kw)
    for t in range(4):
        train_step(model, opt, "convnet", t, dtype)
        train_step(cl, opt_cl, "convnet", t, dtype)
    assert torch.equal(opt.projected, opt_cl.projected)
    for a, b in zip(model.parameters(), cl.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_works_with_lr_scheduler():
    model, prog = make("mlp")
    opt = DHSPG(prog, lr=0.1, target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t in range(3):
        train_step(model, opt, "mlp", t)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)
    assert opt.metrics()["zero_channels"] == opt.target_channels


def test_active_rows_follow_in_place_edits():
    """The cached set of active rows (redundant, not projected) follows the partition and the
    projections, and an in-place edit of ``opt.projected`` too."""
    model, prog = make("convnet", dtype=torch.float64)
    opt = DHSPG(prog, lr=0.05, target_group_sparsity=0.5, start_pruning_step=1, pruning_steps=50)
    for t in range(3):
        train_step(model, opt, "convnet", t, torch.float64)
    c = int(torch.nonzero(opt.redundant & ~opt.projected)[0])
    opt.projected[c] = True
    train_step(model, opt, "convnet", 3, torch.float64)
    rows, need = opt._active_rows()
    assert not bool(rows[opt._layout.row_chan_ext == c].any())
    assert rows.sum() == int(opt._layout.to_rows(opt.redundant & ~opt.projected, False).sum())
