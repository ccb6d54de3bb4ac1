"""The updated HuggingFace config of a slim model (``num_attention_heads``, ``intermediate_size``...).

A slim HuggingFace model runs as a GraphModule; its config tells other tools (and
``from_config``) the new widths. Which config field sets which parameter dimension is not
guessed from names: the model class itself is asked. For each width field the class is built
twice on the meta device (no memory, no weights) with two values of the field, and every
parameter dimension that changes is a linear function ``a * value + b`` of it. Solving each
such function for the slim model's size gives the field's new value; a field whose
dimensions all agree is homogeneous and is written, a field whose layers disagree (one layer
kept 3 heads, another 4) is reported per value instead. Finally the class is built from the
new config and every parameter shape is compared with the slim model's: the config is only
returned when it reproduces them all (BERT's or GPT-2's head count, for instance, also sets
their head width, so no config can describe heads pruned at a fixed head width).

The hidden width (``hidden_size``, ``n_embd``, ``d_model``) is solved like the others; where a
class derives the head width from it (``getattr(config, "head_dim", hidden // heads)``, Qwen2)
``head_dim`` is written out first, so the head width stays when the head count or the hidden
width changes. A field that a dim shares with fields which kept their value is solved from that
dim (GPT-2's MLP width is ``4 * n_embd`` while ``n_inner`` is None).

A smaller hidden width also changes the normalisations over it: the slim GraphModule divides
their statistics by the full width D (a removed channel is zero where it flows, so only the
count changed), while the class built from a config divides by the width it is given, D'. For
an RMS norm there is an identity: over the D' kept channels,
``x / sqrt(sum(x^2) / D + eps) * w == x / sqrt(sum(x^2) / D' + eps * D / D') * (w * sqrt(D / D'))``,
since ``sum / D' + eps * D / D' = (D / D') * (sum / D + eps)``. The residual stream is one width
and the model's norms over it share one ``eps``, so the config gets ``eps * D / D'`` in the
field that sets their eps and :attr:`HFConfig.param_scales` multiplies their weights by
``sqrt(D / D')``. Which modules are norms over the hidden width is found from the modules
themselves, not their names: those whose parameters are all vectors of the hidden width and
whose output channel depends on the other input channels; each is run on random inputs and is
an RMS norm when it computes ``x * rsqrt(mean(x^2, -1) + eps) * weight`` with one of its own
float attributes as ``eps``, in float64 or in float32 (``LlamaRMSNorm`` normalises in float32
whatever the model's dtype; :attr:`HFConfig.norm_dtype`). The eps field is the config field of
that value whose change changes exactly those modules' eps on a meta-device build. Any other
normalisation over the hidden width (LayerNorm subtracts the mean: no width and eps give its
full-count statistics), RMS norms with different eps, or an eps field that also sets other
norms (Qwen3's per-head ``q_norm``/``k_norm`` share ``rms_norm_eps``) leave the slim widths
with no config, reported in :attr:`HFConfig.unexpressible`.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from .errors import UnsupportedInputError

# Config fields that count heads or hidden widths across the model's families.
WIDTH_FIELDS = ("num_attention_heads", "num_key_value_heads", "intermediate_size", "n_head", "n_inner",
                "num_heads", "d_ff", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
                "decoder_ffn_dim", "ffn_dim", "n_heads", "hidden_dim")
# Config fields that set the residual-stream width.
HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model")

Shapes = Dict[str, Tuple[int, ...]]


@dataclass
class HFConfig:
    """What :func:`hf_config` found.

    Attributes:
        config: the updated ``transformers.PretrainedConfig``, or None when no config of this
            class reproduces every slim parameter shape (see ``heterogeneous``, ``mismatched``).
        prefix: where the HuggingFace model sits in the slim module (``""`` at the root).
        changed: field -> (old value, new value).
        heterogeneous: field -> the different values its parameter dimensions ask for.
        mismatched: parameter name -> (shape the config gives, slim shape).
        param_scales: parameter name (in the HuggingFace model) -> factor its slim values are
            multiplied by to load into the class built from ``config`` (an identity that keeps
            a standard module exact at the new widths: ``sqrt(D / D')`` for the weights of the
            RMS norms over a hidden width cut from D to D'); empty when the values load as
            they are.
        norm_dtype: the dtype the rescaled norms compute in (float32 for ``LlamaRMSNorm``,
            whatever the model's dtype): the class built from ``config`` equals the slim
            GraphModule up to that dtype's rounding; None when nothing is rescaled.
        unexpressible: module or field -> why no config makes the class compute what the slim
            model computes at the new hidden width (a LayerNorm over it, say).
    """

    config: Optional[object]
    prefix: str = ""
    changed: Dict[str, Tuple[object, int]] = field(default_factory=dict)
    heterogeneous: Dict[str, List[int]] = field(default_factory=dict)
    mismatched: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)
    param_scales: Dict[str, float] = field(default_factory=dict)
    norm_dtype: Optional[torch.dtype] = None
    unexpressible: Dict[str, str] = field(default_factory=dict)

    @property
    def homogeneous(self) -> bool:
        return self.config is not None

    def save(self, directory: str) -> str:
        """Write ``config.json`` into ``directory`` (``save_pretrained``); returns its path.
        Raises :class:`fxprune.UnsupportedInputError` when the slim widths have no config."""
        if self.config is None:
            raise UnsupportedInputError(f"no {self._class_name()} reproduces the slim shapes: {self.explain()}")
        os.makedirs(directory, exist_ok=True)
        self.config.save_pretrained(directory)
        return os.path.join(directory, "config.json")

    def explain(self) -> str:
        parts = [f"{k}: {old} -> {new}" for k, (old, new) in self.changed.items()]
        parts += [f"{k} differs across layers: {v}" for k, v in self.heterogeneous.items()]
        parts += [f"{k}: {why}" for k, why in list(self.unexpressible.items())[:4]]
        if len(self.unexpressible) > 4:
            parts.append(f"... {len(self.unexpressible) - 4} more modules alike")
        parts += [f"{k}: config gives {a}, slim has {b}" for k, (a, b) in list(self.mismatched.items())[:4]]
        if len(self.mismatched) > 4:
            parts.append(f"... {len(self.mismatched) - 4} more shapes differ")
        return "; ".join(parts) or "unchanged"

    def _class_name(self) -> str:
        return type(self.config).__name__ if self.config is not None else "config"

    def to_json(self) -> dict:
        return {"homogeneous": self.homogeneous, "changed": {k: list(v) for k, v in self.changed.items()},
                "heterogeneous": self.heterogeneous,
                "mismatched": {k: [list(a), list(b)] for k, (a, b) in self.mismatched.items()},
                "unexpressible": self.unexpressible, "param_scales": self.param_scales,
                "norm_dtype": str(self.norm_dtype).replace("torch.", "") if self.norm_dtype else None,
                "config": json.loads(self.config.to_json_string()) if self.config is not None else None}


def hf_config(model: torch.nn.Module, slim: torch.nn.Module, fields: Optional[Iterable[str]] = None) -> HFConfig:
    """The config of the HuggingFace model inside ``model`` with the slim model's widths.

    Args:
        model: a ``transformers.PreTrainedModel``, or a module holding exactly one (outermost)
            HuggingFace model; its ``config`` is the starting point and is not modified.
        slim: the slim module (``Program.construct_subnet()``); its parameters keep the
            model's names.
        fields: config fields to solve for (default :data:`WIDTH_FIELDS` and
            :data:`HIDDEN_FIELDS`, those the config has).

    Returns:
        An :class:`HFConfig`; ``.config`` is None when the slim shapes are not expressible, or
        when the hidden width shrank and a normalisation over it has no config at the new width
        (module docstring; ``.unexpressible`` says which). With a smaller hidden width and RMS
        norms, ``.config`` also holds the rescaled eps and ``.param_scales`` the norm weights'
        factor.

    Raises:
        fxprune.UnsupportedInputError: transformers is missing, ``model`` holds no single
            outermost HuggingFace model, or its class cannot be built from its config.
    """
    prefix, hf = _find_hf(model)
    cfg = hf.config
    slim_shapes = {k[len(prefix):]: tuple(v.shape) for k, v in slim.state_dict().items() if k.startswith(prefix)}
    try:
        base = _meta_shapes(hf, cfg)
    except Exception as exc:
        raise UnsupportedInputError(f"{type(hf).__name__}(config) cannot be rebuilt from its config on the meta "
                                    f"device: {type(exc).__name__}: {exc}") from exc
    cfg = _explicit_head_dim(hf, cfg, base)
    present = cfg.to_dict()
    names = [f for f in (fields if fields is not None else WIDTH_FIELDS + HIDDEN_FIELDS) if f in present]

    owners: Dict[Tuple[str, int], List[Tuple[str, float, float]]] = {}
    for f in names:
        for dim, coef in _linear_dims(hf, cfg, f, present[f], base).items():
            owners.setdefault(dim, []).append((f, *coef))
    result = HFConfig(config=None, prefix=prefix)
    new_cfg = copy.deepcopy(cfg)
    # first from the dims one field sets alone, then from the dims it shares with fields that
    # kept their value (GPT-2's MLP width is 4 * n_embd while n_inner is None)
    solved = _solve(owners, slim_shapes, base, fixed=set())
    _settle_tied_hidden(solved, present)
    _apply(solved, slim_shapes, base, present, result, new_cfg)
    fixed = {f for f in solved if f not in result.changed and f not in result.heterogeneous}
    shared = {f: v for f, v in _solve(owners, slim_shapes, base, fixed).items() if f not in solved}
    _apply(shared, slim_shapes, base, present, result, new_cfg)
    _rescale_hidden_norms(hf, owners, base, present, result, new_cfg)
    rebuilt = _meta_shapes(hf, new_cfg) if result.changed else base
    result.mismatched = {k: (rebuilt[k], s) for k, s in slim_shapes.items() if k in rebuilt and rebuilt[k] != s}
    if not result.heterogeneous and not result.mismatched and not result.unexpressible:
        result.config = new_cfg
    return result


def _solve(owners, slim_shapes: Shapes, base: Shapes, fixed: set) -> Dict[str, Tuple[set, list]]:
    """field -> (values its dims ask for, those dims), over the dims whose other owners are all
    in ``fixed`` (kept at their value, to which the dim's coefficients refer)."""
    solved: Dict[str, Tuple[set, list]] = {}
    for (key, d), fs in owners.items():
        if key not in slim_shapes or len(slim_shapes[key]) != len(base[key]):
            continue
        free = [c for c in fs if c[0] not in fixed]
        if len(free) != 1:
            continue  # a dim set by several changed fields only takes part in the final check
        f, a, b = free[0]
        value = (slim_shapes[key][d] - b) / a
        values, dims = solved.setdefault(f, (set(), []))
        values.add(int(value) if value == int(value) and value >= 1 else value)
        dims.append((key, d))
    return solved


def _settle_tied_hidden(solved: Dict[str, Tuple[set, list]], present: dict) -> None:
    """A hidden-width field whose dims ask for its own value and others keeps its value: the
    residual stream is one width across the model, and the others are widths the class ties
    to it (GPT-2's attention width is n_embd); those dims are left to the final shape check."""
    for f in HIDDEN_FIELDS:
        if f in solved and len(solved[f][0]) > 1 and present.get(f) in solved[f][0]:
            solved[f][0].intersection_update({present[f]})


def _apply(solved: Dict[str, Tuple[set, list]], slim_shapes: Shapes, base: Shapes, present: dict,
           result: HFConfig, new_cfg) -> None:
    """Write each solved field into ``new_cfg`` and ``result.changed``, or into
    ``result.heterogeneous`` when its dims disagree."""
    for f, (values, dims) in solved.items():
        if all(slim_shapes[k][d] == base[k][d] for k, d in dims):
            continue  # this field's widths are untouched
        if len(values) > 1 or not isinstance(next(iter(values)), int):
            result.heterogeneous[f] = sorted(values, key=float)
            continue
        value = next(iter(values))
        if value == present[f]:
            continue
        result.changed[f] = (present[f], value)
        setattr(new_cfg, f, value)


def _find_hf(model: torch.nn.Module) -> Tuple[str, torch.nn.Module]:
    try:
        from transformers import PreTrainedModel
    except ImportError as exc:
        raise UnsupportedInputError("fxprune.hf_config needs the transformers package") from exc
    found = []
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel) and not any(name.startswith(p + ".") or p == "" for p, _ in found):
            found.append((name, m))
    if len(found) != 1:
        raise UnsupportedInputError(f"{type(model).__name__} holds {len(found)} outermost HuggingFace models "
                                    f"({', '.join(n or '<root>' for n, _ in found) or 'none'}); pass one of them")
    name, hf = found[0]
    return (name + "." if name else ""), hf


def _meta_shapes(hf: torch.nn.Module, cfg) -> Shapes:
    """Parameter and buffer shapes of ``type(hf)`` built from ``cfg`` on the meta device."""
    with torch.device("meta"):
        m = type(hf)(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _explicit_head_dim(hf: torch.nn.Module, cfg, base: Shapes):
    """``cfg`` with ``head_dim`` written out when the class reads it but the config leaves it
    implicit (Qwen2: ``getattr(config, "head_dim", hidden_size // num_attention_heads)``), so
    that a new head count keeps the head width; ``cfg`` itself otherwise."""
    if getattr(cfg, "head_dim", None) is not None:
        return cfg
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int) or heads < 1 or hidden % heads:
        return cfg
    pinned, probe = copy.deepcopy(cfg), copy.deepcopy(cfg)
    pinned.head_dim, probe.head_dim = hidden // heads, 2 * (hidden // heads)
    try:
        if _meta_shapes(hf, pinned) != base or _meta_shapes(hf, probe) == base:
            return cfg  # the class ignores head_dim (its head width is hidden_size / heads)
    except Exception:
        return cfg
    return pinned


def _linear_dims(hf, cfg, f: str, value, base: Shapes) -> Dict[Tuple[str, int], Tuple[float, float]]:
    """(parameter, dim) -> (a, b) with size = a * value_of_f + b, for the dims ``f`` sets."""
    if isinstance(value, bool) or not (value is None or isinstance(value, int)):
        return {}
    p1, p2 = (value, 2 * value) if value else (8, 16)
    shapes = []
    for p in (p1, p2):
        if p == value:
            shapes.append(base)
            continue
        trial = copy.deepcopy(cfg)
        setattr(trial, f, p)
        try:
            shapes.append(_meta_shapes(hf, trial))
        except Exception:  # the class refuses this value (e.g. width not divisible): not probed
            return {}
    s1, s2 = shapes
    out = {}
    for k, shape in s1.items():
        other = s2.get(k)
        if other is None or len(other) != len(shape):
            continue
        for d, (x1, x2) in enumerate(zip(shape, other)):
            if x1 != x2:
                a = (x2 - x1) / (p2 - p1)
                out[(k, d)] = (a, x1 - a * p1)
    return out


# --------------------------------------------------------------------------------------------
# normalisations over a smaller hidden width


@dataclass
class _RMSNorm:
    """A module found to compute ``x * rsqrt(mean(x^2, -1) + eps) * weight`` over the hidden width."""

    keys: List[str]  # its weight's state-dict name (in the HuggingFace model)
    eps_attr: str  # the attribute holding eps
    eps: float
    dtype: torch.dtype  # what it normalises in


def _rescale_hidden_norms(hf: torch.nn.Module, owners, base: Shapes, present: dict, result: HFConfig,
                          new_cfg) -> None:
    """When a hidden-width field went from D to D': write the RMS-norm identity (module
    docstring) into ``new_cfg`` (the eps field), ``result.changed`` and ``result.param_scales``,
    or say in ``result.unexpressible`` why no config holds the slim normalisations."""
    hidden = [f for f in HIDDEN_FIELDS if f in result.changed]
    if not hidden:
        return
    f = hidden[0]
    full, slim = result.changed[f]
    rms: Dict[str, _RMSNorm] = {}
    for name, module in _hidden_vector_modules(hf, owners, base, f).items():
        kind = _probe_norm(module, full)
        if isinstance(kind, _RMSNorm):
            kind.keys = [f"{name}.{k}" for k, _ in module.named_parameters()]
            rms[name] = kind
        elif kind is not None:
            result.unexpressible[name] = (f"{type(module).__name__} normalises over the {f} channels ({full} -> "
                                          f"{slim}) {kind}; the slim model divides by the full count {full}, "
                                          f"which no {type(new_cfg).__name__} at {f}={slim} does")
    if result.unexpressible or not rms:
        return
    eps = {n.eps for n in rms.values()}
    if len(eps) > 1:
        result.unexpressible[f] = (f"the RMS norms over {f} have different eps {sorted(eps)}: one field "
                                   f"cannot rescale them all")
        return
    old = eps.pop()
    new = old * full / slim
    field_name, why = _eps_field(hf, new_cfg, present, rms, old, new)
    if field_name is None:
        result.unexpressible[f] = why
        return
    setattr(new_cfg, field_name, new)
    result.changed[field_name] = (old, new)
    scale = math.sqrt(full / slim)
    result.param_scales.update({k: scale for n in rms.values() for k in n.keys})
    result.norm_dtype = min((n.dtype for n in rms.values()), key=lambda d: torch.finfo(d).bits)


def _hidden_vector_modules(hf: torch.nn.Module, owners, base: Shapes, f: str) -> Dict[str, torch.nn.Module]:
    """Modules whose parameters are all vectors as wide as the hidden width ``f`` sets (a norm's
    weight and bias; never a linear layer, which holds a matrix)."""
    vectors = {k for (k, d), fs in owners.items()
               if d == 0 and len(base.get(k, ())) == 1 and any(o[0] == f and o[1:] == (1.0, 0.0) for o in fs)}
    found = {}
    for name in sorted({k.rpartition(".")[0] for k in vectors}):
        module = hf.get_submodule(name) if name else hf
        params = [f"{name}.{k}" if name else k for k, _ in module.named_parameters()]
        if params and all(k in vectors for k in params):
            found[name] = module
    return found


def _probe_norm(module: torch.nn.Module, width: int):
    """What ``module`` computes over vectors of ``width`` channels, run on random float64 inputs
    and weights (a copy, so meta-device modules work too): None when it does not mix channels
    or does not map such vectors onto such vectors (nothing of it depends on the count), an
    :class:`_RMSNorm` when it is one, else a phrase saying how it differs (also when it cannot be
    run on such vectors: unchecked is not exact)."""
    try:
        m = copy.deepcopy(module)
        if any(t.is_meta for t in list(m.parameters()) + list(m.buffers())):
            m = m.to_empty(device="cpu")
        m = m.to(torch.float64).eval()
    except Exception:
        return None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        params = list(m.parameters())
        for p in params:
            p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5)
        y = None
        for shape in ((4, width), (2, 2, width)):  # (tokens, width), then (batch, tokens, width)
            x = torch.randn(shape, generator=gen, dtype=torch.float64) + 1.0  # a mean, so LayerNorm differs
            moved = x.clone()
            moved[..., 0] += 1.0
            try:
                y, y_moved = m(x), m(moved)
                break
            except Exception:
                continue
        if y is None:
            return f"in a way not checked (it does not run on inputs of shape {shape})"
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            return None  # not a map from the hidden width onto itself: not a norm over it
        if torch.equal(y[..., 1:], y_moved[..., 1:]):
            return None  # channel by channel (a scale, a bias): no count in it
        y = y.double()
        shifted = m(x + 3.0).double()
        if float((shifted - y).abs().max()) <= 1e-8 * float(y.abs().max()):
            return "and subtracts the mean (a LayerNorm: no width and eps give full-count statistics)"
        if len(params) != 1:
            return "with more than one parameter (not x * rsqrt(mean(x^2) + eps) * weight)"
        for attr, eps in vars(m).items():
            if not isinstance(eps, float):
                continue
            for dtype in (torch.float64, torch.float32):
                xt = x.to(dtype)
                ref = (xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps)).double() * params[0]
                if float((y - ref).abs().max() / ref.abs().max()) <= 16 * torch.finfo(dtype).eps:
                    return _RMSNorm(keys=[], eps_attr=attr, eps=eps, dtype=dtype)
    return "with a statistic other than mean(x^2) + eps (not x * rsqrt(mean(x^2) + eps) * weight)"


def _float_attrs(model: torch.nn.Module) -> Dict[Tuple[str, str], float]:
    return {(name, k): v for name, m in model.named_modules() for k, v in vars(m).items() if isinstance(v, float)}


def _eps_field(hf: torch.nn.Module, cfg, present: dict, rms: Dict[str, _RMSNorm], old: float,
               new: float) -> Tuple[Optional[str], str]:
    """The config field (of value ``old``) whose change to ``new`` changes the eps of exactly
    the modules in ``rms`` to ``new`` (checked on meta-device builds), or (None, why not)."""
    candidates = sorted((k for k, v in present.items() if isinstance(v, float) and v == old),
                        key=lambda k: "eps" not in k)
    if not candidates:
        return None, f"no {type(cfg).__name__} field holds the norms' eps {old}"
    with torch.device("meta"):
        before = _float_attrs(type(hf)(cfg))
    want = {(name, n.eps_attr) for name, n in rms.items()}
    why = ""
    for k in candidates:
        trial = copy.deepcopy(cfg)
        setattr(trial, k, new)
        try:
            with torch.device("meta"):
                after = _float_attrs(type(hf)(trial))
        except Exception:
            continue
        moved = {key for key in after if after[key] != before.get(key)}
        if moved == want and all(after[key] == new for key in want):
            return k, ""
        extra = sorted(n for n, _ in moved - want)
        if extra and not why:
            why = (f"{k} also sets the eps of {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else "")
                   + ", which do not normalise over the hidden width: no value keeps both exact")
    return None, why or f"no {type(cfg).__name__} field sets the eps of the norms over the hidden width"
