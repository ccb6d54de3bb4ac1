"""A slim model as an instance of its own HuggingFace class: ``from_pretrained`` and ``generate``.

``fxprune.compile`` turns a ``transformers`` model into an ATen-level GraphModule; its slim
model (``Program.construct_subnet()``) has no key/value cache, no ``generate`` and no
``save_pretrained``. :func:`to_pretrained` gives it all of them back: it builds the model's own
class from the slim config (:func:`fxprune.hf_config`), loads the slim weights into it, and
checks that its outputs equal the slim GraphModule's. Nothing in it assumes a width of the
original model: every width comes from the slim weights through the slim config, and a
parameter the config marks for scaling (``HFConfig.param_scales``: the RMS norms' weights
times ``sqrt(D / D')`` when the hidden size shrank from D to D', with the config's eps times
``D / D'``, so that the class's norms over D' channels give the slim model's full-count norms)
is scaled on the way.

Weights are matched by structure, not by a table per model: the slim GraphModule keeps the
module paths of the model it was compiled from (both front ends do), so a parameter of the
HuggingFace class is found under its own name (behind the prefix where the HuggingFace model
sits inside a wrapper), under the name of a parameter tied to it in the original model, or,
given the :class:`fxprune.Program`, through the identity of the original parameter in
``Program.module``. A parameter that none of these finds, or whose shape differs, is an error.

Widths that no config of the class can express (layers that kept different head counts or
MLP widths; GPT-2's heads, whose count also sets their width in ``GPT2Config`` while
transformers 5 has dropped ``pruned_heads``) are refused with the reason, or, with
``pad=True`` and the Program, filled up with zero channels of the trained model: removed
channels that are exactly zero are put back until every layer has the widths of the widest,
which leaves the output exactly unchanged and makes the config homogeneous. A hidden width
normalised by something other than an RMS norm (GPT-2's, BERT's, OPT's LayerNorm) has no
config at a smaller width; ``pad=True`` puts its channels back to the full width.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from .errors import UnsupportedInputError, VerificationError
from .hf_config import HIDDEN_FIELDS, HFConfig, _meta_shapes, hf_config

#: Largest relative difference (to the largest |output|) between the HuggingFace model and the
#: slim GraphModule that :func:`to_pretrained` accepts, per dtype.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}

MISMATCH_HINT = (
    "no value of the config's fields gives these shapes: the class ties the pruned width to another one "
    "(GPT-2's and BERT's head count also sets their head width, and transformers 5 has no pruned_heads); "
    "leave those groups unpruned (DHSPG(..., params=...) or a target over the other groups), or pass "
    "pad=True with the Program to put their zero channels back")
HIDDEN_HINT = (
    "the class divides its normalisations over the hidden width by the width in its config, the slim model by "
    "the full width, and only RMS norms have an identity for that (weight times sqrt(D/D'), eps times D/D'); "
    "leave the hidden-size group unpruned, or pass pad=True with the Program to put its zero channels back")
HOMOGENEOUS_HINT = (
    "DHSPG's uniform partition (fxprune.DHSPG(..., partition='uniform'), the default) removes the same "
    "fraction of every group, which gives every layer the same widths when that fraction of each group's "
    "channel count is a whole number (e.g. target_group_sparsity=0.5 with an even number of heads and MLP "
    "channels); or pass pad=True with the Program to put zero channels back up to the widest layer")


def to_pretrained(model: Any, slim: Optional[torch.nn.Module] = None, *, pad: bool = False,
                  example_inputs: Optional[Sequence] = None, verify: bool = True):
    """The slim model as an instance of the model's own ``transformers`` class.

    Args:
        model: the trained full model (a ``transformers.PreTrainedModel`` or a module holding
            one), or the :class:`fxprune.Program` compiled from it.
        slim: the slim GraphModule (``Program.construct_subnet()``); built from the Program
            when ``model`` is one and ``slim`` is None.
        pad: when the slim widths have no config (see module docstring), put removed zero
            channels back until they have one; needs the Program. Exact, since those channels
            are zero; the HuggingFace model then has more parameters than the GraphModule.
        example_inputs: inputs for the check (default: the Program's example inputs, else
            inputs drawn from the shapes the slim GraphModule records for its placeholders:
            token ids in ``[0, vocab_size)``, standard-normal floats).
        verify: compare the outputs of the HuggingFace model and the slim GraphModule in eval
            mode; relative difference (to the largest |output|) at most :data:`RTOL` of the
            dtype (float64: 1e-10, float32: 1e-5), or of the dtype the rescaled norms compute
            in when that is coarser (``HFConfig.norm_dtype``: ``LlamaRMSNorm`` normalises in
            float32, where the rescaled weight and eps round differently). Skipped on the
            meta device.

    Returns:
        A ``transformers.PreTrainedModel`` in eval mode, of the class of the HuggingFace
        model in ``model``, on the slim weights' device and dtype, with the original
        ``generation_config`` (where the model has one). ``save_pretrained`` writes it; ``from_pretrained`` reads it
        back without fxprune.

    Raises:
        fxprune.UnsupportedInputError: no single HuggingFace model in ``model``; the slim
            widths have no config (names the fields and layers, or the normalisations over a
            smaller hidden width) and ``pad`` is off or cannot help; a parameter of the class has no slim counterpart or another shape.
        fxprune.VerificationError: the outputs differ beyond :data:`RTOL`.
    """
    prog = model if _is_program(model) else None
    if prog is not None:
        model = prog._model
        if model is None:
            raise UnsupportedInputError("the Program holds no reference to the model it was compiled from")
        if slim is None:
            slim = prog.construct_subnet()
        if example_inputs is None:
            example_inputs = prog.example_inputs
    elif slim is None:
        raise UnsupportedInputError("to_pretrained(model, slim): pass the slim GraphModule, or the Program "
                                    "as the first argument")
    res = hf_config(model, slim)
    if not res.homogeneous:
        if not pad or prog is None:
            raise UnsupportedInputError(_no_config_message(res, _hf_of(model, res.prefix), pad))
        slim, res, padded = _pad(prog, model, slim, res)
        warnings.warn(f"to_pretrained: zero channels put back so that one config holds every layer: "
                      f"{padded}", stacklevel=2)
    hf = _hf_of(model, res.prefix)
    state = _slim_state(hf, slim, res, prog)
    new = _build(type(hf), res.config, state)
    if getattr(hf, "generation_config", None) is not None:  # a decoder's; an encoder has none
        new.generation_config = copy.deepcopy(hf.generation_config)
    new.eval()
    if verify and not any(t.is_meta for t in state.values()):
        inputs = tuple(example_inputs) if example_inputs is not None else _placeholder_inputs(slim, res.config)
        check_outputs(slim, new, inputs, prefix=res.prefix, rtol=_tolerance(res, state))
    return new


def _tolerance(res: HFConfig, state: Dict[str, torch.Tensor]) -> Optional[float]:
    """:data:`RTOL` of the weights' dtype, or of ``res.norm_dtype`` when that is coarser."""
    dtypes = [t.dtype for t in state.values() if t.is_floating_point()]
    if res.norm_dtype is None or not dtypes:
        return None
    return max(RTOL.get(dtypes[0], 1e-5), RTOL.get(res.norm_dtype, 1e-5))


def _no_config_message(res: HFConfig, hf: torch.nn.Module, pad: bool) -> str:
    hints = ([f"widths differ across layers ({', '.join(res.heterogeneous)}); to get homogeneous widths: "
              f"{HOMOGENEOUS_HINT}"] if res.heterogeneous else [])
    hints += [MISMATCH_HINT] if res.mismatched and not res.heterogeneous else []
    hints += [HIDDEN_HINT] if res.unexpressible else []
    extra = " (pad=True needs the Program as the first argument)" if pad else ""
    return (f"the slim widths have no {type(hf.config).__name__}: {res.explain()}. " + "; ".join(hints) + extra)


def check_outputs(slim: torch.nn.Module, hf_model: torch.nn.Module, inputs: Sequence, prefix: str = "",
                  rtol: Optional[float] = None) -> float:
    """Relative difference between ``hf_model`` and the slim GraphModule on ``inputs`` (eval
    mode, no key/value cache): over every tensor of the GraphModule's output, compared with the
    field of the same name in the HuggingFace output (``logits``, ``last_hidden_state``...),
    or, for a plain tuple, with the HuggingFace output's tensors in order. Raises
    :class:`fxprune.VerificationError` beyond ``rtol`` (default :data:`RTOL` of the dtype)."""
    from .passes.modes import eval_mode

    if prefix:
        raise UnsupportedInputError(f"the HuggingFace model sits at '{prefix.rstrip('.')}' inside the compiled "
                                    f"module, whose output is not its own; compile the HuggingFace model itself")
    with torch.no_grad(), eval_mode(slim), eval_mode(hf_model):
        want = slim(*inputs)
        kw = {"use_cache": False} if "use_cache" in _forward_params(hf_model) else {}
        got = hf_model(*inputs, **kw)
    pairs = _paired(want, got)
    if not pairs:
        raise VerificationError("the slim GraphModule returns no tensor to compare")
    diff = scale = 0.0
    for name, a, b in pairs:
        if a.shape != b.shape:
            raise VerificationError(f"output {name}: the HuggingFace model gives shape {tuple(b.shape)}, the slim "
                                    f"GraphModule {tuple(a.shape)}")
        diff = max(diff, float((a.double() - b.double()).abs().max()) if a.numel() else 0.0)
        scale = max(scale, float(a.double().abs().max()) if a.numel() else 0.0)
    rel = diff / scale if scale else diff
    tol = rtol if rtol is not None else RTOL.get(pairs[0][1].dtype, 1e-5)
    if not rel <= tol:
        raise VerificationError(f"the HuggingFace model's output differs from the slim GraphModule's: relative "
                                f"difference {rel:.3e} (max abs {diff:.3e}, max |output| {scale:.3e}), "
                                f"tolerance {tol:g} for {pairs[0][1].dtype}")
    return rel


# --------------------------------------------------------------------------------------------
# weights


def _is_program(obj) -> bool:
    from .program import Program

    return isinstance(obj, Program)


def _hf_of(model: torch.nn.Module, prefix: str) -> torch.nn.Module:
    return model.get_submodule(prefix[:-1]) if prefix else model


def _slim_state(hf: torch.nn.Module, slim: torch.nn.Module, res: HFConfig, prog) -> Dict[str, torch.Tensor]:
    """The HuggingFace class's state dict (its own names) filled from the slim GraphModule."""
    source = slim.state_dict(keep_vars=True)
    target = _meta_shapes(hf, res.config)
    names = _candidate_names(hf, res.prefix, prog)
    state, missing, wrong, used = {}, [], [], set()
    for key, shape in target.items():
        src = next((n for n in names.get(key, [res.prefix + key]) if n in source), None)
        if src is None:
            missing.append(key)
            continue
        used.add(src)
        t = source[src].detach()
        if tuple(t.shape) != shape:
            wrong.append(f"{key}: class {shape}, slim {tuple(t.shape)}")
            continue
        scale = res.param_scales.get(key)
        state[key] = t * scale if scale is not None else t
    left = [n for n, _ in slim.named_parameters() if n.startswith(res.prefix) and n not in used]
    if left:  # a trained weight the class has no place for would be dropped silently
        raise UnsupportedInputError(f"{type(hf).__name__} has no parameter for the slim GraphModule's "
                                    f"{', '.join(left[:6])}" + (" ..." if len(left) > 6 else ""))
    if missing or wrong:
        raise UnsupportedInputError(
            f"the slim GraphModule does not fill {type(hf).__name__}: "
            + "; ".join(([f"no slim tensor for {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else "")]
                         if missing else []) + wrong[:6]))
    return state


def _candidate_names(hf: torch.nn.Module, prefix: str, prog) -> Dict[str, List[str]]:
    """HuggingFace state-dict name -> slim names that may hold it, best first: its own name,
    the names of parameters tied to it, and the Program module's name of the same tensor."""
    by_tensor: Dict[int, List[str]] = {}
    for name, t in list(hf.named_parameters(remove_duplicate=False)) + list(hf.named_buffers(remove_duplicate=False)):
        by_tensor.setdefault(id(t), []).append(name)
    in_prog: Dict[int, List[str]] = {}
    if prog is not None:
        gm = prog.module
        for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
            in_prog.setdefault(id(t), []).append(name)
    out = {}
    for tid, names in by_tensor.items():
        for name in names:
            out[name] = ([prefix + name] + [prefix + n for n in names if n != name] + in_prog.get(tid, []))
    return out


def _build(cls, config, state: Dict[str, torch.Tensor]):
    """``cls(config)`` holding ``state``: on the meta device (tensors assigned) when the slim
    weights are meta, else built, cast to their dtype and loaded (a copy)."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    devices = {t.device for t in state.values()}
    device = devices.pop() if len(devices) == 1 else torch.device("cpu")
    config = copy.deepcopy(config)
    if dtype is not None:
        config.dtype = dtype
    if device.type == "meta":
        with torch.device("meta"):
            new = cls(config)
        if dtype is not None:
            new = new.to(dtype)
        new.load_state_dict(state, strict=True, assign=True)
        return new
    new = cls(config)
    if dtype is not None:
        new = new.to(dtype)
    new = new.to(device)
    new.load_state_dict(state, strict=True)
    return new


# --------------------------------------------------------------------------------------------
# padding to a homogeneous config


def _pad(prog, model, slim, res: HFConfig) -> Tuple[torch.nn.Module, HFConfig, str]:
    """Put removed (zero) channels back until one config of the class holds the slim shapes:
    heterogeneous fields take their largest value, fields the class cannot change keep the
    original, and so does a hidden width whose normalisations have no config at the slim width.
    Returns (new slim GraphModule, its HFConfig, what was padded)."""
    from .passes import prune_rewrite
    from .program import max_output_difference

    if "erase" in prog.modes:
        raise UnsupportedInputError("pad=True pads channels; a Program in erase mode has no channel to put back")
    hf = _hf_of(model, res.prefix)
    cfg = copy.deepcopy(hf.config)
    for f, (_, new) in res.changed.items():
        if not (res.unexpressible and f in HIDDEN_FIELDS):
            setattr(cfg, f, new)
    for f, values in res.heterogeneous.items():
        setattr(cfg, f, max(int(v) for v in values))
    target = _meta_shapes(hf, cfg)
    slim_shapes = {k: tuple(v.shape) for k, v in slim.state_dict().items()}
    zero = prog.zero_channels()
    keep = {gid: ~z for gid, z in zero.items() if z.any()}
    # (param, dim) -> [(group, positions per channel)] over the slices of the pruned groups
    owners: Dict[Tuple[str, int], List[Tuple[int, float]]] = {}
    for gid in keep:
        g = prog.groups[gid]
        counts: Dict[Tuple[str, int], int] = {}
        for s in g.slices + g.dependents:
            counts[(s.param, s.dim)] = counts.get((s.param, s.dim), 0) + len(s.index)
        for dim, n in counts.items():
            owners.setdefault(dim, []).append((gid, n / g.size))
    add: Dict[int, int] = {}
    for key, shape in target.items():
        name = res.prefix + key
        have = slim_shapes.get(name)
        if have is None or len(have) != len(shape):
            continue
        for d, (h, t) in enumerate(zip(have, shape)):
            if h > t:
                raise UnsupportedInputError(f"pad=True: {name} dim {d} is {h} wide in the slim model, wider than "
                                            f"the {t} the padded config gives")
            if h == t:
                continue
            own = owners.get((name, d), [])
            if len(own) != 1 or (t - h) % own[0][1]:
                raise UnsupportedInputError(
                    f"pad=True: {name} dim {d} needs {t - h} more positions, which "
                    + ("no pruned group provides" if not own else
                       f"{len(own)} groups share" if len(own) > 1 else
                       f"is not a whole number of channels of group {own[0][0]}"))
            gid, per = own[0]
            add[gid] = max(add.get(gid, 0), int((t - h) // per))
    for gid, n in add.items():
        removed = np.flatnonzero(~keep[gid])
        keep[gid] = keep[gid].copy()
        keep[gid][removed[:n]] = True
    keep = {gid: k for gid, k in keep.items() if not k.all()}
    padded = prune_rewrite(prog.module, keep, prog.example_inputs)
    padded.train(prog.module.training)
    diff, scale = max_output_difference(prog.module, padded, prog.example_inputs)
    if diff > 1e-4 * max(1.0, scale):
        raise VerificationError(f"the padded slim model differs from the full model: max abs difference {diff:.3e}")
    new_res = hf_config(model, padded)
    if not new_res.homogeneous:
        raise UnsupportedInputError(f"pad=True: the padded widths still have no config: {new_res.explain()}")
    what = ", ".join(f"group {gid}: {n} channel(s)" for gid, n in sorted(add.items()))
    return padded, new_res, f"{res.explain()} -> {new_res.explain()} ({what})"


# --------------------------------------------------------------------------------------------
# inputs and outputs


def _forward_params(module: torch.nn.Module) -> set:
    import inspect

    return set(inspect.signature(module.forward).parameters)


def _placeholder_inputs(slim: torch.nn.Module, config) -> tuple:
    """Inputs of the shapes and dtypes the slim GraphModule's placeholders record."""
    gen = torch.Generator().manual_seed(0)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    out = []
    for node in slim.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val", node.meta.get("tensor_meta"))
        if val is None or not hasattr(val, "shape"):
            raise UnsupportedInputError(f"the slim GraphModule records no shape for its input '{node.name}'; "
                                        f"pass example_inputs=")
        shape, dtype = tuple(int(s) for s in val.shape), val.dtype
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen, dtype=dtype))
        elif dtype == torch.bool:
            out.append(torch.ones(shape, dtype=dtype))
        else:
            out.append(torch.randint(0, vocab, shape, generator=gen, dtype=dtype))
    return tuple(out)


def _paired(want: Any, got: Any) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    if isinstance(want, Mapping):
        pairs = []
        for k, v in want.items():
            other = got[k] if isinstance(got, Mapping) else getattr(got, k, None)
            if other is None:
                raise VerificationError(f"the HuggingFace output has no field {k!r}")
            pairs += [(k, a, b) for _, a, b in _paired(v, other)]
        return pairs
    a = [t for t in tree_leaves(want) if isinstance(t, torch.Tensor)]
    if isinstance(got, Mapping) and len(a) == 1:
        got = next(iter(got.values()))
    b = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(b) < len(a):
        raise VerificationError(f"the HuggingFace model returns {len(b)} tensors, the slim GraphModule {len(a)}")
    return [(f"output {i}", x, y) for i, (x, y) in enumerate(zip(a, b))]


__all__ = ["HIDDEN_HINT", "HOMOGENEOUS_HINT", "MISMATCH_HINT", "RTOL", "check_outputs", "to_pretrained"]
