"""Output metadata of common ops from their inputs' metadata, with no data touched.

Shape propagation (:mod:`fxprune.passes.shape_prop`) needs, for every node, the shape, dtype
and strides eager CPU execution would give. Running the op on meta tensors gives them without
computing, but many of torch's meta kernels are Python reference implementations that cost
more than the op itself at a small input (a meta ``relu`` takes about 250 us, a meta
``batch_norm`` 600 us). The rules here compute the same metadata directly for the ops that make
up most graphs, and build the output as a meta tensor (``torch.empty_strided`` on the meta
device, about 1 us).

A rule takes the node's evaluated arguments (meta tensors, real tensors or Python values) and
returns the output, or ``None`` when its inputs are not a case it covers (another layout, a
dtype promotion, an argument it does not check): the caller then runs the op on meta tensors
or, failing that, on real ones. A rule never accepts inputs that eager execution would reject:
every size and dtype check the kernel makes that the rule cannot mirror sends the op back to
the caller, whose run raises as eager execution does.

Layouts follow ATen's CPU kernels:

* pointwise ops (unary, binary, comparisons) use TensorIterator's output layout, computed by
  :func:`pointwise_strides` exactly as ``TensorIteratorBase::fast_set_up`` /
  ``reorder_dimensions`` / ``allocate_or_resize_outputs`` do;
* convolution, pooling, batch norm and group norm write a 4-d output in their input's
  ``suggest_memory_format()`` (a convolution's weight's too), other ranks row-major for a
  row-major input; linear layers and reductions are covered for row-major inputs, whose
  outputs are row-major;
* layer norm always writes a row-major output (``layer_norm_cpu`` makes its input contiguous).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

META = torch.device("meta")
Shape = Tuple[int, ...]

_CONTIGUOUS: Dict[Shape, Shape] = {}


def contiguous_strides(shape: Shape) -> Shape:
    """Row-major strides of ``shape`` as ATen computes them (a size-0 dim counts as 1)."""
    strides = _CONTIGUOUS.get(shape)
    if strides is None:
        acc, out = 1, []
        for size in reversed(shape):
            out.append(acc)
            acc *= max(size, 1)
        strides = _CONTIGUOUS[shape] = tuple(reversed(out))
    return strides


def channels_last_strides(shape: Shape) -> Shape:
    """``torch.channels_last`` (4-d) or ``channels_last_3d`` (5-d) strides of ``shape``."""
    n = len(shape)
    size = [max(s, 1) for s in shape]
    strides = [0] * n
    strides[1] = 1
    acc = size[1]
    for d in range(n - 1, 1, -1):
        strides[d] = acc
        acc *= size[d]
    strides[0] = acc
    return tuple(strides)


def is_row_major(t: torch.Tensor) -> bool:
    """``t`` has exactly the row-major strides of its shape (not just ``is_contiguous()``,
    which ignores the strides of size-1 dims)."""
    return t.stride() == contiguous_strides(tuple(t.shape))


def new(shape: Sequence[int], strides: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_strided(tuple(shape), tuple(strides), dtype=dtype, device=META)


def row_major(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    shape = tuple(shape)
    return new(shape, contiguous_strides(shape), dtype)


def _non_overlapping_and_dense(shape: Shape, strides: Shape) -> bool:
    """c10's ``compute_non_overlapping_and_dense``."""
    if len(shape) == 1:
        return shape[0] < 2 or strides[0] == 1
    perm = sorted(range(len(shape)), key=lambda d: (shape[d] < 2, strides[d] if shape[d] >= 2 else 0))
    required = 1
    for d in perm:
        if shape[d] < 2:
            return True
        if strides[d] != required:
            return False
        required *= shape[d]
    return True


_POINTWISE: Dict[Tuple, Shape] = {}


def pointwise_strides(shape: Shape, operands: Sequence[Tuple[Shape, Shape]], scalars: bool) -> Shape:
    """Strides TensorIterator gives the output of a pointwise op on CPU.

    ``shape``: the broadcast output shape; ``operands``: ``(shape, strides)`` of each tensor
    input in argument order; ``scalars``: whether a Python number is among the inputs (ATen
    wraps it as a 0-d tensor, which counts in the same-shape test and is broadcast elsewhere).
    """
    key = (shape, tuple(operands), scalars)
    out = _POINTWISE.get(key)
    if out is None:
        out = _POINTWISE[key] = _pointwise_strides(shape, operands, scalars)
    return out


def _pointwise_strides(shape: Shape, operands, scalars: bool) -> Shape:
    ndim = len(shape)
    shapes = [s for s, _ in operands] + ([()] if scalars else [])
    if all(s == shapes[0] for s in shapes):  # fast_set_up
        if all(st == contiguous_strides(s) or _lenient(s, st, contiguous_strides(s)) for s, st in operands):
            return contiguous_strides(shape)
        if ndim == 4 and all(_lenient(s, st, channels_last_strides(s)) for s, st in operands):
            return channels_last_strides(shape)
        if all(_non_overlapping_and_dense(s, st) for s, st in operands):
            first = operands[-1][1]
            if all(st == first for _, st in operands):
                return first
    # general path: broadcast strides, then insertion-sort the dims by stride
    broadcast = []
    for s, st in operands:
        off = ndim - len(s)
        b = [0] * ndim
        for i, (size, stride) in enumerate(zip(s, st)):
            b[off + i] = 0 if (size == 1 and shape[off + i] != 1) else stride
        broadcast.append(b)
    perm = _sort_dims(shape, broadcast)
    if perm == list(range(ndim - 1, -1, -1)):
        return contiguous_strides(shape)
    strides = [0] * ndim
    acc = 1
    for d in perm:
        strides[d] = acc
        acc *= shape[d]
    return tuple(strides)


def _sort_dims(shape: Shape, operand_strides: Sequence[Sequence[int]]) -> List[int]:
    """Dims from fastest- to slowest-moving, by insertion sort on the operands' strides, as
    ``TensorIteratorBase::reorder_dimensions`` and ``infer_dense_strides`` order them (a zero
    stride is ambiguous; of equal strides the smaller dim goes first)."""
    ndim = len(shape)

    def should_swap(d0: int, d1: int) -> int:
        for b in operand_strides:
            s0, s1 = b[d0], b[d1]
            if s0 == 0 or s1 == 0:
                continue
            if s0 < s1:
                return -1
            if s0 > s1:
                return 1
            if shape[d0] > shape[d1]:
                return 1
        return 0

    perm = list(range(ndim - 1, -1, -1))
    for i in range(1, ndim):
        dim1 = i
        for dim0 in range(i - 1, -1, -1):
            c = should_swap(perm[dim0], perm[dim1])
            if c > 0:
                perm[dim0], perm[dim1] = perm[dim1], perm[dim0]
                dim1 = dim0
            elif c < 0:
                break
    return perm


def empty_like_strides(shape: Shape, strides: Shape) -> Shape:
    """Strides of ``torch.empty_like(t)`` (``preserve_format``): ``t``'s own when it is dense and
    non-overlapping, else dense strides in the order of ``t``'s (c10's ``infer_dense_strides``)."""
    if _non_overlapping_and_dense(shape, strides):
        return strides
    out = [0] * len(shape)
    acc = 1
    for d in _sort_dims(shape, [strides]):
        out[d] = acc
        if shape[d] > 1:
            acc *= shape[d]
    return tuple(out)


def _lenient(shape: Shape, strides: Shape, target: Shape) -> bool:
    """``is_contiguous(memory_format)`` of a non-empty tensor: the strides match ``target`` on
    every dim of size > 1."""
    return all(size == 1 or s == t for size, s, t in zip(shape, strides, target))


_BROADCAST: Dict[Tuple[Shape, ...], Optional[Shape]] = {}


def broadcast_shapes(shapes: Tuple[Shape, ...]) -> Optional[Shape]:
    """The broadcast shape, or None when the shapes do not broadcast."""
    out = _BROADCAST.get(shapes, False)
    if out is False:
        ndim = max(len(s) for s in shapes)
        result = [1] * ndim
        ok = True
        for s in shapes:
            for i, size in enumerate(s):
                j = ndim - len(s) + i
                if size == result[j] or size == 1:
                    continue
                if result[j] == 1:
                    result[j] = size
                else:
                    ok = False
        out = _BROADCAST[shapes] = tuple(result) if ok else None
    return out


# --------------------------------------------------------------------------------------------
# argument access


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if i < len(args):
        return args[i]
    return kwargs.get(name, default)


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype.is_floating_point


_NUMBER = (bool, int, float)


# --------------------------------------------------------------------------------------------
# pointwise ops


def unary(x: Any) -> Optional[torch.Tensor]:
    """A floating-point pointwise op of one non-empty tensor (activations)."""
    if not _float(x) or x.layout != torch.strided:
        return None
    shape = tuple(x.shape)
    if 0 in shape:
        return None
    return new(shape, pointwise_strides(shape, ((shape, x.stride()),), False), x.dtype)


def _same(x: Any) -> Any:
    return x


def binary(operands: Sequence[Any], kind: str = "arith") -> Optional[torch.Tensor]:
    """A broadcasting pointwise op. ``kind``: ``"arith"`` (result dtype = the operands'),
    ``"div"`` (true division: floating operands only) or ``"compare"`` (bool result).

    Covered: every tensor operand has the same dtype and each other operand is a Python
    number that does not change that dtype under type promotion."""
    tensors = [x for x in operands if isinstance(x, torch.Tensor)]
    if not tensors or len(tensors) + sum(isinstance(x, _NUMBER) for x in operands) != len(operands):
        return None
    dtype = tensors[0].dtype
    if any(t.dtype != dtype or t.layout != torch.strided for t in tensors) or dtype.is_complex:
        return None
    scalars = [x for x in operands if not isinstance(x, torch.Tensor)]
    if dtype.is_floating_point:
        pass
    elif dtype == torch.bool:
        if any(type(s) is not bool for s in scalars) or kind != "compare":
            return None  # bool arithmetic promotes or is refused
    elif any(isinstance(s, float) for s in scalars) or kind == "div":
        return None
    shapes = tuple(tuple(t.shape) for t in tensors)
    shape = broadcast_shapes(shapes)
    if shape is None or 0 in shape:
        return None
    strides = pointwise_strides(shape, tuple(zip(shapes, (t.stride() for t in tensors))), bool(scalars))
    return new(shape, strides, torch.bool if kind == "compare" else dtype)


def inplace_binary(operands: Sequence[Any]) -> Optional[torch.Tensor]:
    """``x += y`` and the like: the result is ``x`` itself, if ``y`` broadcasts to it."""
    x = operands[0]
    out = binary(operands)
    if out is None or not isinstance(x, torch.Tensor) or tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        return None
    return x


# --------------------------------------------------------------------------------------------
# layers


def _tuple(v: Any, n: int) -> Tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(v)
    return v * n if len(v) == 1 else v


def conv(x: Any, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
         groups: int, n: int) -> Optional[torch.Tensor]:
    """``torch.conv{n}d`` on a row-major input with a row-major weight: a row-major output."""
    if not (_float(x) and _is_tensor(weight)) or x.dtype != weight.dtype or x.dim() not in (n + 1, n + 2):
        return None
    if bias is not None and (not _is_tensor(bias) or bias.dtype != x.dtype or tuple(bias.shape) != (weight.shape[0],)):
        return None
    if weight.dim() != n + 2 or not isinstance(groups, int):
        return None
    batched = x.dim() == n + 2
    c_in = x.shape[1 if batched else 0]
    if groups < 1 or weight.shape[0] % groups or c_in != weight.shape[1] * groups:
        return None
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    kernel = tuple(weight.shape[2:])
    spatial = tuple(x.shape[-n:])
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0,) * n
        elif padding == "same" and all(s == 1 for s in stride):
            out = spatial
            padding = None
        else:
            return None
    if padding is not None:
        padding = _tuple(padding, n)
        if len(padding) != n or len(stride) != n or len(dilation) != n:
            return None
        out = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                    for size, p, d, k, s in zip(spatial, padding, dilation, kernel, stride))
    if any(o < 1 for o in out) or any(s < 1 for s in stride):
        return None
    lead = (x.shape[0], weight.shape[0]) if batched else (weight.shape[0],)
    if (n != 2 or not batched) and not (is_row_major(x) and is_row_major(weight)):
        return None
    if not batched:
        return row_major(lead + out, x.dtype)
    strides = layout(x, "conv", weight)
    shape = lead + out
    if strides is None:
        return None
    if strides is channels_last_strides and x.dtype != torch.float32 and _lenient(
            shape, channels_last_strides(shape), contiguous_strides(shape)):
        # a channels-last output that is also contiguous, outside mkldnn (float32): the
        # depthwise kernel writes it row-major, the others channels last
        if groups == 1:
            pass
        elif groups == c_in and weight.shape[1] == 1:
            strides = contiguous_strides
        else:
            return None
    return new(shape, strides(shape), x.dtype)


def _conv_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) != 1 or kwargs or m.padding_mode != "zeros":
        return None
    return conv(args[0], m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, len(m.kernel_size))


def _conv_function(n: int) -> Callable:
    def rule(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        return conv(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias"),
                    _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0),
                    _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1), n)
    return rule


def linear(x: Any, weight: Any, bias: Any) -> Optional[torch.Tensor]:
    """``F.linear`` on a row-major input: a row-major output."""
    if not (_float(x) and _is_tensor(weight)) or weight.dim() != 2 or x.dim() < 1 or x.dtype != weight.dtype:
        return None
    if x.shape[-1] != weight.shape[1] or not is_row_major(x):
        return None
    if bias is not None and (not _is_tensor(bias) or bias.dtype != x.dtype or tuple(bias.shape) != (weight.shape[0],)):
        return None
    return row_major(tuple(x.shape[:-1]) + (weight.shape[0],), x.dtype)


def strides_like_channels_last(shape: Shape, strides: Shape) -> bool:
    """c10's ``is_channels_last_strides_2d`` for a 4-d tensor: the test behind
    ``Tensor.suggest_memory_format()``."""
    if len(shape) != 4 or strides[1] == 0:
        return False
    smallest = 0
    for d in (1, 3, 2, 0):
        if strides[d] == 0 or strides[d] < smallest:
            return False
        if d == 0 and smallest == strides[1]:
            return False
        smallest = strides[d] * shape[d] if shape[d] > 1 else strides[d]
    return True


def layout(x: torch.Tensor, kind: str = "suggest", weight: Optional[torch.Tensor] = None
           ) -> Optional[Callable[[Shape], Shape]]:
    """The strides ATen's CPU convolution, pooling and normalisation kernels give their output,
    as a function of the output shape; None where this is not known.

    A 4-d input's ``suggest_memory_format()`` decides (``"suggest"``: pooling, group norm; a
    convolution, ``"conv"``, also looks at its weight and is left out for inputs that are both
    contiguous and channels-last-like, where backends differ); batch norm (``"batch_norm"``)
    keeps an input that ``is_contiguous()`` row-major. Other ranks: row-major for a row-major
    input."""
    shape = tuple(x.shape)
    strides = x.stride()
    if len(shape) != 4:
        return contiguous_strides if strides == contiguous_strides(shape) else None
    contiguous = _lenient(shape, strides, contiguous_strides(shape))
    like_cl = strides_like_channels_last(shape, strides)
    if kind == "batch_norm":
        if contiguous:
            return contiguous_strides
        if _lenient(shape, strides, channels_last_strides(shape)):
            return channels_last_strides
    elif kind == "conv":
        if contiguous and like_cl:
            return None
        if weight is not None and strides_like_channels_last(tuple(weight.shape), weight.stride()):
            return channels_last_strides
    return channels_last_strides if like_cl else contiguous_strides


def _like_layout(x: torch.Tensor, shape: Shape, kind: str = "suggest",
                 weight: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    strides = layout(x, kind, weight)
    return None if strides is None else new(shape, strides(shape), x.dtype)


def _batch_norm_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    x = args[0] if len(args) == 1 and not kwargs else None
    dims = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}[type(m)]
    if not _float(x) or x.dim() not in dims or x.shape[1] != m.num_features:
        return None
    if m.training or not m.track_running_stats or m.running_mean is None:
        return None  # batch statistics: sizes are checked at run time
    if any(p is not None and p.dtype != x.dtype for p in (m.weight, m.bias, m.running_mean, m.running_var)):
        return None
    return _like_layout(x, tuple(x.shape), "batch_norm")


def layer_norm(x: Any, normalized_shape, weight, bias) -> Optional[torch.Tensor]:
    """``F.layer_norm``: a row-major output whatever the input layout (``layer_norm_cpu``
    computes on a contiguous copy)."""
    if not _float(x):
        return None
    normalized_shape = _tuple(normalized_shape, 1)
    k = len(normalized_shape)
    if k == 0 or x.dim() < k or tuple(x.shape[-k:]) != normalized_shape:
        return None
    for p in (weight, bias):
        if p is not None and (not _is_tensor(p) or p.dtype != x.dtype or tuple(p.shape) != normalized_shape):
            return None
    return row_major(tuple(x.shape), x.dtype)


def _layer_norm_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) != 1 or kwargs:
        return None
    return layer_norm(args[0], m.normalized_shape, m.weight, m.bias)


def _layer_norm_function(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    return layer_norm(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape"),
                      _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"))


def group_norm(x: Any, num_groups: Any, weight: Any, bias: Any) -> Optional[torch.Tensor]:
    """Group norm: the input's layout (see :func:`layout`)."""
    if not _float(x) or x.dim() < 2 or not isinstance(num_groups, int) or num_groups < 1 or x.shape[1] % num_groups:
        return None
    for p in (weight, bias):
        if p is not None and (not _is_tensor(p) or p.dtype != x.dtype or tuple(p.shape) != (x.shape[1],)):
            return None
    return _like_layout(x, tuple(x.shape))


def _group_norm_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) != 1 or kwargs or args[0].shape[1] != m.num_channels:
        return None
    return group_norm(args[0], m.num_groups, m.weight, m.bias)


def _group_norm_function(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``group_norm(input, num_groups, weight, bias, eps, ...)`` (``F`` and ATen)."""
    return group_norm(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "num_groups"),
                      _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias"))


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """ATen's ``pooling_output_shape``."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def pool(x: Any, n: int, kernel, stride, padding, dilation, ceil_mode: bool, kind: str) -> Optional[torch.Tensor]:
    """Max or average pooling of a row-major ``(N, C, *spatial)`` or ``(C, *spatial)`` input."""
    if not _float(x) or x.dim() not in (n + 1, n + 2) or not isinstance(ceil_mode, bool):
        return None
    kernel = _tuple(kernel, n)
    stride = _tuple(stride, n) if stride not in (None, (), []) else kernel
    padding, dilation = _tuple(padding, n), _tuple(dilation, n)
    if not all(len(v) == n for v in (kernel, stride, padding, dilation)):
        return None
    if any(v < 1 for v in kernel + stride + dilation):
        return None
    out = []
    for size, k, s, p, d in zip(x.shape[-n:], kernel, stride, padding, dilation):
        limit = ((k - 1) * d + 1) // 2 if kind == "max" else k // 2
        if p < 0 or p > limit:
            return None
        o = _pool_size(size, k, s, p, d, ceil_mode)
        if o < 1:
            return None
        out.append(o)
    return _like_layout(x, tuple(x.shape[:-n]) + tuple(out))


def _max_pool_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) != 1 or kwargs or m.return_indices:
        return None
    n = _POOL_RANK[type(m)]
    return pool(args[0], n, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, "max")


def _avg_pool_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) != 1 or kwargs or getattr(m, "divisor_override", None) is not None:
        return None
    n = _POOL_RANK[type(m)]
    return pool(args[0], n, m.kernel_size, m.stride, m.padding, 1, m.ceil_mode, "avg")


def adaptive_pool(x: Any, n: int, output_size) -> Optional[torch.Tensor]:
    if not _float(x) or x.dim() not in (n + 1, n + 2):
        return None
    size = (output_size,) * n if isinstance(output_size, int) else tuple(output_size)
    if len(size) != n:
        return None
    spatial = tuple(x.shape[-n:])
    out = tuple(s if o is None else o for o, s in zip(size, spatial))
    if any(not isinstance(o, int) or o < 1 for o in out) or any(s < 1 for s in spatial):
        return None
    return _like_layout(x, tuple(x.shape[:-n]) + out)


def _adaptive_pool_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) != 1 or kwargs or getattr(m, "return_indices", False):
        return None
    return adaptive_pool(args[0], _POOL_RANK[type(m)], m.output_size)


def _adaptive_avg_pool_function(n: int) -> Callable:
    def rule(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        return adaptive_pool(_arg(args, kwargs, 0, "input"), n, _arg(args, kwargs, 1, "output_size"))
    return rule


def _max_pool_function(n: int) -> Callable:
    def rule(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        if _arg(args, kwargs, 6, "return_indices", False):
            return None
        k = _arg(args, kwargs, 1, "kernel_size")
        return pool(_arg(args, kwargs, 0, "input"), n, k, _arg(args, kwargs, 2, "stride"),
                    _arg(args, kwargs, 3, "padding", 0), _arg(args, kwargs, 4, "dilation", 1),
                    _arg(args, kwargs, 5, "ceil_mode", False), "max")
    return rule


def cat(tensors: Any, dim: Any) -> Optional[torch.Tensor]:
    """``torch.cat`` of row-major tensors of one dtype: a row-major output."""
    if not isinstance(tensors, (list, tuple)) or not tensors or not isinstance(dim, int):
        return None
    if not all(_is_tensor(t) for t in tensors):
        return None
    first = tensors[0]
    ndim = first.dim()
    if ndim == 0 or not -ndim <= dim < ndim:
        return None
    d = dim % ndim
    shape = list(first.shape)
    total = 0
    for t in tensors:
        if t.dtype != first.dtype or t.dim() != ndim or t.layout != torch.strided or not is_row_major(t):
            return None
        if any(a != b for i, (a, b) in enumerate(zip(t.shape, shape)) if i != d):
            return None
        total += t.shape[d]
    shape[d] = total
    return row_major(shape, first.dtype)


def _cat_function(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    return cat(_arg(args, kwargs, 0, "tensors"), _arg(args, kwargs, 1, "dim", 0))


def mean(x: Any, dim: Any, keepdim: Any, dtype: Any) -> Optional[torch.Tensor]:
    """``mean`` over some dims of a row-major floating-point tensor: a row-major output."""
    if not _float(x) or dtype is not None or not isinstance(keepdim, bool) or not is_row_major(x):
        return None
    ndim = x.dim()
    if dim is None:
        dims = set(range(ndim))
    else:
        dims_list = [dim] if isinstance(dim, int) else list(dim) if isinstance(dim, (list, tuple)) else None
        if dims_list is None or not all(isinstance(d, int) and -max(ndim, 1) <= d < max(ndim, 1) for d in dims_list):
            return None
        dims = {d % max(ndim, 1) for d in dims_list}
        if len(dims) != len(dims_list):
            return None
        if not dims_list:
            dims = set(range(ndim))
    if ndim == 0 or any(x.shape[d] == 0 for d in dims):
        return None
    shape = [1 if d in dims else s for d, s in enumerate(x.shape)] if keepdim else \
        [s for d, s in enumerate(x.shape) if d not in dims]
    return row_major(shape, x.dtype)


def _mean_method(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    return mean(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "dim"), _arg(args, kwargs, 2, "keepdim", False),
                _arg(args, kwargs, 3, "dtype"))


def batch_norm(x: Any, weight: Any, bias: Any, running_mean: Any, running_var: Any, training: Any) -> Optional[torch.Tensor]:
    """Batch norm with running statistics (inference): the input's layout (see :func:`layout`)."""
    if not _float(x) or x.dim() < 2 or training is not False or running_mean is None or running_var is None:
        return None
    c = x.shape[1]
    for p in (weight, bias, running_mean, running_var):
        if p is not None and (not _is_tensor(p) or p.dtype != x.dtype or tuple(p.shape) != (c,)):
            return None
    return _like_layout(x, tuple(x.shape), "batch_norm")


def _batch_norm_function(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, ...)``."""
    return batch_norm(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias"),
                      _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var"),
                      _arg(args, kwargs, 5, "training", False))


def _aten_batch_norm(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``aten.batch_norm(input, weight, bias, running_mean, running_var, training, ...)``."""
    return batch_norm(*(_arg(args, kwargs, i, n) for i, n in enumerate(
        ("input", "weight", "bias", "running_mean", "running_var", "training"))))


def _avg_pool_function(n: int) -> Callable:
    """``avg_pool{n}d(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)``."""
    def rule(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        if _arg(args, kwargs, 6, "divisor_override") is not None:
            return None
        return pool(_arg(args, kwargs, 0, "input"), n, _arg(args, kwargs, 1, "kernel_size"),
                    _arg(args, kwargs, 2, "stride"), _arg(args, kwargs, 3, "padding", 0), 1,
                    _arg(args, kwargs, 4, "ceil_mode", False), "avg")
    return rule


def scaled_dot_product_attention(q: Any, k: Any, v: Any, attn_mask: Any = None, dropout_p: Any = 0.0,
                                 is_causal: Any = False, scale: Any = None, enable_gqa: Any = False) -> Optional[torch.Tensor]:
    """``F.scaled_dot_product_attention`` where the CPU runs its flash kernel: 4-d float32/float64
    ``(B, H, L, E)`` inputs of one head size whose last dims are contiguous, no dropout, a
    boolean or same-dtype mask. The output is laid out like ``torch.empty_like(query)``, as the
    kernel allocates it."""
    if not (_float(q) and _is_tensor(k) and _is_tensor(v)) or q.dtype not in (torch.float32, torch.float64):
        return None
    if any(t.dtype != q.dtype or t.dim() != 4 or t.stride(-1) != 1 for t in (q, k, v)):
        return None
    if dropout_p != 0 or not isinstance(is_causal, bool) or not isinstance(enable_gqa, bool):
        return None
    if not (scale is None or isinstance(scale, (int, float))):
        return None
    (b, h, n, e), (bk, hk, s, ek), (bv, hv, sv, ev) = q.shape, k.shape, v.shape
    if not (b == bk == bv and e == ek == ev and s == sv and hk == hv and s > 0 and n > 0):
        return None
    if hk != h and not (enable_gqa and hk > 0 and h % hk == 0):
        return None
    if attn_mask is not None:
        if is_causal or not _is_tensor(attn_mask) or attn_mask.dtype not in (torch.bool, q.dtype):
            return None
        if broadcast_shapes((tuple(attn_mask.shape), (b, h, n, s))) != (b, h, n, s):
            return None
    return new((b, h, n, ev), empty_like_strides(tuple(q.shape), q.stride()), q.dtype)


def _sdpa_function(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    if len(args) > len(names) or set(kwargs) - set(names):
        return None
    defaults = (None, None, None, None, 0.0, False, None, False)
    return scaled_dot_product_attention(*(_arg(args, kwargs, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))))


def _aten_dropout(args: tuple, kwargs: dict) -> Any:
    """``aten.dropout(input, p, train)``: the input itself when not training."""
    x = _arg(args, kwargs, 0, "input")
    return x if _is_tensor(x) and _arg(args, kwargs, 2, "train") is False else None


# --------------------------------------------------------------------------------------------
# the tables


def _unary_function(inplace_at: Optional[int]) -> Callable:
    """An activation function; with ``inplace=True`` its result is its input."""
    def rule(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        x = _arg(args, kwargs, 0, "input")
        if inplace_at is not None and _arg(args, kwargs, inplace_at, "inplace", False):
            return _same(x) if _float(x) else None
        return unary(x)
    return rule


def _unary_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if len(args) != 1 or kwargs:
        return None
    if getattr(m, "inplace", False):
        return args[0] if _float(args[0]) else None
    return unary(args[0])


def _identity_module(m: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Modules that return their input in eval mode (dropout, stochastic depth, identity)."""
    if len(args) != 1 or kwargs or not _is_tensor(args[0]):
        return None
    if isinstance(m, nn.Identity) or not m.training:
        return args[0]
    return None


def _binary_function(kind: str) -> Callable:
    def rule(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        if kwargs and set(kwargs) - {"alpha"} or len(args) != 2:
            return None
        alpha = kwargs.get("alpha", 1)
        if not isinstance(alpha, _NUMBER) or isinstance(alpha, float) and not all(
                _float(a) for a in args if _is_tensor(a)):
            return None
        return binary(args, kind)
    return rule


def _inplace_function(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    if kwargs or len(args) != 2:
        return None
    return inplace_binary(args)


_POOL_RANK: Dict[type, int] = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}

_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                  nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh)

MODULE_RULES: Dict[type, Callable] = {
    **{cls: _conv_module for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    **{cls: _batch_norm_module for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    nn.Linear: lambda m, args, kwargs: linear(args[0], m.weight, m.bias) if len(args) == 1 and not kwargs else None,
    nn.LayerNorm: _layer_norm_module,
    nn.GroupNorm: _group_norm_module,
    **{cls: _unary_module for cls in _UNARY_MODULES},
    **{cls: _identity_module for cls in (nn.Identity, nn.Dropout, nn.AlphaDropout)},
    **{cls: _max_pool_module for cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)},
    **{cls: _avg_pool_module for cls in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)},
    **{cls: _adaptive_pool_module for cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                                              nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)},
}

try:  # torchvision's stochastic depth is the identity in eval mode
    from torchvision.ops import StochasticDepth

    MODULE_RULES[StochasticDepth] = _identity_module
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass

# activation functions and the position of their ``inplace`` argument (None: none)
_UNARY_FUNCTIONS: Dict[Callable, Optional[int]] = {
    F.relu: 1, F.relu6: 1, F.silu: 1, F.hardswish: 1, F.hardsigmoid: 1, F.mish: 1, F.selu: 1,
    F.elu: 2, F.celu: 2, F.leaky_relu: 2, F.hardtanh: 3, F.gelu: None, F.softplus: None,
    torch.relu: None, torch.sigmoid: None, torch.tanh: None, F.sigmoid: None, F.tanh: None,
    torch.exp: None, torch.rsqrt: None, torch.sqrt: None, torch.neg: None, torch.erf: None,
}

_ARITH = (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, torch.subtract,
          torch.multiply)
_DIV = (operator.truediv, torch.true_divide)
_COMPARE = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
            torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge)

FUNCTION_RULES: Dict[Any, Callable] = {
    **{f: _unary_function(i) for f, i in _UNARY_FUNCTIONS.items()},
    **{f: _binary_function("arith") for f in _ARITH},
    **{f: _binary_function("div") for f in _DIV},
    **{f: _binary_function("compare") for f in _COMPARE},
    **{f: _inplace_function for f in (operator.iadd, operator.isub, operator.imul)},
    torch.conv1d: _conv_function(1), torch.conv2d: _conv_function(2), torch.conv3d: _conv_function(3),
    F.linear: lambda args, kwargs: linear(_arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"),
                                          _arg(args, kwargs, 2, "bias")),
    F.layer_norm: _layer_norm_function,
    F.adaptive_avg_pool1d: _adaptive_avg_pool_function(1), F.adaptive_avg_pool2d: _adaptive_avg_pool_function(2),
    F.adaptive_avg_pool3d: _adaptive_avg_pool_function(3),
    F.max_pool1d: _max_pool_function(1), F.max_pool2d: _max_pool_function(2), F.max_pool3d: _max_pool_function(3),
    torch.cat: _cat_function, torch.concat: _cat_function, torch.concatenate: _cat_function,
    torch.mean: _mean_method,
}

FUNCTION_RULES[F.batch_norm] = _batch_norm_function
FUNCTION_RULES[F.group_norm] = _group_norm_function
FUNCTION_RULES[F.scaled_dot_product_attention] = _sdpa_function
FUNCTION_RULES[torch._C._nn.avg_pool2d] = _avg_pool_function(2)


def _aten_rules() -> Dict[Any, Callable]:
    """The same rules for the ATen ops of a ``torch.export`` graph (same argument order)."""
    aten = torch.ops.aten
    inplace_unary = lambda args, kwargs: args[0] if len(args) == 1 and not kwargs and _float(args[0]) else None  # noqa: E731
    table = {
        "conv1d.default": _conv_function(1), "conv2d.default": _conv_function(2), "conv3d.default": _conv_function(3),
        "conv1d.padding": _conv_function(1), "conv2d.padding": _conv_function(2), "conv3d.padding": _conv_function(3),
        "linear.default": FUNCTION_RULES[F.linear], "layer_norm.default": _layer_norm_function,
        "batch_norm.default": _aten_batch_norm, "group_norm.default": _group_norm_function,
        "cat.default": _cat_function, "mean.dim": _mean_method,
        "adaptive_avg_pool1d.default": _adaptive_avg_pool_function(1),
        "adaptive_avg_pool2d.default": _adaptive_avg_pool_function(2),
        "adaptive_avg_pool3d.default": _adaptive_avg_pool_function(3),
        "max_pool1d.default": _max_pool_function(1), "max_pool2d.default": _max_pool_function(2),
        "max_pool3d.default": _max_pool_function(3), "avg_pool2d.default": _avg_pool_function(2),
        "dropout.default": _aten_dropout, "scaled_dot_product_attention.default": _sdpa_function,
        **{f"{op}.Tensor": _binary_function("arith") for op in ("add", "sub", "mul")},
        **{f"{op}.Scalar": _binary_function("arith") for op in ("add", "sub", "mul")},
        "div.Tensor": _binary_function("div"), "div.Scalar": _binary_function("div"),
        **{f"{op}.{kind}": _binary_function("compare") for op in ("eq", "ne", "lt", "le", "gt", "ge")
           for kind in ("Tensor", "Scalar")},
        **{f"{op}_.Tensor": _inplace_function for op in ("add", "sub", "mul")},
        **{f"{op}.default": (lambda args, kwargs: unary(args[0]) if len(args) == 1 and not kwargs else None)
           for op in ("relu", "sigmoid", "tanh", "exp", "rsqrt", "sqrt", "neg", "erf", "silu", "hardswish",
                      "hardsigmoid", "mish", "selu")},
        **{f"{op}_.default": inplace_unary for op in ("relu", "sigmoid", "tanh", "silu", "hardswish", "hardsigmoid",
                                                      "mish", "selu")},
        "gelu.default": lambda args, kwargs: unary(args[0]) if args else None,
        "hardtanh.default": lambda args, kwargs: unary(args[0]) if args else None,
        "hardtanh_.default": lambda args, kwargs: args[0] if args and _float(args[0]) else None,
    }
    out = {}
    for name, rule in table.items():
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload, None)
        if op is not None:
            out[op] = rule
    return out


FUNCTION_RULES.update(_aten_rules())

_UNARY_METHODS = ("relu", "sigmoid", "tanh", "exp", "rsqrt", "sqrt", "neg", "erf")
_INPLACE_UNARY_METHODS = ("relu_", "sigmoid_", "tanh_", "exp_", "rsqrt_", "sqrt_", "neg_", "erf_")

METHOD_RULES: Dict[str, Callable] = {
    **{m: (lambda args, kwargs: unary(args[0]) if len(args) == 1 and not kwargs else None) for m in _UNARY_METHODS},
    **{m: (lambda args, kwargs: args[0] if len(args) == 1 and not kwargs and _float(args[0]) else None)
       for m in _INPLACE_UNARY_METHODS},
    **{m: _binary_function("arith") for m in ("add", "sub", "mul", "__add__", "__sub__", "__mul__", "__radd__",
                                               "__rmul__")},
    **{m: _binary_function("div") for m in ("div", "true_divide", "__truediv__")},
    **{m: _binary_function("compare") for m in ("eq", "ne", "lt", "le", "gt", "ge")},
    **{m: _inplace_function for m in ("add_", "sub_", "mul_", "__iadd__", "__isub__", "__imul__")},
    "mean": _mean_method,
}


def _multihead_attention_module(m: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
    """``nn.MultiheadAttention`` on the inference fast path (``torch._native_multi_head_attention``:
    self-attention, batch first, no masks), which CPU and CUDA take under ``torch.no_grad()``
    in eval mode: a row-major output, and row-major attention weights when they are asked for.
    Every other call goes through ``F.multi_head_attention_forward``, which meta tensors run."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    if len(args) > len(names) or set(kwargs) - set(names):
        return None
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(names[:3]))
    need_weights, average = _arg(args, kwargs, 4, "need_weights", True), _arg(args, kwargs, 6, "average_attn_weights", True)
    if _arg(args, kwargs, 7, "is_causal", False) or not isinstance(need_weights, bool) or not isinstance(average, bool):
        return None
    if _arg(args, kwargs, 3, "key_padding_mask") is not None or _arg(args, kwargs, 5, "attn_mask") is not None:
        return None
    if not (_float(q) and q is k and k is v and q.dim() == 3 and q.shape[-1] == m.embed_dim and q.layout == torch.strided):
        return None
    params = (m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias)
    if any(p is None or p.dtype != q.dtype or p.device.type not in ("cpu", "cuda") for p in params):
        return None
    if (not torch.backends.mha.get_fastpath_enabled() or m.training or m.num_heads % 2 or not m.batch_first
            or m.bias_k is not None or m.bias_v is not None or m.add_zero_attn or not m._qkv_same_embed_dim
            or torch.is_autocast_enabled() or torch.is_grad_enabled()):
        return None
    n, length = q.shape[0], q.shape[1]
    weights = None
    if need_weights:
        weights = row_major((n, length, length) if average else (n, m.num_heads, length, length), q.dtype)
    return row_major(tuple(q.shape), q.dtype), weights


MODULE_RULES[nn.MultiheadAttention] = _multihead_attention_module

# the method rules keyed as a TorchFunctionMode sees them (``torch.Tensor.add`` ...)
TENSOR_METHOD_RULES: Dict[Any, Callable] = {getattr(torch.Tensor, name): rule for name, rule in METHOD_RULES.items()
                                            if hasattr(torch.Tensor, name)}


def module_rule(module: nn.Module) -> Optional[Callable]:
    """The rule for a module of exactly this class (a subclass may override ``forward``)."""
    return MODULE_RULES.get(type(module))


def function_rule(target: Any) -> Optional[Callable]:
    """The rule for a function, or for a ``torch.Tensor`` method given as the method object."""
    try:
        return FUNCTION_RULES.get(target) or TENSOR_METHOD_RULES.get(target)
    except TypeError:  # unhashable target
        return None


def method_rule(name: str) -> Optional[Callable]:
    return METHOD_RULES.get(name)


__all__ = ["FUNCTION_RULES", "METHOD_RULES", "MODULE_RULES", "binary", "broadcast_shapes", "channels_last_strides",
           "contiguous_strides", "function_rule", "is_row_major", "method_rule", "module_rule", "pointwise_strides",
           "unary"]
