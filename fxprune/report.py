"""``fxprune.report``: parameters, FLOPs (torch.utils.flop_counter) and latency of a full and
a slim model on the same inputs."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from fxprune.passes.modes import eval_mode


def count_params(model: torch.nn.Module) -> int:
    """Number of distinct parameter elements (tied parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


def _native_mha_flops(q, k, v, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    """``nn.MultiheadAttention``'s fused inference path: q/k/v and output projections plus attention."""
    b, lq, e = q
    lk = k[1]
    d = embed_dim // num_heads
    proj = 2 * b * (lq + 2 * lk) * e * embed_dim + 2 * b * lq * embed_dim * embed_dim
    return proj + sdpa_flop_count((b, num_heads, lq, d), (b, num_heads, lk, d), (b, num_heads, lk, d))


# attention kernels that torch.utils.flop_counter does not count on the CPU
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._native_multi_head_attention: _native_mha_flops,
}


def count_flops(model: torch.nn.Module, inputs: Sequence) -> int:
    """FLOPs of one eval-mode forward pass, as counted by ``torch.utils.flop_counter``
    (a multiply-add counts 2 FLOPs; MACs = FLOPs / 2), with the CPU attention kernels it
    misses counted by the same formulas it uses for the GPU ones."""
    with torch.no_grad(), eval_mode(model), FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        model(*inputs)
    return int(counter.get_total_flops())


def latency_ms(model: torch.nn.Module, inputs: Sequence, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of one eval forward pass under ``torch.inference_mode``, in ms."""
    times = []
    with torch.inference_mode(), eval_mode(model):
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(*inputs)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclass
class Report:
    params_full: int
    params_slim: int
    flops_full: int
    flops_slim: int
    latency_full_ms: Optional[float] = None
    latency_slim_ms: Optional[float] = None

    @property
    def params_ratio(self) -> float:
        return self.params_slim / max(1, self.params_full)

    @property
    def flops_ratio(self) -> float:
        return self.flops_slim / max(1, self.flops_full)

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.update(params_ratio=self.params_ratio, flops_ratio=self.flops_ratio,
                 macs_full=self.flops_full // 2, macs_slim=self.flops_slim // 2)
        return d

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __str__(self) -> str:
        rows = [("params", f"{self.params_full:,}", f"{self.params_slim:,}", f"{self.params_ratio:.3f}"),
                ("FLOPs", f"{self.flops_full:,}", f"{self.flops_slim:,}", f"{self.flops_ratio:.3f}")]
        if self.latency_full_ms is not None:
            rows.append(("latency ms", f"{self.latency_full_ms:.2f}", f"{self.latency_slim_ms:.2f}",
                         f"{self.latency_slim_ms / self.latency_full_ms:.3f}"))
        head = ("", "full", "slim", "slim/full")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        fmt = "  ".join("{:>%d}" % w for w in widths)
        return "\n".join(fmt.format(*r) for r in [head] + rows)


def report(full: torch.nn.Module, slim: torch.nn.Module, example_inputs: Any, *, latency: bool = False) -> Report:
    """Compare a full and a slim model: parameters, FLOPs and (with ``latency=True``) CPU
    latency. ``example_inputs``: a tensor or a tuple of inputs.

    Models on the meta device (planning: shapes, no values) are counted too; FLOPs then come
    from running them on meta tensors, which a model whose ``forward`` branches on values cannot
    do (HuggingFace's attention masks): pass the traced graph ``prog.module`` as ``full``.
    Latency needs real tensors (``UnsupportedInputError`` on meta)."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if latency and any(t.is_meta for m in (full, slim) for t in m.parameters()):
        from .errors import UnsupportedInputError

        raise UnsupportedInputError("latency cannot be measured on the meta device (no values)")
    r = Report(count_params(full), count_params(slim), count_flops(full, inputs), count_flops(slim, inputs))
    if latency:
        r.latency_full_ms = latency_ms(full, inputs)
        r.latency_slim_ms = latency_ms(slim, inputs)
    return r
