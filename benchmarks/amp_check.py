"""Mixed precision and data-parallel checks of DHSPG on a device (CUDA by default).

Each row is a check that passes or fails (exit status 1 if any fails); tests/test_distributed.py
runs the same checks on the CPU:

* ``4 micro-batches == one 4x batch``: DHSPG stepped through
  ``fxprune.distributed.GradientStep(accumulate=4)`` takes the steps of batches 4 times
  larger: the same partition, projections and parameters (float64, up to summation order).
* ``GradScaler passes unscaled gradients``: DHSPG stepped through ``torch.amp.GradScaler``
  (float32 forward, power-of-two scale 2^12) ends with bitwise the parameters of an unscaled
  run, pruning phase included.
* ``skipped step changes nothing``: fp16 autocast + GradScaler; a step whose gradients hold an
  inf is skipped by the scaler (which lowers its scale), and DHSPG's parameters, buffers, step
  counter, partition and projections are bitwise unchanged; training then goes on to the target.
* ``fp16 training`` / ``bf16 training``: ``fxprune.distributed.GradientStep`` with autocast
  (2 micro-batches per step) trains to the exact target and the slim model is exact.
* with two or more CUDA devices, ``torchrun 2 GPUs --sync-bn``: ``fxprune train`` of the
  BatchNorm ResNet on digits with SyncBatchNorm over two processes (NCCL) zeroes the same
  channels as one process with the same global batch.

Usage::

    python benchmarks/amp_check.py                 # --device cuda
    python benchmarks/amp_check.py --device cpu    # the same checks on the CPU

Prints a Markdown table and writes benchmarks/results/gpu/amp_check.json (CUDA) or
benchmarks/results/amp_check.json (CPU), unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxprune  # noqa: E402
from fxprune import distributed as fxdist  # noqa: E402
from _timing import load_average, print_and_save, run_info  # noqa: E402

OPT = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, target_group_sparsity=0.5, start_pruning_step=2,
           pruning_steps=6, epsilon=0.5)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(x + self.c2(x))
        return self.fc(x.mean((2, 3)))


def program(device, dtype=torch.float32):
    torch.manual_seed(0)
    model = Net().to(device, dtype)
    return fxprune.compile(model, (torch.randn(1, 3, 16, 16, device=device, dtype=dtype),))


def batch(t: int, n: int, device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + t)
    return (torch.randn(n, 3, 16, 16, generator=gen).to(device, dtype),
            torch.randint(0, 5, (n,), generator=gen).to(device))


def snapshot(prog, opt):
    sd = opt.state_dict()
    return ([p.detach().clone() for p in prog.module.parameters()],
            [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()} for st in sd["state"].values()],
            {k: (v.clone() if torch.is_tensor(v) else v) for k, v in sd["dhspg"].items()})


def equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def check_unscaled(device) -> dict:
    plain, scaled = program(device), program(device)
    o_plain, o_scaled = fxprune.DHSPG(plain, **OPT), fxprune.DHSPG(scaled, **OPT)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 12)
    for t in range(8):
        x, y = batch(t, 16, device)
        for prog, opt in ((plain, o_plain), (scaled, o_scaled)):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(prog.module(x), y)
            if opt is o_scaled:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
    diff = max(float((p.detach() - q.detach()).abs().max())
               for p, q in zip(plain.module.parameters(), scaled.module.parameters()))
    ok = diff == 0.0 and torch.equal(o_plain.projected, o_scaled.projected) and bool(o_plain.projected.any())
    return {"check": "GradScaler passes unscaled gradients", "ok": ok, "detail": f"max abs difference {diff:.1e}"}


def train(prog, opt, steps, precision, device, accumulate=2):
    step = fxdist.GradientStep(prog.module, opt, accumulate=accumulate, precision=precision, device=device)
    dtype = next(prog.module.parameters()).dtype
    for t in range(steps):
        x, y = batch(t, 16, device, dtype)
        opt.zero_grad(set_to_none=True)
        for i, (xm, ym) in enumerate(step.split(x, y)):
            with step.forward(i):
                loss = F.cross_entropy(prog.module(xm), ym)
            step.backward(loss)
        step.step()
    return step


def check_accumulation(device) -> dict:
    big, acc = program(device, torch.float64), program(device, torch.float64)
    o_big, o_acc = fxprune.DHSPG(big, **OPT), fxprune.DHSPG(acc, **OPT)
    train(big, o_big, 10, "fp32", device, accumulate=1)
    train(acc, o_acc, 10, "fp32", device, accumulate=4)
    diff = max(float((p.detach() - q.detach()).abs().max() / p.detach().abs().max())
               for p, q in zip(big.module.parameters(), acc.module.parameters()))
    zeros = all(torch.equal(p == 0, q == 0) for p, q in zip(big.module.parameters(), acc.module.parameters()))
    same = torch.equal(o_big.redundant, o_acc.redundant) and torch.equal(o_big.projected, o_acc.projected)
    met = o_big.metrics()["zero_channels"] == o_big.target_channels > 0
    return {"check": "4 micro-batches == one 4x batch", "ok": same and zeros and met and diff <= 1e-10,
            "detail": f"same partition and projections: {same}, same zeros: {zeros}, "
                      f"max relative parameter difference {diff:.1e}"}


def check_skip(device) -> dict:
    prog = program(device)
    opt = fxprune.DHSPG(prog, **OPT)
    step = train(prog, opt, 3, "fp16", device, accumulate=1)
    before = snapshot(prog, opt)
    x, y = batch(50, 16, device)
    opt.zero_grad(set_to_none=True)
    with step.forward(0):
        loss = F.cross_entropy(prog.module(x), y)
    step.backward(loss)
    next(prog.module.parameters()).grad.view(-1)[0] = float("inf")
    scale = step.scaler.get_scale()
    taken = step.step()
    unchanged = equal(snapshot(prog, opt), before)
    ok = (not taken) and unchanged and opt.step_count == 3 and step.scaler.get_scale() < scale
    train(prog, opt, 6, "fp16", device, accumulate=1)  # then training goes on to the target
    met = opt.metrics()["zero_channels"] == opt.target_channels > 0 and opt.step_count == 9
    return {"check": "skipped step changes nothing", "ok": ok and met,
            "detail": f"step taken: {taken}, state unchanged: {unchanged}, target met afterwards: {met}"}


def check_training(device, precision) -> dict:
    prog = program(device)
    opt = fxprune.DHSPG(prog, **OPT)
    step = train(prog, opt, 10, precision, device)
    m = opt.metrics()
    try:
        prog.construct_subnet()  # verified against the full model
        exact = True
    except fxprune.VerificationError:
        exact = False
    ok = m["zero_channels"] == opt.target_channels > 0 and exact
    return {"check": f"{precision} training", "ok": ok,
            "detail": f"zero channels {m['zero_channels']}/{opt.target_channels}, slim exact {exact}, "
                      f"skipped steps {step.skipped}"}


def check_sync_bn() -> dict:
    args = ["--model", "fxprune.models:tiny_resnet", "--train-subset", "256", "--test-subset", "64",
            "--batch-size", "32", "--image-size", "12", "--epochs", "2", "--start-pruning-epoch", "0.5",
            "--pruning-epochs", "1", "--device", "cuda", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    with tempfile.TemporaryDirectory() as tmp:
        one, two = os.path.join(tmp, "one"), os.path.join(tmp, "two")
        subprocess.run([sys.executable, "-m", "fxprune", "train", *args, "--out", one], check=True, env=env,
                       capture_output=True)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "fxprune", "train", *args, "--sync-bn", "--out", two], check=True, env=env,
                       capture_output=True)
        from fxprune.train import LAST, load_checkpoint

        a = load_checkpoint(os.path.join(one, "checkpoints", LAST))
        b = load_checkpoint(os.path.join(two, "checkpoints", LAST))
        same = torch.equal(a["optimizer"]["dhspg"]["projected"], b["optimizer"]["dhspg"]["projected"])
        diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in a["model"])
        rep = json.load(open(os.path.join(two, "report.json")))
    return {"check": "torchrun 2 GPUs --sync-bn", "ok": same and rep["accuracy"]["equal"],
            "detail": f"same zeroed channels as one process: {same}, max abs parameter difference {diff:.1e}, "
                      f"world size {rep['world_size']}"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("torch sees no CUDA device", file=sys.stderr)
        return 2
    load_start = load_average()
    rows = [check_accumulation(device), check_unscaled(device), check_skip(device), check_training(device, "fp16"),
            check_training(device, "bf16")]
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        rows.append(check_sync_bn())
    table = "| check | result | detail |\n|---|---|---|\n" + "\n".join(
        f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {r['detail']} |" for r in rows)
    out = args.out or (HERE / "results" / ("gpu" if device.type == "cuda" else "") / "amp_check.json")
    print_and_save(f"DHSPG under mixed precision on {device}", table, run_info(device, load_start), rows, out)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
