"""IR types of fxprune's analyses: parameter slices and zero-invariant groups (ZIGs).

Terminology (OTOv2, Chen et al., ICLR 2023, Sec. 3.1): a *zero-invariant group* is a set of
parameter entries that, when all zero, make one channel exactly zero wherever it flows, so
the channel can be removed with no change to the network's output. fxprune's :class:`Group`
collects the channels that share the same parameter slices (e.g. the 64 output channels of a
conv, its bias, the following BatchNorm's affine parameters and the residual adds they join);
each channel of a group is one ZIG.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch


@dataclass(frozen=True)
class Slice:
    """The positions of one parameter (or buffer) dimension that belong to a group.

    Attributes:
        param: qualified name in ``Program.module`` (``"layer1.0.conv1.weight"``).
        dim: the tensor dimension the positions index.
        index: ``LongTensor[n]``, positions along ``dim``.
        channel: ``LongTensor[n]``, for each position the group channel (``0 <= c < size``)
            it belongs to. A channel may own several positions (e.g. a flattened
            ``C x H x W`` feature map gives each channel ``H*W`` input columns of a Linear).
        role: ``"out"`` (producer: zeroing it zeroes the channel; in ``Group.slices``),
            ``"in"`` (consumer: reads the channel; removed with it, never zeroed) or
            ``"buffer"`` (a buffer sliced with the channel, e.g. BN running statistics).
    """

    param: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    role: str = "out"

    def indices_of(self, c: int) -> torch.Tensor:
        """Positions along ``dim`` owned by group channel ``c``."""
        return self.index[self.channel == c]

    def __repr__(self) -> str:
        return f"Slice({self.param}[dim {self.dim}], {self.index.numel()} positions, {self.role})"


@dataclass
class Group:
    """A group of channels that are pruned together, each channel one zero-invariant group.

    Attributes:
        id: stable integer id (order of first appearance in the graph).
        size: number of channels.
        slices: producer slices (role ``"out"``): zeroing channel ``c`` in all of them makes
            the channel exactly zero downstream. These are the variables optimizers act on.
        dependents: consumer (role ``"in"``) and buffer slices, removed with a channel but
            never zeroed.
        prunable: whether construction may remove channels of this group.
        exact: whether removing a zeroed channel leaves the output unchanged (False e.g. when
            the channel is normalised together with others by a softmax).
        reason: why the group is frozen or inexact (names the node and op), else None.
        nodes: names of the graph nodes whose outputs carry the group's channels.
    """

    id: int
    size: int
    slices: List[Slice]
    dependents: List[Slice] = field(default_factory=list)
    prunable: bool = True
    exact: bool = True
    reason: Optional[str] = None
    nodes: List[str] = field(default_factory=list)

    @property
    def params(self) -> List[str]:
        """Names of the parameters with producer slices in this group."""
        return sorted({s.param for s in self.slices})

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else "frozen"
        if not self.exact:
            state += ", inexact"
        why = f", reason={self.reason!r}" if self.reason else ""
        return f"Group(id={self.id}, size={self.size}, {state}, params={self.params}{why})"


@dataclass
class Erasable:
    """An operator-level erasable subgraph (OTOv3, Chen et al., arXiv 2312.09411, Sec. 3).

    The operators that feed the rest of the network only through one value, ``sink``, whose
    every consumer is a join (an add, or a concat whose consumers take a narrower input) that
    keeps another input. With all of ``params`` (and ``slices``) zero the sink is exactly zero,
    so the whole subgraph can be deleted and the join folded, with no change to the output.

    Attributes:
        id: stable integer id (order of the sink in the graph).
        nodes: names of the graph nodes it deletes, in graph order.
        params: qualified names of the parameters it owns (every entry is zeroed with it).
        parents: ids of the erasables that contain it, and of those whose joint erasure
            removes its input (e.g. every operator summed into a cell node it reads).
        flops: FLOPs of its nodes on the example inputs (``torch.utils.flop_counter``).
        num_params: parameter entries removed with it (``params`` plus ``slices``).
        sink: the node whose value it computes.
        joints: the add/concat nodes the sink feeds.
        slices: producer slices outside the subgraph that are zeroed with it: the downstream
            parameters (a norm's affine entries) of the channels a concat branch feeds.
        channels: ``{group id: channel indices}`` removed downstream when it is erased (the
            channels a concat branch contributes); empty for a branch of a sum.
        children: ids of the erasables it contains.
        kind: ``"sum"`` (its joins are adds), ``"concat"`` or ``"sum+concat"``.
    """

    id: int
    nodes: List[str]
    params: List[str]
    parents: List[int] = field(default_factory=list)
    flops: int = 0
    num_params: int = 0
    sink: str = ""
    joints: List[str] = field(default_factory=list)
    slices: List[Slice] = field(default_factory=list)
    channels: Dict[int, np.ndarray] = field(default_factory=dict)
    children: List[int] = field(default_factory=list)
    kind: str = "sum"

    def __repr__(self) -> str:
        par = f", parents={self.parents}" if self.parents else ""
        return (f"Erasable(id={self.id}, {self.kind}, sink={self.sink!r}, {len(self.nodes)} nodes, "
                f"{self.num_params} params, {self.flops} FLOPs{par})")
