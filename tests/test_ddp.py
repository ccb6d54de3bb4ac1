"""DHSPG under DistributedDataParallel: two CPU processes (gloo) give the same result as one.

Each rank trains a DDP-wrapped model on its half of every global batch; DDP averages the
gradients, so every rank sees the full-batch gradient, and DHSPG's channel decisions (the
partition, the projections) are computed identically on every rank from it. The test checks
that both ranks end with the projected channels and parameters of a single-process run over
the same global batches. The model has no BatchNorm (whose batch statistics would differ
between a half batch and a full one).
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.optim import DHSPG

WORLD = 2
STEPS = 6
GLOBAL_BATCH = 8
DTYPE = torch.float64
OPT_KW = dict(lr=0.05, variant="sgd", momentum=0.9, weight_decay=1e-3, target_group_sparsity=0.5,
              start_pruning_step=1, pruning_steps=3, epsilon=0.5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(x + self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.mean((2, 3)))


def _build():
    torch.manual_seed(0)
    model = Net().to(DTYPE)
    prog = fxprune.compile(model, (torch.randn(1, 3, 8, 8, dtype=DTYPE),))
    return model, prog


def _global_batch(step: int):
    gen = torch.Generator().manual_seed(500 + step)
    x = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=gen).to(DTYPE)
    y = torch.randint(0, 5, (GLOBAL_BATCH,), generator=gen)
    return x, y


def _result(model, opt):
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "projected": opt.projected.clone(), "redundant": opt.redundant.clone(),
            "metrics": opt.metrics()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, prog = _build()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = DHSPG(prog, **OPT_KW)
        half = GLOBAL_BATCH // WORLD
        for t in range(STEPS):
            x, y = _global_batch(t)
            x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        torch.save(_result(model, opt), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    model, prog = _build()
    opt = DHSPG(prog, **OPT_KW)
    for t in range(STEPS):
        x, y = _global_batch(t)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    single = _result(model, opt)
    assert single["metrics"]["zero_channels"] == opt.target_channels > 0

    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(got["redundant"], single["redundant"])
        assert torch.equal(got["projected"], single["projected"])
        assert got["metrics"]["zero_channels"] == single["metrics"]["zero_channels"]
        for name, p in single["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=0, atol=1e-10, msg=name)
