"""Vectorized channel bookkeeping shared by fxprune's structured-sparsity optimizers.

The optimizers reason about *channels*: each channel of each prunable group is one
zero-invariant group (ZIG, OTOv2 Sec. 3.1) whose variables are the positions of that channel
in every producer slice of the group. This module flattens all prunable channels of a
program into one index space ``0 <= c < C`` and precomputes, for every (parameter, dim) pair
that holds producer slices, a map from positions along ``dim`` to a channel id (or ``-1``).

Per-channel quantities (squared norms, inner products) are then computed with one reduction
per parameter over its non-channel dimensions ("rows"), one ``torch.cat`` of the row vectors
and one ``index_add_`` into a ``[C]`` vector; per-row multipliers go back the other way with
one gather. No Python loop ever runs over channels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import FxPruneError
from . import _sharding

_TINY = 1e-30


def redundancy_saliency(xx: torch.Tensor, xd: torch.Tensor, dd: torch.Tensor,
                        numel: torch.Tensor) -> torch.Tensor:
    """Redundancy saliency of OTOv2 (Sec. 4) from per-group sums.

    ``s_g = 0.5 N(cos(x_g, d_g)) + 0.5 N(1 / (||x_g|| / n_g + 1e-6))``, ``N`` the division by
    the L2 norm over the groups. ``xx``, ``xd``, ``dd``: ``Tensor[G]`` of ``||x_g||^2``,
    ``<x_g, d_g>``, ``||d_g||^2``; ``numel``: ``Tensor[G]`` of ``n_g``. Groups with
    ``n_g == 0`` get ``-inf`` and take no part in the normalization. DHSPG ranks channels and
    H2SPG ranks erasable operators by this score (higher = more redundant).
    """
    nx = xx.clamp_min(0).sqrt()
    nd = dd.clamp_min(0).sqrt()
    cos = xd / (nx * nd).clamp_min(_TINY)
    n = numel.to(xx.dtype)
    inv = 1.0 / (nx / n.clamp_min(1.0) + 1e-6)
    ok = n > 0
    cos = torch.where(ok, cos, torch.zeros_like(cos))
    inv = torch.where(ok, inv, torch.zeros_like(inv))
    s = 0.5 * cos / torch.linalg.vector_norm(cos).clamp_min(_TINY) \
        + 0.5 * inv / torch.linalg.vector_norm(inv).clamp_min(_TINY)
    return torch.where(ok, s, torch.full_like(s, -float("inf")))


@dataclass
class Entry:
    """The producer positions of one parameter along one dimension.

    Attributes:
        name: qualified parameter name (the first one met in the program's slices).
        param: the parameter tensor (shared with the program's module).
        dim: the dimension the positions index.
        size: ``param.shape[dim]``, the number of rows of this entry.
        chan: ``LongTensor[size]``, global channel id of each row, ``-1`` where the row
            belongs to no prunable channel.
        row_numel: number of scalars in one row (``param.numel() // size``).
        start: offset of this entry's rows in the flat row space.
        shape: broadcast shape of a per-row vector (``size`` at ``dim``, 1 elsewhere).
        lo, n: the rank's rows along ``dim`` are global rows ``lo .. lo + n - 1`` (``0``,
            ``size`` unless the parameter is a sharded ``DTensor``, see :mod:`._sharding`).
        row0: flat row of the rank's first row, ``start + lo``.
        owner: whether the rank's values of this entry count in cross-rank sums.
    """

    name: str
    param: torch.Tensor
    dim: int
    size: int
    chan: torch.Tensor
    row_numel: int
    start: int = 0
    shape: Tuple[int, ...] = ()
    vector: bool = False
    lo: int = 0
    n: int = 0
    row0: int = 0
    owner: bool = True

    def local(self) -> torch.Tensor:
        """The rank's block of the parameter (the parameter itself when not sharded)."""
        return _sharding.local(self.param)

    def local_part(self, rows: torch.Tensor) -> torch.Tensor:
        """A per-row vector of this entry (``[size]`` or viewed as ``shape``), narrowed to the
        rank's rows."""
        if self.lo == 0 and self.n == self.size:
            return rows
        return rows.narrow(self.dim if rows.dim() > 1 else 0, self.lo, self.n)


class ChannelLayout:
    """Flat channel space of a program's prunable groups.

    Args:
        module: the module the slices' parameter names resolve in (``Program.module``).
        groups: the program's groups (``Program.groups``); frozen ones are skipped.

    Attributes:
        groups: the prunable groups with at least one channel, in program order.
        group_offsets: ``list[int]``, first global channel id of each group.
        num_channels: ``C``, total prunable channels.
        channel_group: ``LongTensor[C]``, index into ``groups`` of each channel.
        channel_numel: ``Tensor[C]`` (float), number of scalars per channel (``n_g``).
        entries: the (parameter, dim) entries, in order of first appearance.
        num_rows: ``R``, total rows over all entries.
        sharding: a :class:`._sharding.Sharding` when some parameter is a ``DTensor`` (FSDP2),
            else None. Row sums of local blocks then go through :meth:`reduce_rows_`.
    """

    def __init__(self, module: torch.nn.Module, groups: Sequence) -> None:
        self.groups = [g for g in groups if getattr(g, "prunable", True) and int(g.size) > 0]
        self.group_offsets: List[int] = []
        total = 0
        for g in self.groups:
            self.group_offsets.append(total)
            total += int(g.size)
        self.num_channels = total

        device = None
        by_key: Dict[Tuple[int, int], Entry] = {}
        for gi, g in enumerate(self.groups):
            off = self.group_offsets[gi]
            for s in g.slices:
                if getattr(s, "role", "out") != "out":
                    continue
                p = _resolve(module, s.param, g.id)
                dim = s.dim if s.dim >= 0 else s.dim + p.dim()
                if not 0 <= dim < max(p.dim(), 1):
                    raise FxPruneError(f"group {g.id}: slice {s!r} has dim {s.dim} out of range")
                if device is None:
                    device = p.device
                key = (id(p), dim)
                e = by_key.get(key)
                if e is None:
                    size = p.shape[dim] if p.dim() > 0 else 1
                    e = Entry(name=s.param, param=p, dim=dim, size=int(size),
                              chan=torch.full((int(size),), -1, dtype=torch.long),
                              row_numel=p.numel() // max(int(size), 1))
                    by_key[key] = e
                index = s.index.detach().to("cpu", torch.long).reshape(-1)
                channel = s.channel.detach().to("cpu", torch.long).reshape(-1)
                if index.numel() != channel.numel():
                    raise FxPruneError(f"group {g.id}: slice {s!r} has {index.numel()} positions "
                                       f"but {channel.numel()} channel ids")
                if index.numel() == 0:
                    continue
                if int(index.min()) < 0 or int(index.max()) >= e.size:
                    raise FxPruneError(f"group {g.id}: slice {s!r} indexes outside dim {dim} "
                                       f"of size {e.size}")
                if int(channel.min()) < 0 or int(channel.max()) >= int(g.size):
                    raise FxPruneError(f"group {g.id}: slice {s!r} names a channel outside "
                                       f"0..{int(g.size) - 1}")
                glob = channel + off
                old = e.chan[index]
                clash = (old >= 0) & (old != glob)
                if bool(clash.any()):
                    raise FxPruneError(
                        f"parameter {s.param!r} dim {dim}: position {int(index[clash][0])} "
                        f"belongs to two different prunable channels")
                e.chan[index] = glob

        self.device = device if device is not None else torch.device("cpu")
        self.entries: List[Entry] = list(by_key.values())
        start = 0
        for e in self.entries:
            e.start = start
            start += e.size
            nd = e.param.dim()
            e.shape = tuple(e.size if i == e.dim else 1 for i in range(nd)) if nd > 0 else ()
            e.vector = nd <= 1
            e.chan = e.chan.to(self.device)
        self.num_rows = start
        params = [e.param for e in self.entries]
        self.sharding = _sharding.Sharding(params) if _sharding.any_sharded(params) else None
        for e, (lo, n, owner) in zip(self.entries, _sharding.entry_blocks(self.sharding, self.entries)):
            e.lo, e.n, e.row0, e.owner = lo, n, e.start + lo, owner
        #: flat rows whose local sums must not count (entries of replicas other than the owner)
        self._not_owned = [(e.row0, e.n) for e in self.entries if not e.owner]

        dev = self.device
        C = self.num_channels
        sizes = [int(g.size) for g in self.groups]
        self.channel_group = torch.repeat_interleave(
            torch.arange(len(sizes), device=dev), torch.tensor(sizes, dtype=torch.long, device=dev)
        ) if sizes else torch.zeros(0, dtype=torch.long, device=dev)
        self.entry_sizes = [e.size for e in self.entries]
        self.entry_sizes_t = torch.tensor(self.entry_sizes, dtype=torch.long, device=dev)
        if self.entries:
            flat = torch.cat([e.chan for e in self.entries])
        else:
            flat = torch.zeros(0, dtype=torch.long, device=dev)
        #: ``LongTensor[R]``: channel of each flat row, ``C`` (a sentinel slot) where none.
        self.row_chan_ext = torch.where(flat >= 0, flat, torch.full_like(flat, C))
        valid = flat >= 0
        #: ``BoolTensor[R]``: whether each flat row belongs to a channel.
        self.row_has_channel = valid
        self.all_rows_valid = bool(valid.all())
        #: ``LongTensor[V]``: flat rows that belong to a channel, and their channels.
        self.valid_rows = torch.nonzero(valid).reshape(-1)
        self.valid_chan = flat[self.valid_rows]
        #: ``LongTensor[R]``: entry index of each flat row.
        self.row_entry = torch.repeat_interleave(
            torch.arange(len(self.entries), device=dev),
            torch.tensor(self.entry_sizes, dtype=torch.long, device=dev)
        ) if self.entries else torch.zeros(0, dtype=torch.long, device=dev)
        row_numel = torch.repeat_interleave(
            torch.tensor([float(e.row_numel) for e in self.entries], dtype=torch.float64, device=dev),
            torch.tensor(self.entry_sizes, dtype=torch.long, device=dev)
        ) if self.entries else torch.zeros(0, dtype=torch.float64, device=dev)
        self.channel_numel = self.channel_sum(row_numel)

    # ----------------------------------------------------------------- sharded parameters
    def reduce_rows_(self, rows: torch.Tensor) -> torch.Tensor:
        """Make per-row sums of local blocks (``[k, R]`` or ``[R]``, zero at rows the rank does
        not hold) global: drop the rows of entries the rank does not own, then sum over the
        ranks (a collective: every rank calls it). A no-op without sharding."""
        if self.sharding is None:
            return rows
        for r0, n in self._not_owned:
            rows[..., r0:r0 + n] = 0
        return self.sharding.all_reduce_(rows)

    def row_sq_norms(self, dtype: torch.dtype, entries: Optional[Sequence[bool]] = None) -> torch.Tensor:
        """``||row||^2`` of every flat row, ``Tensor[R]`` of ``dtype``, over the global parameters
        (reduced across ranks when sharded); rows of entries flagged False in ``entries`` are 0."""
        if self.sharding is None:
            parts = [row_norm(e.param.detach(), e.dim, e.size).to(dtype)
                     if entries is None or entries[i] else torch.zeros(e.size, dtype=dtype, device=self.device)
                     for i, e in enumerate(self.entries)]
            return torch.cat(parts).square_() if parts else torch.zeros(0, dtype=dtype, device=self.device)
        out = torch.zeros(self.num_rows, dtype=dtype, device=self.device)
        for i, e in enumerate(self.entries):
            if (entries is None or entries[i]) and e.n:
                out[e.row0:e.row0 + e.n] = row_norm(e.local().detach(), e.dim, e.n).to(dtype).square_()
        return self.reduce_rows_(out)

    def scale_rows_(self, rows: torch.Tensor, entries: Optional[Sequence[bool]] = None) -> None:
        """``x <- s * x`` over every entry (flagged True in ``entries``) with the flat per-row
        scales ``rows[R]``, on the rank's blocks."""
        for e, s, flag in zip(self.entries, self.split_rows(rows), entries or [True] * len(self.entries)):
            if flag and e.n:
                x = e.local()
                x.mul_(e.local_part(s).to(x.dtype))

    # ----------------------------------------------------------------- flat <-> channels
    def channel_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum a flat per-row tensor ``[R]`` or ``[R, k]`` into channels: ``[C]`` or ``[C, k]``."""
        if not self.all_rows_valid:
            rows = rows.index_select(0, self.valid_rows)
        out = torch.zeros((self.num_channels,) + tuple(rows.shape[1:]), dtype=rows.dtype,
                          device=rows.device)
        return out.index_add_(0, self.valid_chan, rows)

    def channel_sums(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum ``k`` flat per-row vectors, the rows of ``rows: [k, R]``, into channels at once:
        ``[k, C]``. Same sums as ``k`` calls of :meth:`channel_sum`, in the same order."""
        if not self.all_rows_valid:
            rows = rows.index_select(1, self.valid_rows)
        out = torch.zeros((rows.shape[0], self.num_channels), dtype=rows.dtype, device=rows.device)
        return out.index_add_(1, self.valid_chan, rows)

    def to_rows(self, values: torch.Tensor, fill) -> torch.Tensor:
        """Gather a per-channel tensor ``[C]`` to rows ``[R]``; rows of no channel get ``fill``."""
        ext = torch.cat([values, values.new_full((1,), fill)])
        return ext.index_select(0, self.row_chan_ext)

    def entry_any(self, row_mask: torch.Tensor) -> List[bool]:
        """For each entry, whether any of its rows is set in the boolean ``row_mask[R]``."""
        if not self.entries:
            return []
        counts = torch.zeros(len(self.entries), dtype=torch.long, device=row_mask.device)
        counts.index_add_(0, self.row_entry, row_mask.to(torch.long))
        return [bool(c) for c in counts.tolist()]

    def split_rows(self, rows: torch.Tensor) -> List[torch.Tensor]:
        """Split a flat ``[R]`` tensor into per-entry vectors viewed for broadcasting."""
        parts = torch.split(rows, self.entry_sizes)
        return [p.view(e.shape) for p, e in zip(parts, self.entries)]

    def rows_of(self, entry: Entry, chan_mask_ext: torch.Tensor) -> torch.Tensor:
        """Positions along ``entry.dim`` whose channel is set in ``chan_mask_ext[C + 1]``."""
        sel = chan_mask_ext.index_select(0, self.row_chan_ext[entry.start:entry.start + entry.size])
        return torch.nonzero(sel).reshape(-1)


def _resolve(module: torch.nn.Module, name: str, gid: int) -> torch.Tensor:
    """The parameter (or, failing that, buffer) ``name`` of ``module``."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        pass
    try:
        return module.get_buffer(name)
    except AttributeError as exc:
        raise FxPruneError(f"group {gid}: slice names {name!r}, which is neither a parameter nor "
                           f"a buffer of the program's module") from exc


# --------------------------------------------------------------------- row reductions
def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype for reductions of ``t``: at least float32."""
    return torch.float64 if t.dtype is torch.float64 else torch.float32


def _rows2d(t: torch.Tensor, dim: int, size: int) -> Optional[torch.Tensor]:
    if dim == 0 and t.is_contiguous():
        return t.view(size, -1)
    return None


def row_norm(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """L2 norm of ``t`` over every dim but ``dim``: a ``[size]`` vector (accumulation dtype)."""
    acc = acc_dtype(t)
    if t.dim() <= 1:
        return t.reshape(-1).abs().to(acc)
    v2 = _rows2d(t, dim, size)
    if v2 is not None:
        return torch.linalg.vector_norm(v2, dim=1, dtype=acc)
    others = [i for i in range(t.dim()) if i != dim]
    return torch.linalg.vector_norm(t, dim=others, dtype=acc)


def row_dot(a: torch.Tensor, b: torch.Tensor, dim: int, size: int,
            scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum(a * b)`` over every dim but ``dim``: a ``[size]`` vector (accumulation dtype).

    Rows laid out contiguously along ``dim == 0`` in float32/float64 take one batched matmul
    (:func:`_bmm_row_dot`), which streams ``a`` and ``b`` once and writes no product tensor.
    Otherwise the product goes through ``scratch`` when given: an optional 1-d buffer of
    ``a``'s dtype with at least ``a.numel()`` elements; reusing one buffer spares the
    allocator a fresh parameter-sized block (and its page faults) on every call."""
    acc = acc_dtype(a)
    if a.dim() <= 1:
        return a.reshape(-1).to(acc) * b.reshape(-1).to(acc)
    a2 = _rows2d(a, dim, size)
    b2 = _rows2d(b, dim, size) if a2 is not None else None
    if a2 is not None and b2 is not None:
        if a.dtype == acc and b.dtype == acc:
            return _bmm_row_dot(a2, b2)
        if scratch is not None and scratch.dtype == a.dtype and scratch.numel() >= a.numel():
            prod = torch.mul(a2, b2, out=scratch[:a.numel()].view(a2.shape))
            return prod.sum(1, dtype=acc)
        out = torch.linalg.vecdot(a2, b2, dim=1)
        return out if out.dtype == acc else out.to(acc)
    others = [i for i in range(a.dim()) if i != dim]
    return (a * b).sum(dim=others, dtype=acc)


def _bmm_row_dot(a2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products of two ``[R, n]`` row-major matrices: a ``[R]`` vector.

    An elementwise product and a sum would write and re-read a parameter-sized temporary
    (four passes over memory); a batched matmul of ``(R/k, k, n) @ (R/k, n, k)`` reads each
    operand once and keeps the ``k x k`` blocks' diagonals. ``k = 2`` pairs rows so that
    short rows still give the BLAS kernel enough work per batch; the extra off-diagonal
    products are cheap next to the memory traffic."""
    rows, n = a2.shape
    k = 2 if rows % 2 == 0 else 1
    blocks = torch.bmm(a2.view(rows // k, k, n), b2.view(rows // k, k, n).transpose(1, 2))
    return blocks.diagonal(dim1=1, dim2=2).reshape(rows)
