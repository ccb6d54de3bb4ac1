"""Training on several processes (:mod:`fxprune.distributed`) and the step helpers every job uses.

Fast tier, one process: the data split of a torchrun job (every global batch is the
one-process batch), benchmarks/amp_check.py's checks on the CPU (gradient accumulation: k = 4
micro-batches == one 4x batch, DHSPG included; bf16 autocast; fp16 with a GradScaler whose
skipped step leaves parameters and DHSPG's state untouched, and whose taken steps see unscaled
gradients), the SyncBatchNorm view, and the errors.

Slow tier (two CPU processes under ``python -m torch.distributed.run``, gloo; run by CI):
``fxprune train`` of a model without batch statistics zeroes the same channels and exports
the same slim model as one process; the digits job with BatchNorm reaches its target with
slim == full accuracy and reports its world size; a resumed two-process run ends bit for bit
as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxprune
import fxprune.io
from fxprune import distributed as fxdist
from fxprune.cli import main
from fxprune.train import LAST, load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import amp_check  # noqa: E402  (the checks benchmarks/gpu.sh runs on CUDA)


# --------------------------------------------------------------------------------------------
# data split


def test_epoch_loader_splits_every_global_batch_over_the_ranks():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3)).tolist()
    one = [b[0].tolist() for b in fxdist.epoch_loader(data, order, 12, fxdist.Context())]
    ranks = [[b[0].tolist() for b in fxdist.epoch_loader(data, order, 12, fxdist.Context(rank=r, world_size=3))]
             for r in range(3)]
    assert len(one) == 4 and all(len(r) == len(one) for r in ranks)
    for b, batch in enumerate(one):
        parts = [r[b] for r in ranks]
        assert all(len(p) == 4 for p in parts)  # 12 / 3 per rank
        assert sorted(sum(parts, [])) == sorted(batch)
    shards = [fxdist.eval_shard(data, fxdist.Context(rank=r, world_size=3)) for r in range(3)]
    assert sorted(int(s[i][0]) for s in shards for i in range(len(s))) == list(range(50))  # no padding


def test_batch_that_does_not_split_is_refused():
    ctx = fxdist.Context(rank=0, world_size=3)
    with pytest.raises(fxprune.UnsupportedInputError, match=r"--batch-size 32 .* 3 process.*multiple of 3"):
        fxdist.per_rank_batch(32, ctx)
    with pytest.raises(fxprune.UnsupportedInputError, match="multiple of 12"):
        fxdist.per_rank_batch(30, ctx, accumulate=4)
    assert fxdist.per_rank_batch(24, ctx, accumulate=4) == 2


# --------------------------------------------------------------------------------------------
# accumulation and mixed precision


@pytest.mark.parametrize("check", ["accumulation", "unscaled", "skip", "fp16", "bf16"])
def test_step_helpers_on_the_cpu(check):
    """benchmarks/amp_check.py's checks, on the CPU: k = 4 micro-batches equal one 4x batch
    (DHSPG's partition, projections and parameters); DHSPG under a GradScaler sees unscaled
    gradients; a step the scaler skips changes no parameter and no DHSPG state; fp16 and bf16
    autocast train to the exact target with an exact slim model."""
    cpu = torch.device("cpu")
    fn = {"accumulation": amp_check.check_accumulation, "unscaled": amp_check.check_unscaled,
          "skip": amp_check.check_skip, "fp16": lambda d: amp_check.check_training(d, "fp16"),
          "bf16": lambda d: amp_check.check_training(d, "bf16")}[check]
    row = fn(cpu)
    assert row["ok"], row["detail"]


def test_uneven_micro_batches_are_refused():
    prog = amp_check.program(torch.device("cpu"))
    step = fxdist.GradientStep(prog.module, fxprune.DHSPG(prog, lr=0.1), accumulate=4)
    with pytest.raises(fxprune.UnsupportedInputError, match="--accumulate 4"):
        step.split(torch.zeros(6, 3))


# --------------------------------------------------------------------------------------------
# SyncBatchNorm and DDP wrapping


def test_sync_batchnorm_view_shares_the_model():
    from fxprune.models import tiny_resnet

    torch.manual_seed(0)
    prog = fxprune.compile(tiny_resnet().eval(), (torch.randn(1, 3, 12, 12),))
    gm = prog.module.train()
    view = fxdist.sync_batchnorm_view(gm)
    bns = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
    syncs = [m for m in view.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == len(bns) > 0 and not any(isinstance(m, nn.SyncBatchNorm) for m in gm.modules())
    assert {id(p) for p in view.parameters()} == {id(p) for p in gm.parameters()}
    x = torch.randn(4, 3, 12, 12)
    ref = fxprune.compile(tiny_resnet().eval(), (torch.randn(1, 3, 12, 12),)).module.train()
    ref.load_state_dict(gm.state_dict())
    out = view(x)  # one process: SyncBatchNorm normalises like BatchNorm
    torch.testing.assert_close(out, ref(x), rtol=0, atol=0)
    for a, b in zip(gm.buffers(), ref.buffers()):  # the running statistics of ``gm`` moved
        assert torch.equal(a, b)


def test_sync_bn_without_cuda_is_refused():
    prog = amp_check.program(torch.device("cpu"))
    with pytest.raises(fxprune.UnsupportedInputError, match="--sync-bn needs CUDA"):
        fxdist.wrap(prog.module, fxdist.Context(rank=0, world_size=2), sync_bn=True)
    assert fxdist.wrap(prog.module, fxdist.Context(), sync_bn=True) is prog.module


# --------------------------------------------------------------------------------------------
# ``torchrun -m fxprune train``: two CPU processes


TINY = ["--train-subset", "96", "--test-subset", "48", "--batch-size", "32", "--image-size", "12",
        "--lr", "0.05", "--start-pruning-epoch", "0.34", "--pruning-epochs", "1.33", "--lr-decay-epochs", "1.5",
        "--no-progress"]
PLAIN = ["--model", "fxprune.models:tiny_plain_resnet", *TINY]


def torchrun(out, *args, nproc: int = 2):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "fxprune", "train", *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-12000:]
    return proc


def report_of(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def final_state(out):
    return load_checkpoint(os.path.join(out, "checkpoints", LAST))


@pytest.fixture(scope="module")
def plain_two(tmp_path_factory):
    """Two processes, two epochs, a model without BatchNorm, 2 micro-batches per step."""
    out = tmp_path_factory.mktemp("plain2")
    torchrun(out, *PLAIN, "--epochs", "2", "--accumulate", "2")
    return out


@pytest.mark.slow
def test_two_processes_match_one(plain_two, tmp_path):
    assert main(["train", *PLAIN, "--epochs", "2", "--out", str(tmp_path)]) == 0
    one, two = report_of(tmp_path), report_of(plain_two)
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["per_process_batch_size"] == 8
    assert two["zero_channels"] == one["zero_channels"] == one["prunable_channels"] // 2
    s1, s2 = final_state(tmp_path), final_state(plain_two)
    assert torch.equal(s1["optimizer"]["dhspg"]["projected"], s2["optimizer"]["dhspg"]["projected"])
    for k, v in s1["model"].items():
        torch.testing.assert_close(s2["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
        assert torch.equal(s2["model"][k] == 0, v == 0), k
    slim1, slim2 = fxprune.io.load(os.path.join(tmp_path, "slim")), fxprune.io.load(os.path.join(plain_two, "slim"))
    assert sum(p.numel() for p in slim1.parameters()) == sum(p.numel() for p in slim2.parameters())
    x = torch.rand(5, 3, 12, 12)
    torch.testing.assert_close(slim2(x), slim1(x), rtol=1e-4, atol=1e-5)
    assert [h["test_accuracy"] for h in one["history"]] == [h["test_accuracy"] for h in two["history"]]


@pytest.mark.slow
def test_two_process_resume_is_bit_identical(plain_two, tmp_path):
    torchrun(tmp_path, *PLAIN, "--epochs", "1", "--accumulate", "2")
    assert final_state(tmp_path)["epoch"] == 1
    torchrun(tmp_path, "--resume", "--epochs", "2", "--no-progress")
    a, b = final_state(plain_two), final_state(tmp_path)
    assert a["world_size"] == b["world_size"] == 2
    for part in ("model", "optimizer", "rng", "rng_ranks"):
        assert amp_check.equal(a[part], b[part]), part
    ra, rb = report_of(plain_two), report_of(tmp_path)
    for key in ("accuracy", "max_abs_output_diff", "params", "flops", "zero_channels"):
        assert ra[key] == rb[key], key


@pytest.mark.slow
def test_two_process_digits_job_with_batchnorm(tmp_path):
    """BatchNorm normalises each process's share of the batch (no --sync-bn on the CPU): the
    target is still met exactly and the slim model is exact."""
    proc = torchrun(tmp_path, "--model", "fxprune.models:tiny_resnet", *TINY, "--epochs", "2", "--precision", "bf16")
    rep = report_of(tmp_path)
    assert rep["world_size"] == 2 and rep["config"]["precision"] == "bf16"
    assert rep["zero_channels"] == rep["prunable_channels"] // 2
    assert rep["accuracy"]["equal"] is True and rep["max_abs_output_diff"] < 1e-4
    assert proc.stdout.count("epoch 2/2") == 1  # one process prints
