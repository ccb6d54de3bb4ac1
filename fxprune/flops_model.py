"""FLOPs as a function of the kept channels of every group, read off the program's graph.

Every node's cost is written, by op type, as a sum of terms ``coef * f_1 * ... * f_k`` whose
factors are dimension sizes from the symbolic shapes of the channel analysis
(``node.meta["fxprune.shape"]``: sympy expressions linear in the group-size symbols
``prog.analysis.sym.full[g]`` and the subset symbols of sliced groups). A conv, for example,
costs ``2 * N * H_out * W_out * prod(weight shape)`` with the weight's dims ``c_out`` and
``c_in / groups`` symbolic. No architecture is special-cased: any graph built from the ops
below gets its cost function, and a new op type is one :func:`register_flops` away.

Counting conventions are those of ``torch.utils.flop_counter`` (what :func:`fxprune.report`
measures), so that the model predicts the measured FLOPs of the slim model:

* a multiply-add is 2 FLOPs; only matrix products count: convolutions (transposed ones over
  the *input* positions), linear maps, ``matmul``/``mm``/``bmm``/``addmm``/``baddbmm``,
  two-operand ``einsum``, attention (``F.scaled_dot_product_attention``: the two products;
  ``nn.MultiheadAttention``: projections and the two products);
* elementwise ops, normalizations, pooling and biases cost 0.

A node with no formula is measured once on the example inputs (``FlopCounterMode`` around
that node) and counted as a constant; if it touches prunable channels a warning names it.
Every node with a formula is measured too, and :meth:`FlopsModel.mismatches` lists where the
formula at full size disagrees with the measurement (one known case: on CPU the flop counter
of torch 2.x does not count ``F.scaled_dot_product_attention``, which the formula does).

Two evaluations of the same function:

* exact: :meth:`FlopsModel.flops` (``{group id: keep-mask}`` -> int), the FLOPs of the slim
  model ``construct_subnet`` builds from those masks;
* differentiable: calling the model on a ``Tensor[C]`` of per-channel keep values (the flat
  channel order of :class:`fxprune.passes.gating.GatedGraphModule`), soft or hard; each size
  factor is then ``const + sum of keep values over its channels`` (expected kept counts), so
  the gradient reaches every channel's value.
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import sympy
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .errors import FxPruneError, describe_node

Term = Tuple[Any, Sequence[Any]]  # (coefficient, size factors)

# ---------------------------------------------------------------------------- formula registry

_MODULE_FORMULAS: Dict[type, Callable] = {}
_FUNCTION_FORMULAS: Dict[Any, Callable] = {}
_METHOD_FORMULAS: Dict[str, Callable] = {}


def register_flops(*keys):
    """Decorator: ``fn(ctx) -> list of (coef, [size factors])`` (or None: no formula for this
    use, measure it) is the cost of nodes calling these module classes, functions or (strings)
    tensor methods."""

    def deco(fn):
        for k in keys:
            if k is None:
                continue
            if isinstance(k, str):
                _METHOD_FORMULAS[k] = fn
            elif isinstance(k, type) and issubclass(k, nn.Module):
                _MODULE_FORMULAS[k] = fn
            else:
                _FUNCTION_FORMULAS[k] = fn
        return fn

    return deco


def _lookup(node: torch.fx.Node, module: Optional[nn.Module]) -> Optional[Callable]:
    if node.op == "call_module":
        for cls in type(module).__mro__:
            if cls in _MODULE_FORMULAS:
                return _MODULE_FORMULAS[cls]
        return None
    if node.op == "call_function":
        try:
            return _FUNCTION_FORMULAS.get(node.target)
        except TypeError:
            return None
    if node.op == "call_method":
        return _METHOD_FORMULAS.get(node.target)
    return None


class FlopsContext:
    """What a formula sees: the node, its module, and symbolic shapes of its arguments,
    output and (module) parameters."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node):
        self.gm = gm
        self.node = node
        self.ca = gm.meta["fxprune"]
        self.sym = self.ca.sym
        self.module = gm.get_submodule(node.target) if node.op == "call_module" else None

    def arg(self, index: Optional[int], name: Optional[str] = None, default: Any = None) -> Any:
        if index is not None and index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def shape(self, value: Any) -> Optional[Tuple[sympy.Expr, ...]]:
        """Symbolic shape of an argument (a node with a single tensor output), else None."""
        if not isinstance(value, torch.fx.Node):
            return None
        return _node_shape(value)

    @property
    def out_shape(self) -> Optional[Tuple[sympy.Expr, ...]]:
        return _node_shape(self.node)

    def param_shape(self, attr: str) -> Optional[Tuple[sympy.Expr, ...]]:
        """Symbolic shape of a parameter or buffer of the node's module (``"weight"``,
        ``"out_proj.weight"``): dims linked to channels by the analysis are symbolic."""
        name = f"{self.node.target}.{attr}"
        path, _, leaf = name.rpartition(".")
        try:
            t = getattr(self.gm.get_submodule(path), leaf, None)
        except AttributeError:
            t = None
        if not isinstance(t, torch.Tensor):
            return None
        an = self.ca.analysis
        canon = an.canonical.get(name, name)
        out = []
        for d, n in enumerate(t.shape):
            info = an.params.get((canon, d))
            out.append(self.sym.size(info.track, int(n)) if info is not None else sympy.Integer(int(n)))
        return tuple(out)


def _node_shape(node: torch.fx.Node) -> Optional[Tuple[sympy.Expr, ...]]:
    s = node.meta.get("fxprune.shape")
    if isinstance(s, tuple) and all(isinstance(e, sympy.Expr) for e in s):
        return s
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(sympy.Integer(int(n)) for n in tm.shape)
    return None


# ---------------------------------------------------------------------------- formulas


def conv_terms(x, w, out, transposed: bool) -> List[Term]:
    """``torch.utils.flop_counter``'s convolution count: ``2 * N * prod(spatial) * prod(w)``
    with the spatial positions of the output (of the input for a transposed conv)."""
    if x is None or w is None or out is None:
        return None
    batched = len(x) == len(w)
    lead = 2 if batched else 1
    n = [x[0]] if batched else []
    spatial = (x if transposed else out)[lead:]
    return [(2, n + list(spatial) + list(w))]


_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@register_flops(nn.Conv1d, nn.Conv2d, nn.Conv3d, *_CONV_T)
def _conv_module(ctx: FlopsContext):
    return conv_terms(ctx.shape(ctx.arg(0, "input")), ctx.param_shape("weight"), ctx.out_shape,
                      isinstance(ctx.module, _CONV_T))


@register_flops(F.conv1d, F.conv2d, F.conv3d)
def _conv_fn(ctx: FlopsContext):
    return conv_terms(ctx.shape(ctx.arg(0, "input")), ctx.shape(ctx.arg(1, "weight")), ctx.out_shape, False)


@register_flops(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def _conv_t_fn(ctx: FlopsContext):
    return conv_terms(ctx.shape(ctx.arg(0, "input")), ctx.shape(ctx.arg(1, "weight")), ctx.out_shape, True)


def linear_terms(x, w) -> List[Term]:
    """``2 * prod(x.shape[:-1]) * out_features * in_features``."""
    if x is None or w is None:
        return None
    return [(2, list(x[:-1]) + list(w))]


@register_flops(nn.Linear)
def _linear_module(ctx: FlopsContext):
    return linear_terms(ctx.shape(ctx.arg(0, "input")), ctx.param_shape("weight"))


@register_flops(F.linear)
def _linear_fn(ctx: FlopsContext):
    return linear_terms(ctx.shape(ctx.arg(0, "input")), ctx.shape(ctx.arg(1, "weight")))


def matmul_terms(a, b, out) -> List[Term]:
    """``2 * prod(out) * k`` (``k = a.shape[-1]``); matrix-vector and vector-vector products
    are not counted (``aten.mv``/``aten.dot`` have no flop formula in torch)."""
    if a is None or b is None or out is None:
        return None
    if len(b) == 1 and len(a) <= 2:
        return []
    return [(2, list(out) + [a[-1]])]


@register_flops(torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm", "__matmul__")
def _matmul(ctx: FlopsContext):
    return matmul_terms(ctx.shape(ctx.arg(0, "input")), ctx.shape(ctx.arg(1, "other", ctx.arg(None, "mat2"))),
                        ctx.out_shape)


@register_flops(torch.addmm, torch.baddbmm, "addmm", "baddbmm")
def _addmm(ctx: FlopsContext):
    return matmul_terms(ctx.shape(ctx.arg(1, "mat1", ctx.arg(None, "batch1"))),
                        ctx.shape(ctx.arg(2, "mat2", ctx.arg(None, "batch2"))), ctx.out_shape)


@register_flops(torch.einsum)
def _einsum(ctx: FlopsContext):
    """Two-operand einsum without ellipsis: torch contracts it with one ``bmm`` over the
    indices kept in the output or shared by both operands."""
    eq = ctx.arg(0, "equation")
    ops = list(ctx.node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or "..." in eq:
        return None
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2 or not rhs and "->" in eq:
        return None
    if "->" not in eq:
        letters = "".join(terms)
        rhs = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    shapes = [ctx.shape(o) for o in ops]
    if any(s is None for s in shapes) or any(len(s) != len(t) for s, t in zip(shapes, terms)):
        return None
    size = {}
    for s, t in zip(shapes, terms):
        for c, n in zip(t, s):
            size.setdefault(c, n)
    a, b, o = set(terms[0]), set(terms[1]), set(rhs)
    used = (a & b) | (a & o) | (b & o)
    if not (a & b):
        return None  # an outer product: torch uses a broadcast multiply, not counted
    return [(2, [size[c] for c in sorted(used)])]


def sdpa_terms(q, k, v) -> List[Term]:
    """``torch.utils.flop_counter.sdpa_flop_count``: ``q @ k^T`` and ``attn @ v``."""
    if q is None or k is None or v is None:
        return None
    lead = list(q[:-2])
    return [(2, lead + [q[-2], q[-1], k[-2]]), (2, lead + [q[-2], k[-2], v[-1]])]


@register_flops(getattr(F, "scaled_dot_product_attention", None))
def _sdpa(ctx: FlopsContext):
    return sdpa_terms(ctx.shape(ctx.arg(0, "query")), ctx.shape(ctx.arg(1, "key")), ctx.shape(ctx.arg(2, "value")))


def _aten_formulas() -> None:
    """ATen overloads (``torch.export`` graphs) share the formulas of the torch functions
    whose argument order they keep; ``aten.convolution`` says ``transposed`` in argument 6."""
    aten = torch.ops.aten

    def ov(packet, *names):
        return [getattr(packet, n) for n in names if hasattr(packet, n)]

    pairs = [
        (_linear_fn, ov(aten.linear, "default")),
        (_conv_fn, ov(aten.conv1d, "default") + ov(aten.conv2d, "default") + ov(aten.conv3d, "default")),
        (_conv_t_fn, ov(aten.conv_transpose1d, "default") + ov(aten.conv_transpose2d, "input")
         + ov(aten.conv_transpose3d, "input")),
        (_matmul, ov(aten.matmul, "default") + ov(aten.mm, "default") + ov(aten.bmm, "default")),
        (_addmm, ov(aten.addmm, "default") + ov(aten.baddbmm, "default")),
        (_einsum, ov(aten.einsum, "default")),
        (_sdpa, ov(aten.scaled_dot_product_attention, "default")),
    ]
    for fn, targets in pairs:
        register_flops(*targets)(fn)

    def convolution(ctx: FlopsContext):
        return conv_terms(ctx.shape(ctx.arg(0)), ctx.shape(ctx.arg(1)), ctx.out_shape, bool(ctx.arg(6, None, False)))

    register_flops(*ov(aten.convolution, "default"))(convolution)


_aten_formulas()


def _mha_classes():
    from .modules import PrunedMultiheadAttention

    return nn.MultiheadAttention, PrunedMultiheadAttention


@register_flops(*_mha_classes())
def _mha(ctx: FlopsContext):
    """Input projections (``3 * inner`` rows), ``q @ k^T`` and ``attn @ v`` over
    ``inner = num_heads * head_dim``, and the output projection."""
    m = ctx.module
    if not getattr(m, "_qkv_same_embed_dim", True) or getattr(m, "bias_k", None) is not None:
        return None
    qn, kn, vn = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    q, k, v = ctx.shape(qn), ctx.shape(kn), ctx.shape(vn)
    w_in, w_out = ctx.param_shape("in_proj_weight"), ctx.param_shape("out_proj.weight")
    if q is None or k is None or v is None or w_in is None or w_out is None:
        return None
    inner = w_in[0] / 3
    e_in = w_in[1]
    tok_q, tok_k, tok_v = list(q[:-1]), list(k[:-1]), list(v[:-1])
    if len(q) == 2:
        lq, n, ls = q[0], sympy.Integer(1), k[0]
    elif getattr(m, "batch_first", False):
        n, lq, ls = q[0], q[1], k[1]
    else:
        lq, n, ls = q[0], q[1], k[0]
    terms: List[Term] = [(2, tok + [e_in, inner]) for tok in (tok_q, tok_k, tok_v)]
    terms += [(2, [n, lq, ls, inner]), (2, [n, lq, ls, inner])]
    terms.append((2, tok_q + list(w_out)))
    return terms


# ---------------------------------------------------------------------------- the model


@dataclass
class NodeCost:
    """The cost of one node: ``terms`` (coefficient, size factors), its value at full size,
    the flop counter's measurement (None if not measured) and whether a formula gave it."""

    node: str
    terms: List[Term]
    full: int
    measured: Optional[int] = None
    modeled: bool = True
    prunable: bool = False  # depends on a prunable group's channels


class _Measure(torch.fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.flops: Dict[str, int] = {}

    def run_node(self, n):
        from torch.utils.flop_counter import FlopCounterMode

        if n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        with FlopCounterMode(display=False) as counter:
            out = super().run_node(n)
        self.flops[n.name] = int(counter.get_total_flops())
        return out


class FlopsModel:
    """FLOPs of a program as a function of its kept channels (see the module docstring).

    Args:
        prog: a ``fxprune.Program``.
        measure: run the example inputs once under ``FlopCounterMode``, node by node, to
            count nodes without a formula and to cross-check the formulas (default True).

    Attributes:
        nodes: list of :class:`NodeCost` (nodes with nonzero cost).
        full: FLOPs of the full model (int). ``fixed``: the part no prunable channel
            changes. ``prunable_full = full - fixed``.
        num_channels: ``C``; ``group_ids``/``group_offsets``/``group_sizes``: the flat channel
            order (that of :class:`fxprune.optim._groups.ChannelLayout`).
    """

    def __init__(self, prog, *, measure: bool = True):
        from fxprune.optim._groups import ChannelLayout

        gm = prog.module
        self.gm = gm
        ca = gm.meta["fxprune"]
        self.sym = ca.sym
        layout = ChannelLayout(gm, ca.groups)
        self.group_ids = [g.id for g in layout.groups]
        self.group_offsets = list(layout.group_offsets)
        self.group_sizes = [int(g.size) for g in layout.groups]
        self.num_channels = int(layout.num_channels)
        self._offset = dict(zip(self.group_ids, self.group_offsets))

        measured: Dict[str, int] = {}
        if measure:
            measured = self._measure(gm, prog.example_inputs)
        self.nodes: List[NodeCost] = []
        unmodeled = []
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            module = gm.get_submodule(node.target) if node.op == "call_module" else None
            fn = _lookup(node, module)
            terms = None
            if fn is not None:
                try:
                    terms = fn(FlopsContext(gm, node))
                except Exception as exc:  # a formula that cannot read this use: measured instead
                    warnings.warn(f"FLOPs formula failed on {describe_node(node)}: {exc}; measured instead",
                                  stacklevel=2)
                    terms = None
            meas = measured.get(node.name)
            if terms is None:
                if not meas:
                    continue
                cost = NodeCost(node.name, [(int(meas), [])], int(meas), meas, modeled=False)
                if self._touches_prunable(node):
                    unmodeled.append(node)
            else:
                terms = [(c, list(fs)) for c, fs in terms if c != 0]
                if not terms:
                    continue
                cost = NodeCost(node.name, terms, 0, meas)
            self.nodes.append(cost)
        if unmodeled:
            warnings.warn("FLOPs of these nodes do not follow their pruned channels (no formula; counted at "
                          "full size): " + ", ".join(describe_node(n) for n in unmodeled[:5])
                          + (" ..." if len(unmodeled) > 5 else ""), stacklevel=2)
        self._compile()
        full_terms = self._term_values(self._values(None))
        for nc, (lo, hi) in zip(self.nodes, self._node_slices):
            nc.full = int(round(float(full_terms[lo:hi].sum())))
        self.full = int(round(self._eval_np(None)))
        self.fixed = int(round(self._fixed))
        self.prunable_full = self.full - self.fixed
        self._torch_cache: Dict[Tuple[Any, Any], Tuple[torch.Tensor, ...]] = {}

    # ---------------------------------------------------------------- construction
    @staticmethod
    def _measure(gm, inputs) -> Dict[str, int]:
        """Per-node flop counts of one eval forward pass, on fake tensors (shapes only, no
        arithmetic); falls back to real tensors if fake execution fails."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        was = gm.training
        gm.eval()
        try:
            try:
                with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
                    fake = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
                    interp = _Measure(gm)
                    interp.run(*fake)
            except Exception:
                with torch.no_grad():
                    interp = _Measure(gm)
                    interp.run(*inputs)
        finally:
            gm.train(was)
        return interp.flops

    def _touches_prunable(self, node: torch.fx.Node) -> bool:
        groups = set(node.meta.get("fxprune.groups") or [])
        for a in node.all_input_nodes:
            groups.update(a.meta.get("fxprune.groups") or [])
        return bool(groups & set(self.group_ids))

    def _linear_form(self, expr) -> Tuple[float, np.ndarray, np.ndarray]:
        """``expr`` (linear in size symbols) -> (constant, flat channels, weights)."""
        expr = sympy.expand(sympy.sympify(expr))
        const = 0.0
        chans, weights = [], []
        for sym, coef in expr.as_coefficients_dict().items():
            c = float(coef)
            if sym == 1:
                const += c
                continue
            if not isinstance(sym, sympy.Symbol):
                raise FxPruneError(f"size factor {expr} is not linear in the group sizes")
            g, subset = self._symbol_group(sym)
            if g in self._offset:
                idx = np.arange(self.group_sizes[self.group_ids.index(g)]) if subset is None else subset
                chans.append(self._offset[g] + idx)
                weights.append(np.full(len(idx), c))
            else:
                n = self.sym.sizes[g] if subset is None else len(subset)
                const += c * n
        if chans:
            return const, np.concatenate(chans).astype(np.int64), np.concatenate(weights)
        return const, np.zeros(0, np.int64), np.zeros(0)

    def _symbol_group(self, sym) -> Tuple[int, Optional[np.ndarray]]:
        if sym in self.sym.subsets:
            g, chans = self.sym.subsets[sym]
            return g, np.asarray(chans, np.int64)
        try:
            return self.sym.full.index(sym), None
        except ValueError:
            raise FxPruneError(f"unknown size symbol {sym}")

    def _compile(self) -> None:
        """Flatten every term into factor indices over unique linear forms."""
        forms: Dict[Any, int] = {}
        consts: List[float] = []
        nnz_f, nnz_c, nnz_w = [], [], []
        coefs: List[float] = []
        rows: List[List[int]] = []
        fixed = 0.0
        self._node_slices = []
        for nc in self.nodes:
            lo = len(coefs)
            prunable = False
            for coef, factors in nc.terms:
                c = float(coef)
                idx = []
                for f in factors:
                    f = sympy.sympify(f)
                    if f.is_number:
                        c *= float(f)
                        continue
                    k = forms.get(f)
                    if k is None:
                        const, ch, w = self._linear_form(f)
                        k = len(consts)
                        forms[f] = k
                        consts.append(const)
                        nnz_f.append(np.full(len(ch), k, np.int64))
                        nnz_c.append(ch)
                        nnz_w.append(w)
                    idx.append(k)
                coefs.append(c)
                rows.append(idx)
                if any(len(nnz_c[k]) for k in idx):
                    prunable = True
                else:
                    fixed += c * float(np.prod([consts[k] for k in idx])) if idx else c
            nc.prunable = prunable
            self._node_slices.append((lo, len(coefs)))
        nf = len(consts)
        width = max((len(r) for r in rows), default=0)
        idx = np.full((len(rows), max(width, 1)), nf, np.int64)
        for i, r in enumerate(rows):
            idx[i, :len(r)] = r
        self._consts = np.asarray(consts, np.float64)
        self._nnz_f = np.concatenate(nnz_f) if nnz_f else np.zeros(0, np.int64)
        self._nnz_c = np.concatenate(nnz_c) if nnz_c else np.zeros(0, np.int64)
        self._nnz_w = np.concatenate(nnz_w) if nnz_w else np.zeros(0)
        self._coefs = np.asarray(coefs, np.float64)
        self._idx = idx
        self._fixed = fixed

    # ---------------------------------------------------------------- evaluation
    def _values(self, keep: Optional[np.ndarray]) -> np.ndarray:
        vals = self._consts.copy()
        m = np.ones(self.num_channels) if keep is None else keep
        np.add.at(vals, self._nnz_f, self._nnz_w * m[self._nnz_c])
        return vals

    def _term_values(self, vals: np.ndarray) -> np.ndarray:
        ext = np.append(vals, 1.0)
        return self._coefs * ext[self._idx].prod(axis=1)

    def _eval_np(self, keep: Optional[np.ndarray]) -> float:
        return float(self._term_values(self._values(keep)).sum())

    def flat_keep(self, keep: Optional[Mapping[int, Any]] = None) -> np.ndarray:
        """``{group id: bool keep-mask}`` -> float ``[C]`` (groups left out: all kept)."""
        out = np.ones(self.num_channels)
        for gid, mask in (keep or {}).items():
            if gid not in self._offset:
                continue  # a frozen group is never pruned
            m = np.asarray(mask, dtype=bool).reshape(-1)
            size = self.group_sizes[self.group_ids.index(gid)]
            if m.shape != (size,):
                raise FxPruneError(f"keep-mask for group {gid} has {m.size} entries, expected {size}")
            out[self._offset[gid]:self._offset[gid] + size] = m
        return out

    def flops(self, keep: Optional[Mapping[int, Any]] = None) -> int:
        """Exact FLOPs of the slim model that keeps ``keep[g]`` channels of each group."""
        return int(round(self._eval_np(self.flat_keep(keep))))

    def ratio(self, keep: Optional[Mapping[int, Any]] = None) -> float:
        """``flops(keep) / full``."""
        return self.flops(keep) / max(1, self.full)

    def node_flops(self, keep: Optional[Mapping[int, Any]] = None) -> Dict[str, int]:
        """Per-node FLOPs at ``keep``."""
        tv = self._term_values(self._values(self.flat_keep(keep)))
        return {nc.node: int(round(float(tv[lo:hi].sum()))) for nc, (lo, hi) in zip(self.nodes, self._node_slices)}

    def _tensors(self, device, dtype):
        key = (device, dtype)
        t = self._torch_cache.get(key)
        if t is None:
            t = tuple(torch.as_tensor(a, device=device, dtype=dt) for a, dt in (
                (self._consts, dtype), (self._nnz_f, torch.long), (self._nnz_c, torch.long), (self._nnz_w, dtype),
                (self._coefs, dtype), (self._idx, torch.long)))
            self._torch_cache[key] = t
        return t

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        """Differentiable FLOPs of per-channel keep values ``Tensor[C]`` (flat channel order;
        1 = kept): each size factor is its constant plus the sum of its channels' values."""
        if keep.shape != (self.num_channels,):
            raise FxPruneError(f"keep values of shape {tuple(keep.shape)}, expected ({self.num_channels},)")
        dtype = keep.dtype if keep.dtype in (torch.float32, torch.float64) else torch.float32
        consts, nf, nc, nw, coefs, idx = self._tensors(keep.device, dtype)
        vals = consts.index_add(0, nf, nw * keep.to(dtype).index_select(0, nc))
        ext = torch.cat([vals, vals.new_ones(1)])
        return (coefs * ext[idx].prod(dim=1)).sum()

    # ---------------------------------------------------------------- inspection
    def expression(self) -> sympy.Expr:
        """The total FLOPs as a sympy expression in the group-size symbols."""
        total = sympy.Integer(0)
        for nc in self.nodes:
            for coef, factors in nc.terms:
                total += sympy.nsimplify(coef) * sympy.Mul(*[sympy.sympify(f) for f in factors])
        return sympy.expand(total)

    def mismatches(self, rtol: float = 1e-6) -> List[Tuple[str, int, int]]:
        """``(node, formula at full size, measured)`` where a formula disagrees with the flop
        counter's measurement on the example inputs."""
        out = []
        for nc in self.nodes:
            if nc.modeled and nc.measured is not None and abs(nc.full - nc.measured) > rtol * max(1, nc.measured):
                out.append((nc.node, nc.full, nc.measured))
        return out

    def __repr__(self) -> str:
        return (f"FlopsModel(full={self.full:,}, fixed={self.fixed:,}, nodes={len(self.nodes)}, "
                f"channels={self.num_channels})")


__all__ = ["FlopsModel", "FlopsContext", "NodeCost", "register_flops", "conv_terms", "linear_terms",
           "matmul_terms", "sdpa_terms"]
