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
"""
from __future__ import annotations

import copy
import json
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
            a standard module exact at the new widths); empty when the values load as they are.
    """

    config: Optional[object]
    prefix: str = ""
    changed: Dict[str, Tuple[object, int]] = field(default_factory=dict)
    heterogeneous: Dict[str, List[int]] = field(default_factory=dict)
    mismatched: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)
    param_scales: Dict[str, float] = field(default_factory=dict)

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
        An :class:`HFConfig`; ``.config`` is None when the slim shapes are not expressible.

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
    rebuilt = _meta_shapes(hf, new_cfg) if result.changed else base
    result.mismatched = {k: (rebuilt[k], s) for k, s in slim_shapes.items() if k in rebuilt and rebuilt[k] != s}
    if not result.heterogeneous and not result.mismatched:
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
