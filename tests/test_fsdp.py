"""DHSPG and H2SPG on FSDP2-sharded parameters (``fully_shard``, ``DTensor``): two CPU
processes (gloo) take the same steps as one process over the same global batches.

Each rank trains its half of every global batch; FSDP2 averages the gradients
(reduce-scatter), so every rank holds the full-batch gradient of its block of each parameter.
DHSPG's per-channel sums come from the local blocks and are all-reduced, so both ranks take
the same partition and project the same channels as one process. The models mix the cases
of a channel's rows against the sharded dim: rows along dim 0 split unevenly between the
ranks (7 channels: 4 + 3), a transposed convolution whose channels are its weight's dim 1
(each row split over the ranks), a convolution sharded along dim 1 (``shard_placement_fn``),
and a Llama traced by ``torch.export`` sharded as one FSDP unit. float64 throughout, so the
reduction order is the only difference. The slim model is built on rank 0 from the gathered
full state (:func:`fxprune.distributed.construct_subnet`) and matches the one-process slim
model.
"""
from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune import distributed as fxdist

WORLD = 2
STEPS = 30
DTYPE = torch.float64
HERE = os.path.dirname(os.path.abspath(__file__))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 7, 3, padding=1)
        self.conv2 = nn.Conv2d(7, 7, 3, padding=1)
        self.up = nn.ConvTranspose2d(7, 6, 2, stride=2)  # channels are weight dim 1
        self.conv3 = nn.Conv2d(6, 5, 3, padding=1, stride=2)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(x + self.conv2(x))
        x = F.relu(self.up(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


# --------------------------------------------------------------------------------------------
# scenarios: model, data, optimizer, sharding


def _cnn():
    torch.manual_seed(0)
    model = SmallCNN().to(DTYPE)
    return model, fxprune.compile(model, (torch.randn(1, 3, 8, 8, dtype=DTYPE),))


def _llama():
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
    from transformers import LlamaForCausalLM
    from transformers_sweep import llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).to(DTYPE)
    # torch.export specialises the batch size: the example has the per-rank batch
    tokens = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    return model, fxprune.compile(model.eval(), (tokens,))


def _supernet():
    from fxprune.supernet import DartsSupernet

    torch.manual_seed(0)
    model = DartsSupernet(num_classes=5, width=4, layers=3).to(DTYPE)
    return model, fxprune.compile(model.eval(), (torch.randn(1, 3, 16, 16, dtype=DTYPE),), mode="erase")


def _image_batch(step: int, n: int, side: int, classes: int):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, side, side, generator=gen).to(DTYPE), torch.randint(0, classes, (n,), generator=gen)


def _token_batch(step: int, n: int = 4):
    gen = torch.Generator().manual_seed(2000 + step)
    t = torch.randint(0, 96, (n, 8), generator=gen)
    return t, t


def _image_loss(module, x, y):
    return F.cross_entropy(module(x), y)


def _lm_loss(module, tokens, _):
    out = module(tokens)
    logits = out["logits"] if isinstance(out, dict) else (out[0] if isinstance(out, (tuple, list)) else out.logits)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


DCP_SCENARIO = "cnn-sgd-fused"  # its sharded state also goes to disk with torch.distributed.checkpoint
DHSPG_KW = dict(target_group_sparsity=0.5, start_pruning_step=5, pruning_steps=20, epsilon=0.5)
SCENARIOS = {
    "cnn-sgd-fused": dict(build=_cnn, data=lambda t: _image_batch(t, 8, 8, 4), loss=_image_loss, h2=False,
                          opt=dict(lr=0.05, variant="sgd", momentum=0.9, weight_decay=1e-3, fused=True, **DHSPG_KW)),
    "cnn-sgd-stock": dict(build=_cnn, data=lambda t: _image_batch(t, 8, 8, 4), loss=_image_loss, h2=False,
                          opt=dict(lr=0.05, variant="sgd", momentum=0.9, weight_decay=1e-3, fused=False, **DHSPG_KW)),
    "cnn-adamw": dict(build=_cnn, data=lambda t: _image_batch(t, 8, 8, 4), loss=_image_loss, h2=False,
                      opt=dict(lr=1e-2, variant="adamw", weight_decay=1e-2, **DHSPG_KW)),
    "llama-sgd": dict(build=_llama, data=_token_batch, loss=_lm_loss, h2=False,
                      opt=dict(lr=0.05, variant="sgd", momentum=0.9, weight_decay=1e-3, **DHSPG_KW)),
    "llama-adamw": dict(build=_llama, data=_token_batch, loss=_lm_loss, h2=False,
                        opt=dict(lr=1e-2, variant="adamw", weight_decay=1e-2, **DHSPG_KW)),
    "supernet-h2spg": dict(build=_supernet, data=lambda t: _image_batch(t, 4, 16, 5), loss=_image_loss, h2=True,
                           opt=dict(lr=0.05, variant="sgd", momentum=0.9, target_group_sparsity=0.4,
                                    start_pruning_step=5, pruning_steps=20, epsilon=0.5)),
}
# the probe input the slim models are compared on
PROBE = {"cnn": lambda: torch.randn(3, 3, 8, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(5)),
         "llama": lambda: torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(5)),
         "supernet": lambda: torch.randn(2, 3, 16, 16, dtype=DTYPE, generator=torch.Generator().manual_seed(5))}


def _shard(prog, units=("conv1", "conv2", "up", "conv3", "fc")) -> None:
    """FSDP2 over ``prog.module``: the CNN's ``units`` each their own FSDP unit (``conv3``
    sharded along dim 1), the rest with the root."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    gm = prog.module
    for name, m in gm.named_children():
        if name in units:
            dim = 1 if name == "conv3" else 0
            fully_shard(m, shard_placement_fn=lambda p, d=dim: Shard(d) if p.dim() > d else Shard(0))
    fully_shard(gm)


def _optimizer(prog, scenario):
    cls = fxprune.H2SPG if scenario["h2"] else fxprune.DHSPG
    return cls(prog, **scenario["opt"])


def _outputs(module, x):
    out = module(x)
    if isinstance(out, dict):
        out = out["logits"]
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.detach()


def _train(name: str, rank: int = 0, world: int = 1, dcp_dir=None) -> dict:
    """Train scenario ``name`` for STEPS steps; with ``world`` > 1 under FSDP2 (called on
    every rank). Returns the full parameters, optimizer decisions and the slim model's output
    (on rank 0). ``dcp_dir``: also save the sharded model state there with
    ``torch.distributed.checkpoint``."""
    scenario = SCENARIOS[name]
    model, prog = scenario["build"]()
    template = None
    if world > 1:
        template = fxdist.program_template(prog)
        _shard(prog)
    opt = _optimizer(prog, scenario)
    module = prog.module
    if scenario["h2"]:
        module.eval()  # BatchNorm on running statistics: no batch statistics
    else:
        module.train()
    for t in range(STEPS):
        x, y = scenario["data"](t)
        half = x.shape[0] // WORLD
        opt.zero_grad(set_to_none=True)
        if world > 1:  # this rank's half; FSDP2 averages the gradients over the ranks
            scenario["loss"](module, x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]).backward()
        else:  # the same mean over the global batch, one half after the other
            for r in range(WORLD):
                (scenario["loss"](module, x[r * half:(r + 1) * half], y[r * half:(r + 1) * half]) / WORLD).backward()
        opt.step()
    metrics = opt.metrics()  # a collective under FSDP2
    if dcp_dir is not None:
        import torch.distributed.checkpoint as dcp

        dcp.save(module.state_dict(), checkpoint_id=dcp_dir)
    params, zero_blocks = {}, True
    for n, p in module.named_parameters():
        params[n] = p.full_tensor().detach() if world > 1 else p.detach().clone()
    state = {}
    for n, p in module.named_parameters():
        for k, v in opt.state[p].items():
            if torch.is_tensor(v) and v.shape == p.shape:
                state[f"{n}.{k}"] = v.full_tensor() if world > 1 else v.clone()
    # every rank's block: the projected channels' rows are exactly 0
    L = opt._layout
    ext = torch.cat([opt.projected, opt.projected.new_zeros(1)])
    for e in L.entries:
        rows = L.rows_of(e, ext)
        block = e.local().detach()
        loc = rows[(rows >= e.lo) & (rows < e.lo + e.n)] - e.lo
        if loc.numel() and bool(block.index_select(e.dim, loc).any()):
            zero_blocks = False
    split = sum(e.n < e.size for e in L.entries)  # entries whose rows this rank holds only some of
    partial = sum(e.n == e.size and L.sharding is not None and e.local().numel() < e.param.numel()
                  for e in L.entries)  # entries whose every row is split over the ranks
    out = {"params": params, "state": state, "split_entries": split, "partial_entries": partial, "redundant": opt.redundant.clone(),
           "projected": opt.projected.clone(), "metrics": metrics, "zero_blocks": zero_blocks,
           "chosen": list(opt.chosen) if scenario["h2"] else None,
           "erased": sorted(opt.erased()) if scenario["h2"] else None}
    probe = PROBE[name.split("-")[0]]()
    if world > 1:
        slim = fxdist.construct_subnet(prog, template)
    else:
        slim = prog.construct_subnet()
    if slim is not None:
        slim.eval()
        with torch.no_grad():
            out["slim"] = _outputs(slim, probe)
        out["slim_params"] = sum(p.numel() for p in slim.parameters())
    return out


ATO_STEPS = 12


def _train_ato(rank: int = 0, world: int = 1) -> dict:
    """Auto-Train-Once on the CNN (conv1, conv2 their own FSDP units, the rest in the root's):
    the model takes DHSPG's plain step, the controller one step per model step on its share of
    a held-out batch, the proximal step from step 2; the masks freeze at step 8."""
    _, prog = _cnn()
    template = None
    if world > 1:
        template = fxdist.program_template(prog)
        _shard(prog, units=("conv1", "conv2"))
    opt = fxprune.DHSPG(prog, lr=0.05, target_group_sparsity=0.0)
    # the controller's task loss: this rank's half of each held-out batch (its gradients are
    # averaged over the ranks), or the whole batch in one process
    held_out = []
    for t in range(ATO_STEPS):
        hx, hy = _image_batch(500 + t, 8, 8, 4)
        half = hx.shape[0] // WORLD
        held_out.append((hx[rank * half:(rank + 1) * half], hy[rank * half:(rank + 1) * half]) if world > 1
                        else (hx, hy))
    ato = fxprune.ATO(prog, 0.6, total_steps=ATO_STEPS, controller_every=1, controller_start=0.0,
                      mask_freeze=0.7, proximal_start=0.2, lmbda_late_start=0.5, seed=0, controller_data=held_out)
    for t in range(ATO_STEPS):
        x, y = _image_batch(t, 8, 8, 4)
        half = x.shape[0] // WORLD
        opt.zero_grad(set_to_none=True)
        for r in ([rank] if world > 1 else range(WORLD)):
            (F.cross_entropy(prog.module(x[r * half:(r + 1) * half]), y[r * half:(r + 1) * half]) * world / WORLD
             ).backward()
        opt.step()
        ato.step(opt)
    slim = ato.finalize(template=template)
    params = {n: (p.full_tensor() if world > 1 else p).detach().clone() for n, p in prog.module.named_parameters()}
    out = {"controller": {k: v.clone() for k, v in ato.controller.state_dict().items()},
           "mask": ato.current_mask().clone(), "params": params, "summary": ato.summary()}
    if slim is not None:
        with torch.no_grad():
            out["slim"] = _outputs(slim.eval(), PROBE["cnn"]())
    return out


def _skipped_step(rank: int) -> list:
    """fp16 autocast through GradientStep (ShardedGradScaler under FSDP2): an inf in rank 1's
    gradient block at step 3 makes both ranks skip that step. Returns DHSPG's step count after
    each step."""
    torch.manual_seed(0)
    prog = fxprune.compile(SmallCNN(), (torch.randn(1, 3, 8, 8),))
    _shard(prog)
    opt = fxprune.DHSPG(prog, lr=0.05, start_pruning_step=1, pruning_steps=4)
    step = fxdist.GradientStep(prog.module, opt, precision="fp16")
    counts = []
    for t in range(5):
        x, y = _image_batch(t, 8, 8, 4)
        opt.zero_grad(set_to_none=True)
        with step.forward(0):
            loss = F.cross_entropy(prog.module(x[rank * 4:(rank + 1) * 4].float()), y[rank * 4:(rank + 1) * 4])
        step.backward(loss)
        if t == 3 and rank == 1:
            next(prog.module.parameters()).grad.to_local().view(-1)[0] = float("inf")
        step.step()
        counts.append(opt.step_count)
    return counts


def _worker(rank: int, port: int, out_dir: str, names) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = fxdist.init("cpu")
    try:
        for name in names:
            dcp_dir = os.path.join(out_dir, f"{name}.dcp") if name == DCP_SCENARIO else None
            torch.save(_train(name, rank, WORLD, dcp_dir), os.path.join(out_dir, f"{name}.rank{rank}.pt"))
        torch.save(_train_ato(rank, WORLD), os.path.join(out_dir, f"ato.rank{rank}.pt"))
        torch.save(_skipped_step(rank), os.path.join(out_dir, f"skip.rank{rank}.pt"))
    finally:
        fxdist.shutdown(ctx)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(_free_port(), str(out), list(SCENARIOS)), nprocs=WORLD, join=True)
    return out


def _assert_close_rel(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    """``|a - b| <= rtol * max |b|`` (relative to the tensor's scale)."""
    scale = float(b.abs().max()) if b.numel() else 0.0
    diff = float((a - b).abs().max()) if b.numel() else 0.0
    assert diff <= rtol * max(scale, 1e-12), f"{what}: max |diff| {diff:.3e}, scale {scale:.3e}"


pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sharded_training_matches_one_process(sharded_runs, name):
    single = _train(name)
    assert single["metrics"]["projected_channels"] > 0
    for rank in range(WORLD):
        got = torch.load(sharded_runs / f"{name}.rank{rank}.pt", weights_only=True)
        assert got["split_entries"] > 0  # the run was sharded
        if name.startswith("cnn"):  # ConvTranspose2d's dim-1 channels, conv3 sharded on dim 1
            assert got["partial_entries"] >= 2
        assert torch.equal(got["redundant"], single["redundant"]), f"rank {rank}: partition"
        assert torch.equal(got["projected"], single["projected"]), f"rank {rank}: projected channels"
        assert got["zero_blocks"], f"rank {rank}: a projected channel is not zero in its local block"
        assert got["metrics"]["zero_channels"] == single["metrics"]["zero_channels"]
        assert got["chosen"] == single["chosen"] and got["erased"] == single["erased"]
        for n, p in single["params"].items():
            _assert_close_rel(got["params"][n], p, f"rank {rank} {n}")
            # the same entries are exactly zero (the projected channels)
            assert torch.equal(got["params"][n] == 0, p == 0), f"rank {rank} {n}: zero entries"
        assert set(got["state"]) == set(single["state"])
        for n, v in single["state"].items():
            _assert_close_rel(got["state"][n], v, f"rank {rank} state {n}")
    rank0 = torch.load(sharded_runs / f"{name}.rank0.pt", weights_only=True)
    assert "slim" not in torch.load(sharded_runs / f"{name}.rank1.pt", weights_only=True)
    assert rank0["slim_params"] == single["slim_params"] < sum(p.numel() for p in single["params"].values())
    _assert_close_rel(rank0["slim"], single["slim"], "slim output")
    if single["erased"] is not None:
        assert len(single["erased"]) == len(single["chosen"]) > 0


def test_slim_model_from_a_distributed_checkpoint(sharded_runs, tmp_path):
    """The sharded state saved with torch.distributed.checkpoint, converted to one file and
    loaded in a single process, gives the slim model of the gathered state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(sharded_runs / f"{DCP_SCENARIO}.dcp", tmp_path / "full.pt")
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    _, prog = SCENARIOS[DCP_SCENARIO]["build"]()
    slim = fxdist.construct_subnet(prog, fxdist.program_template(prog), state=state).eval()
    rank0 = torch.load(sharded_runs / f"{DCP_SCENARIO}.rank0.pt", weights_only=True)
    assert sum(p.numel() for p in slim.parameters()) == rank0["slim_params"]
    with torch.no_grad():
        assert torch.equal(_outputs(slim, PROBE["cnn"]()), rank0["slim"])


def test_auto_train_once_on_sharded_parameters(sharded_runs):
    """ATO's controller is replicated and its gradients averaged; its gated copy of the model
    runs the FSDP2 units; the proximal steps shrink the local blocks: the same masks, controller
    (float32, up to the order of its gradient sums) and parameters as one process."""
    single = _train_ato()
    assert single["summary"]["frozen"] and not bool(single["mask"].all())
    for rank in range(WORLD):
        got = torch.load(sharded_runs / f"ato.rank{rank}.pt", weights_only=True)
        assert torch.equal(got["mask"], single["mask"])
        for k, v in single["controller"].items():
            torch.testing.assert_close(got["controller"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        for n, p in single["params"].items():
            _assert_close_rel(got["params"][n], p, f"rank {rank} {n}")
            assert torch.equal(got["params"][n] == 0, p == 0), n
    rank0 = torch.load(sharded_runs / "ato.rank0.pt", weights_only=True)
    _assert_close_rel(rank0["slim"], single["slim"], "slim output")


def test_a_step_skipped_on_one_rank_is_skipped_on_all(sharded_runs):
    counts = [torch.load(sharded_runs / f"skip.rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert counts[0] == counts[1] == [1, 2, 3, 3, 4]
