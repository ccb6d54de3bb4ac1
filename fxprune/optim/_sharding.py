"""Channel bookkeeping over sharded parameters (FSDP2's ``DTensor`` parameters).

``torch.distributed.fsdp.fully_shard`` replaces every parameter by a ``DTensor`` whose rank
holds one block of it: with the default ``Shard(0)`` placement, a contiguous run of dim-0
rows (``torch.chunk`` sizes, so ranks may hold unequal runs, or none). fxprune's optimizers
reason about channels, whose rows may lie along the sharded dim (a conv's out-channels: each
channel's rows live whole on one rank) or across it (a transposed conv's out-channels along
dim 1, or any entry once ``shard_placement_fn`` shards another dim: each row is split over the
ranks). Either way a row reduction over the local block is a partial sum of the global row's,
zero for rows the rank does not hold; one ``all_reduce`` (sum) of the ``[k, R]`` row sums
gives every rank the exact global per-row sums, so every rank then takes the same channel
decisions (partition, projection, quota) from the same numbers.

A mesh dim with a ``Replicate`` placement (HSDP's replica groups) would count the same block
several times; only the rank at coordinate 0 along those mesh dims contributes (the *owner*).
A parameter that is not a ``DTensor`` while others are is replicated on every rank of the
mesh, and only the mesh's first rank contributes it.

:class:`Sharding` holds, per (parameter, dim) entry of a :class:`~._groups.ChannelLayout`,
the local block along the entry's dim (``lo``, ``n``: global offset and count of the local
rows) and whether the rank contributes it, plus the process group of the reductions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import UnsupportedInputError

__all__ = ["Sharding", "local", "is_sharded", "any_sharded"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


_DTENSOR = _dtensor_type()


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or state of FSDP2)."""
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def any_sharded(tensors) -> bool:
    return _DTENSOR is not None and any(isinstance(t, _DTENSOR) for t in tensors)


def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The rank's block of ``t`` (a view sharing its storage: in-place ops on it change ``t``),
    or ``t`` itself when it is a plain tensor."""
    if t is not None and _DTENSOR is not None and isinstance(t, _DTENSOR):
        return t.to_local()
    return t


def like(param: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``block`` (this rank's block, of the local shape of ``param``) as a tensor like ``param``:
    a ``DTensor`` with ``param``'s mesh and placements when ``param`` is one (sharing
    ``block``'s storage), else ``block``. Used for optimizer state, which torch.distributed's
    checkpointing expects in the parameter's layout."""
    if is_sharded(param):
        return _DTENSOR.from_local(block, param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride())
    return block


@dataclass
class Block:
    """A rank's block of one parameter: global offset and local size per dim, and whether the
    rank's values count in cross-rank sums."""

    offset: Tuple[int, ...]
    shape: Tuple[int, ...]
    owner: bool


class Sharding:
    """The local blocks of a set of parameters, some of them ``DTensor`` on one device mesh.

    Args:
        params: the parameters (``DTensor`` or plain); at least one ``DTensor``.

    Raises:
        fxprune.UnsupportedInputError: ``DTensor`` parameters on different meshes, or a
            placement other than ``Shard(d)`` / ``Replicate()`` (e.g. ``Partial`` or a strided
            shard of nested parallelism).
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        import torch.distributed as dist

        meshes: List = []  # equal meshes (each fully_shard call may build its own) count once
        for p in params:
            if is_sharded(p) and not any(p.device_mesh == m for m in meshes):
                meshes.append(p.device_mesh)
        if len(meshes) != 1:
            raise UnsupportedInputError(f"sharded parameters on {len(meshes)} device meshes; fxprune's "
                                        f"optimizers take parameters on one mesh")
        mesh = meshes[0]
        self.mesh = mesh
        coord = mesh.get_coordinate()
        if coord is None:
            raise UnsupportedInputError("this rank is not part of the parameters' device mesh")
        if mesh.ndim == 1:
            self.group = mesh.get_group()
        elif mesh.size() == dist.get_world_size():
            self.group = dist.group.WORLD
        else:  # the ranks of a multi-dim mesh that spans part of the world (collective, once)
            self.group = dist.new_group(sorted(mesh.mesh.flatten().tolist()))
        self._coord = tuple(coord)
        self._blocks: Dict[int, Tuple[torch.Tensor, Block]] = {}
        for p in params:
            self.block(p)

    def block(self, p: torch.Tensor) -> Block:
        """The rank's block of ``p`` (computed once per tensor)."""
        hit = self._blocks.get(id(p))
        if hit is not None and hit[0] is p:
            return hit[1]
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if not is_sharded(p):
            b = Block(tuple(0 for _ in p.shape), tuple(p.shape), all(c == 0 for c in self._coord))
        else:
            if p.device_mesh != self.mesh:
                raise UnsupportedInputError("sharded parameters on several device meshes; fxprune's "
                                            "optimizers take parameters on one mesh")
            for pl in p.placements:
                if type(pl) not in (Shard, Replicate):
                    raise UnsupportedInputError(
                        f"a parameter of shape {tuple(p.shape)} has placement {pl}; fxprune's optimizers "
                        f"take Shard(dim) and Replicate() placements (FSDP2's, HSDP's)")
            shape, offset = compute_local_shape_and_global_offset(p.shape, self.mesh, p.placements)
            owner = all(c == 0 for c, pl in zip(self._coord, p.placements) if isinstance(pl, Replicate))
            b = Block(tuple(int(o) for o in offset), tuple(int(s) for s in shape), owner)
        self._blocks[id(p)] = (p, b)  # the tensor is kept, so that its id is not reused
        return b

    def rows(self, p: torch.Tensor, dim: int) -> Tuple[int, int]:
        """``(lo, n)``: the local rows of ``p`` along ``dim`` are global rows ``lo .. lo + n - 1``."""
        b = self.block(p)
        if not b.shape:
            return 0, 1
        return b.offset[dim], b.shape[dim]

    def localize(self, p: torch.Tensor, dim: int, rows: torch.Tensor) -> torch.Tensor:
        """Global positions ``rows`` along ``dim`` of ``p`` -> positions in the local block (the
        ones the rank holds)."""
        lo, n = self.rows(p, dim)
        if lo == 0 and n == (p.shape[dim] if p.dim() else 1):
            return rows
        keep = (rows >= lo) & (rows < lo + n)
        return rows[keep] - lo

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the mesh's ranks, in place (a collective: every rank calls it)."""
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t


def entry_blocks(sharding: Optional[Sharding], entries: Sequence) -> List[Tuple[int, int, bool]]:
    """``(lo, n, owner)`` of every layout entry along its dim: the whole dim, owned, without
    sharding."""
    out = []
    for e in entries:
        if sharding is None:
            out.append((0, e.size, True))
        else:
            lo, n = sharding.rows(e.param, e.dim)
            out.append((lo, n, sharding.block(e.param).owner))
    return out
