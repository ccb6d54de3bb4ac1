"""Generality sweep: fxprune and Torch-Pruning on the same models, judged by the same test.

For every model (random weights, eval mode, float32, randomised normalisation statistics and
affine parameters, all-zero parameters redrawn), in its own process:

**fxprune** (``coverage_table.judge``): compile, zero a random 50% of the channels of every
prunable exact group (its producer slices: weight rows, biases, norm affine entries),
construct the slim model and compare it with the zeroed full model. Verdicts as in
``coverage_table.py``: exact / partial / inexact / frozen / error (an output mismatch is an
error there).

**Torch-Pruning** (``torch_pruning``, its dependency graph, no importance criterion):

1. ``tp.DependencyGraph().build_dependency(model, example_inputs)`` on a copy of the model,
   then ``DG.get_all_groups(root_module_types=(convolutions, nn.Linear))`` (TP's default roots).
2. The layers that produce the model output (the first convolutions / linears met walking the
   autograd graph back from each output: a classifier, a segmentation head) are passed as
   ``ignored_layers``, as TP's examples pass the classifier; a group that still lists an output
   node among its dependencies is left alone as well, and so is a group of fewer than two
   channels. (fxprune freezes the groups that reach the output by itself.)
3. Indices: a random half of each group's channels, chosen as TP's own pruners choose them
   for grouped layers: when a layer of the group has channel groups (a grouped convolution,
   a GroupNorm; depthwise convolutions excepted), the same offsets are dropped in every
   channel group.
4. Zeroing: for every dependency of TP's pruning group with those indices (computed on the
   unpruned model, so all indices are in the original coordinates), TP's own pruning function
   is applied to a probe copy of the target layer whose parameters hold their entries' flat
   indices (float64, exact); every parameter entry that the function removes is set to zero
   in the full model. That is every slice TP claims is coupled: the producers' output rows,
   their biases, BatchNorm/LayerNorm/GroupNorm affine entries, and the consumers' input
   columns. Buffers (running statistics) are left as they are: a norm whose weight and bias
   are zero outputs zero whatever its statistics. Zeroing the consumers' input columns makes
   this test more lenient than fxprune's, which zeroes producers only and lets the zero flow.
5. Pruning: ``group.prune(idxs)`` for each group in turn on the copy (what TP's pruners do).
6. The pruned copy's output is compared with the zeroed full model's (max |diff| /
   max |output| <= ``--rtol``).

TP verdicts: **exact** (matches; something was pruned), **mismatch** (runs but differs, or
the output shape changed: a coupling TP missed or got wrong, or channels that are not
zero-invariant, e.g. normalised by a LayerNorm), **frozen** (no prunable group), **error**
(the dependency graph, the pruning or the forward pass raised, or together they ran past
``--tp-time-limit``; the stage and message are given). On a mismatch or error
the groups are replayed one at a time (bounded by ``--localise-s``) to name the first group
whose pruning breaks the equivalence. TP's higher-level pruners can be told the number of
attention heads of each layer (``num_heads``) to prune whole heads and update module
attributes; that needs per-architecture configuration, so it is not used: both tools get the
model and its example inputs only.

Model sets:

* ``torchvision``: every classification and segmentation model of ``_models.py`` (its
  builders and small inputs);
* ``timm``: one small architecture per family of ``timm.list_models()`` (see
  :func:`timm_selection`), ``pretrained=False``, ``num_classes=10``, input side the smallest
  of 64 / 96 / 128 / 160 that the model builds and runs at (``img_size`` passed where the
  constructor takes it), else its default configuration's size;
* ``hf``: the HuggingFace models of ``transformers_sweep.py`` (BERT, GPT-2, Llama with GQA, ViT,
  T5 encoder; small configs);
* ``detection``: every torchvision detector, ``video``: swin3d_t, mvit_v1_b, raft_small, and
  ``moe``: HuggingFace Mixtral and Qwen2-MoE, built by ``_region_models.py`` (neither front end
  traces them whole: fxprune compiles them as regions). Detectors keep the batch-norm statistics
  that builder calibrates (random ones would saturate into exact score ties) and are compared
  in float64, where a detector's sort and non-maximum suppression do not turn rounding into
  other detections; detections are compared in a canonical order (score, label, box) for both
  tools. RAFT runs in float32 only (its forward casts its coordinate grid to float32).

Usage::

    python benchmarks/generality.py --quick                   # a handful per set
    python benchmarks/generality.py --set torchvision timm hf # every set, in this order
    python benchmarks/generality.py --models resnet18 timm/convnext_atto hf/bert
    python benchmarks/generality.py --render                  # rewrite generality.md from the JSON

``--fxprune-only`` re-runs fxprune's side only and keeps each model's Torch-Pruning record from
the existing generality.json (marked ``"tp_kept": true``; the rendered table says so): TP's side
does not depend on fxprune, and a full run with its time limits takes hours on a small machine.

Results are merged into benchmarks/results/generality.json (records of models run now replace
older ones; ``--fresh`` starts over) and generality.md, after every model, so an interrupted
run keeps what it has finished.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import re
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _runner import run_many, run_worker  # noqa: E402
from coverage_table import OUTPUT_REASON, _m, _pct, _short, normalize_reason  # noqa: E402

SETS = ("torchvision", "timm", "hf", "detection", "video", "moe")
QUICK = {
    "torchvision": ["resnet18", "mobilenet_v3_small", "densenet121", "vit_b_16", "lraspp_mobilenet_v3_large"],
    "timm": ["timm/resnet10t", "timm/convnext_atto", "timm/efficientnet_b0", "timm/levit_128s",
             "timm/mobilevit_xxs"],
    "hf": ["hf/bert", "hf/gpt2", "hf/llama"],
    "detection": ["detection/fasterrcnn_mobilenet_v3_large_320_fpn", "detection/ssdlite320_mobilenet_v3_large"],
    "video": ["video/swin3d_t"],
    "moe": ["moe/mixtral", "moe/qwen2_moe"],
}
REGION_SETS = ("detection", "video", "moe")  # built by _region_models.py, names prefixed "set/"
FXPRUNE_CORRECT = ("exact", "partial", "inexact")  # something pruned and the slim model matches
NOT_RUN = "not run"  # --fxprune-only on a model with no earlier Torch-Pruning record: left out of the summaries


# ------------------------------------------------------------------------------ model sets


# Name prefixes that qualify an architecture rather than name it (tf_efficientnet is a port of
# efficientnet with TF padding, a family of its own here).
_QUALIFIERS = {"tf", "legacy", "dm", "gc", "eca", "ese", "tiny", "wide", "nf", "inception"}
# Synthetic test models and families whose every variant is a large foundation-model encoder.
_SKIP_PREFIXES = ("test_", "aimv2", "deepseek_", "gemma", "qwen", "samvit")
# Size words, smallest first.
_SIZES = ["atto", "zepto", "femto", "pico", "nano", "xxxs", "xxs", "xs", "mini", "tiny", "t", "s0", "a0", "b0",
          "lite0", "small", "s", "lite", "light", "b1", "m0", "m", "medium", "base", "b", "large", "l", "huge",
          "giant"]


def timm_family(name: str) -> str:
    """``resnet50d`` -> ``resnet``, ``convnextv2_atto`` -> ``convnextv2``,
    ``tf_efficientnet_b0`` -> ``tf_efficientnet``: the first name token without the suffix from
    its first number on (a version ``v2`` stays), joined to the next token after a qualifier."""
    def stem(token: str) -> str:
        return re.sub(r"(?<![v\d])\d+[a-z\d]*$", "", token)

    tokens = name.split("_")
    if stem(tokens[0]) in _QUALIFIERS and len(tokens) > 1:
        return f"{tokens[0]}_{stem(tokens[1])}"
    return stem(tokens[0])


def _size_rank(name: str) -> tuple:
    tokens = name.split("_")
    size = min((_SIZES.index(t) for t in tokens if t in _SIZES), default=len(_SIZES))
    return size, len(name), tuple(int(x) for x in re.findall(r"\d+", name)), name


def timm_selection() -> List[str]:
    """One architecture per timm family: the smallest by its name (size word, then the shortest
    name, i.e. the plainest variant, then the numbers in it, e.g. depth or width).
    ``timm/``-prefixed, sorted."""
    import timm

    families: Dict[str, List[str]] = defaultdict(list)
    for name in timm.list_models():
        if not name.startswith(_SKIP_PREFIXES):
            families[timm_family(name)].append(name)
    return sorted(f"timm/{min(names, key=_size_rank)}" for names in families.values())


def set_names(which: str) -> List[str]:
    if which == "torchvision":
        import _models

        return list(_models.ALL)
    if which == "timm":
        return timm_selection()
    if which in REGION_SETS:
        import _region_models

        names = {"detection": _region_models.DETECTION, "video": _region_models.VIDEO, "moe": _region_models.MOE}
        return [f"{which}/{n}" for n in names[which]]
    import transformers_sweep

    return [n for n in transformers_sweep.MODELS if n.startswith("hf/")]


def set_of(name: str) -> str:
    prefix = name.split("/", 1)[0] if "/" in name else ""
    return prefix if prefix in ("timm", "hf") + REGION_SETS else "torchvision"


_TIMM_SIDES = (64, 96, 128, 160)


def _build_timm(arch: str, seed: int):
    """A timm model with random weights and the smallest input it runs at (see the module doc)."""
    import timm
    import torch

    import _models

    cfg = timm.get_pretrained_cfg(arch)
    chans, height, width = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
    kwargs = dict(pretrained=False, num_classes=10)
    model, sized, last_exc = None, True, None
    for side in [s for s in _TIMM_SIDES if s < min(height, width)] + [None]:
        x = torch.randn(1, chans, side or height, side or width, generator=torch.Generator().manual_seed(seed))
        try:
            if model is None or sized:
                torch.manual_seed(seed)
                try:
                    model = timm.create_model(arch, **kwargs, **({"img_size": side} if side else {}))
                    sized = side is not None
                except TypeError:  # the constructor takes no img_size: one model for every side
                    model, sized = timm.create_model(arch, **kwargs), False
            with torch.no_grad():
                model.eval()(x)
        except Exception as exc:  # noqa: BLE001 - too small for this architecture: try the next size
            last_exc = exc
            continue
        _models.fill_zero_params(model, seed)
        return model.eval(), (x,)
    raise last_exc


def build(name: str, seed: int = 0):
    """``(model, example_inputs)`` for a name of any set, random weights, eval mode."""
    import _models

    kind = set_of(name)
    if kind == "timm":
        return _build_timm(name.split("/", 1)[1], seed)
    if kind in REGION_SETS:
        import _region_models

        from fxprune.program import _normalize_inputs

        model, inputs = _region_models.build(name.split("/", 1)[1], seed=seed)
        return model, _normalize_inputs(model, inputs)
    if kind == "hf":
        import transformers_sweep

        return transformers_sweep.MODELS[name].build()
    return _models.build(name, seed=seed), _models.example_inputs(name, seed=seed)


# ------------------------------------------------------------------------------ Torch-Pruning


def _reaches_output(group) -> bool:
    import torch_pruning as tp

    return any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group.items)


def output_layers(model, inputs: tuple, layer_types: tuple) -> list:
    """The layers of ``layer_types`` that produce the model's output: the first ones met walking
    the autograd graph back from every output tensor (a classifier, a segmentation head)."""
    import torch
    import torch_pruning as tp

    producer = {}

    def hook(module, _, out):
        if isinstance(out, torch.Tensor) and out.grad_fn is not None:
            producer[out.grad_fn] = module

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layer_types)]
    try:
        with torch.enable_grad():
            out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    stack = [t.grad_fn for t in tp.utils.flatten_as_list(out) if isinstance(t, torch.Tensor)]
    seen, found = set(), []
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn in producer:
            found.append(producer[fn])
        else:
            stack.extend(f for f, _ in fn.next_functions)
    return list(dict.fromkeys(found))


def _channel_groups(DG, group) -> int:
    """The channel groups TP's pruners respect for ``group``: the largest number of groups of
    a grouped convolution or GroupNorm in it (depthwise convolutions excepted), else 1."""
    import torch.nn as nn

    n = 1
    for dep, _ in group.items:
        m = dep.target.module
        if not isinstance(m, nn.Module) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels):
            continue
        pruner = DG.get_pruner_of_module(m)
        if pruner is None:
            continue
        out = DG.is_out_channel_pruning_fn(dep.handler)
        n = max(n, (pruner.get_out_channel_groups if out else pruner.get_in_channel_groups)(m))
    return n


def _drop_indices(n: int, channel_groups: int, rng) -> List[int]:
    """A random half of ``n`` channels; the same offsets in each of ``channel_groups`` chunks."""
    if channel_groups < 1 or n % channel_groups:
        channel_groups = 1
    per = n // channel_groups
    offsets = rng.choice(per, per // 2, replace=False)
    return sorted(int(o) + j * per for j in range(channel_groups) for o in offsets)


def tp_plan(model, inputs: tuple, seed: int):
    """Build TP's dependency graph on ``model`` and choose what to prune.

    Returns ``(DG, plans, counts)``: ``plans`` is a list of ``(group, idxs, pruning_group)``
    (``pruning_group`` = ``DG.get_pruning_group`` with those indices, on the unpruned model);
    ``counts`` has ``groups`` (TP's groups but those of the output layers), ``output_layers``
    (passed to ``get_all_groups`` as ``ignored_layers``), ``output_groups`` (groups that still
    reach an output node: left alone), ``channels`` and ``pruned_channels`` of the planned groups.
    """
    import numpy as np
    import torch_pruning as tp

    roots = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    heads = output_layers(model, inputs, roots)
    groups = list(DG.get_all_groups(ignored_layers=heads, root_module_types=roots))
    rng = np.random.default_rng(seed)
    plans = []
    counts = {"groups": len(groups), "output_layers": len(heads), "output_groups": 0, "channels": 0,
              "pruned_channels": 0}
    for g in groups:
        if _reaches_output(g):
            counts["output_groups"] += 1
            continue
        n = len(g.items[0].idxs)
        idxs = _drop_indices(n, _channel_groups(DG, g), rng)
        if not idxs:
            continue
        root = g.items[0].dep
        plans.append((g, idxs, DG.get_pruning_group(root.target.module, root.handler, idxs)))
        counts["channels"] += n
        counts["pruned_channels"] += len(idxs)
    return DG, plans, counts


def _ids_like(p):
    import torch

    return torch.nn.Parameter(torch.arange(p.numel(), dtype=torch.float64).view(p.shape), requires_grad=False)


def _removed_entries(dep, idxs, target) -> Dict[str, "torch.Tensor"]:
    """Bool masks (parameter name relative to ``target`` -> entries TP's pruning function
    removes) for one dependency; ``target`` is a module or an ``nn.Parameter``.

    The function runs on a probe copy whose parameters hold their flat indices."""
    import torch

    pruner = dep.handler.__self__
    pruner.pruning_dim = dep.target.pruning_dim  # as tp's Dependency.__call__ sets it
    if isinstance(target, torch.nn.Parameter):
        survivors = {"": dep.handler(_ids_like(target), idxs)}
        shapes = {"": target.shape}
    else:
        params = dict(target.named_parameters())
        probe = copy.deepcopy(target, memo={id(p): _ids_like(p) for p in params.values()})
        dep.handler(probe, idxs)
        survivors = {}
        for pname in params:
            owner, _, leaf = pname.rpartition(".")
            survivors[pname] = getattr(probe.get_submodule(owner) if owner else probe, leaf, None)
        shapes = {pname: p.shape for pname, p in params.items()}
    masks = {}
    for pname, kept in survivors.items():
        if kept is None:
            continue
        mask = torch.ones(shapes[pname].numel(), dtype=torch.bool)
        mask[kept.detach().reshape(-1).long()] = False
        if mask.any():
            masks[pname] = mask.view(shapes[pname])
    return masks


def tp_zero_(full, plan_copy_names: Tuple[dict, dict], pruning_group) -> None:
    """Zero in ``full`` every parameter entry that ``pruning_group`` removes.

    ``plan_copy_names``: (module -> name, parameter -> name) of the model TP's graph was built
    on, a copy of ``full`` (same names)."""
    import torch

    module_names, param_names = plan_copy_names
    with torch.no_grad():
        for dep, idxs in pruning_group.items:
            target = dep.target.module
            if isinstance(target, torch.nn.Parameter):
                if target not in param_names:
                    continue
                name = param_names[target]
                for _, mask in _removed_entries(dep, idxs, target).items():
                    full.get_parameter(name).masked_fill_(mask, 0)
            elif target in module_names:  # not TP's placeholder ops (concat, split, ...): no parameters
                module = full.get_submodule(module_names[target])
                for pname, mask in _removed_entries(dep, idxs, target).items():
                    module.get_parameter(pname).masked_fill_(mask, 0)


def _names(model) -> Tuple[dict, dict]:
    return ({m: n for n, m in model.named_modules()}, {p: n for n, p in model.named_parameters()})


def _describe(plan) -> str:
    group, idxs, _ = plan
    root = group.items[0].dep.target
    kinds = Counter(type(dep.target.module).__name__ for dep, _ in group.items)
    layers = ", ".join(f"{k} x{v}" for k, v in kinds.most_common() if not k.startswith("_"))  # not TP's op nodes
    return f"root {root.name.split(' (')[0]} ({len(idxs)} of {len(group.items[0].idxs)} channels; {layers})"


class _TimeLimit:
    """Raise ``TimeoutError`` in the main thread after ``seconds`` (SIGALRM; POSIX only): TP's
    group search can run for hours on some graphs, and the record must still be written."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def _expire(self, *_):
        raise TimeoutError(f"no result within {self.seconds:.0f}s")

    def __enter__(self):
        import signal

        self._old = signal.signal(signal.SIGALRM, self._expire)
        signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        import signal

        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, self._old)
        return False


def judge_tp(model, inputs: tuple, seed: int, rtol: float, time_limit: float = 300) -> dict:
    """Torch-Pruning's verdict on ``model`` (left untouched) by the test of the module doc.

    Returns the record fields: ``verdict``, ``error`` (stage and message; a stage that runs
    past ``time_limit`` seconds in all is an error), ``groups``, ``output_layers``,
    ``output_groups``, ``pruned_groups``, ``channels``, ``pruned_channels``, ``params_full``,
    ``params_slim``, ``max_rel_diff``, ``build_s``; never raises."""
    with _TimeLimit(time_limit):
        return _judge_tp(model, inputs, seed, rtol)


def _judge_tp(model, inputs: tuple, seed: int, rtol: float) -> dict:
    import _models
    from fxprune.errors import VerificationError
    from fxprune.program import max_output_difference

    rec: dict = {}
    stage = "dependency graph"
    try:
        pruned = copy.deepcopy(model)
        t0 = time.perf_counter()
        DG, plans, counts = tp_plan(pruned, inputs, seed)
        rec["build_s"] = time.perf_counter() - t0
        rec.update(counts, pruned_groups=len(plans))
        rec["params_full"] = _models.num_params(model)
        if not plans:
            rec["verdict"] = "frozen"
            return rec

        stage = "zero"
        zeroed = copy.deepcopy(model)
        names = _names(pruned)
        for plan in plans:
            tp_zero_(zeroed, names, plan[2])

        stage = "prune"
        for group, idxs, _ in plans:
            group.prune(idxs)
        rec["params_slim"] = _models.num_params(pruned)

        stage = "forward"
        try:
            diff, scale = max_output_difference(zeroed, pruned, inputs)
        except VerificationError as exc:  # it runs, but the output's shape or integers changed
            rec.update(verdict="mismatch", error=str(exc))
            return rec
        rec["max_rel_diff"] = diff / scale if scale > 0 else diff
        if rec["max_rel_diff"] > rtol:
            rec.update(verdict="mismatch", error=f"max rel diff {rec['max_rel_diff']:.3e} > {rtol:g}")
        else:
            rec["verdict"] = "exact"
    except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
        rec.update(verdict="error", error=f"{stage}: {type(exc).__name__}: {_short(str(exc), 600)}",
                   traceback=traceback.format_exc(limit=-4))
    return rec


def localise_tp(model, inputs: tuple, seed: int, rtol: float, budget_s: float) -> str:
    """Replay TP's plan one group at a time (zero it, prune it, compare) and describe the first
    group after which the pruned model raises or differs; ``""`` when ``budget_s`` runs out."""
    try:
        with _TimeLimit(budget_s):
            return _localise_tp(model, inputs, seed, rtol)
    except TimeoutError:
        return ""


def _localise_tp(model, inputs: tuple, seed: int, rtol: float) -> str:
    from fxprune.program import max_output_difference

    pruned, zeroed = copy.deepcopy(model), copy.deepcopy(model)
    _, plans, _ = tp_plan(pruned, inputs, seed)
    names = _names(pruned)
    for k, plan in enumerate(plans):
        try:
            tp_zero_(zeroed, names, plan[2])
            plan[0].prune(plan[1])
            diff, scale = max_output_difference(zeroed, pruned, inputs)
        except TimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - the failure is what is sought
            return f"group {k + 1}/{len(plans)}: {_describe(plan)}: {type(exc).__name__}: {_short(str(exc), 200)}"
        rel = diff / scale if scale > 0 else diff
        if rel > rtol:
            return f"group {k + 1}/{len(plans)}: {_describe(plan)}: max rel diff {rel:.2e}"
    return "no single group: every prefix of the plan matches"


# ------------------------------------------------------------------------------ worker


def _fxprune_summary(rec: dict) -> dict:
    """coverage_table.judge's record without the per-group details; with the most common
    reasons why groups are frozen or inexact (output groups aside)."""
    details = rec.pop("group_details", [])
    rec.pop("traceback", None)
    reasons = Counter(normalize_reason(g["reason"] or "(no reason)") for g in details
                      if not (g["prunable"] and g["exact"]) and not OUTPUT_REASON.search(g["reason"] or ""))
    rec["reasons"] = [f"{n}x {r}" for r, n in reasons.most_common(3)]
    return rec


def worker(name: str, seed: int, rtol: float, tp_time_limit: float, localise_s: float,
           fxprune_only: bool = False) -> None:
    """Print the model's record as JSON lines: after fxprune, after TP, after localisation
    (``fxprune_only``: after fxprune only, with no ``tp`` field)."""
    import torch

    import _models
    from coverage_table import judge
    from fxprune.testing import randomize_norms

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    rec: dict = {"model": name, "set": set_of(name)}
    t_start = time.perf_counter()

    def emit():
        rec["total_s"] = time.perf_counter() - t_start
        print(json.dumps(rec), flush=True)

    try:
        model, inputs = build(name, seed)
        if set_of(name) != "detection":  # detectors keep their calibrated statistics (module docstring)
            randomize_norms(model, seed)
        if set_of(name) == "detection":
            from fxprune.testing import _convert

            model, inputs = model.double(), _convert(inputs, torch.float64)
    except Exception as exc:  # noqa: BLE001
        msg = f"build: {type(exc).__name__}: {_short(str(exc), 600)}"
        rec.update(fxprune={"verdict": "error", "error": msg}, tp={"verdict": "error", "error": msg})
        emit()
        return
    first = next(t for t in torch.utils._pytree.tree_flatten(inputs)[0] if isinstance(t, torch.Tensor))
    rec["input"] = list(first.shape)
    rec["dtype"] = str(first.dtype).replace("torch.", "")
    rec["params_model"] = _models.num_params(model)

    rec["fxprune"] = _fxprune_summary(judge(copy.deepcopy(model), inputs, "random", seed, rtol))
    gc.collect()
    if fxprune_only:
        emit()
        return
    rec["tp"] = {"verdict": "pending"}
    emit()
    rec["tp"] = judge_tp(model, inputs, seed, rtol, tp_time_limit)
    rec["tp"].pop("traceback", None)
    emit()
    if rec["tp"]["verdict"] in ("mismatch", "error") and rec["tp"].get("pruned_groups"):
        gc.collect()
        try:
            rec["tp"]["first_failure"] = localise_tp(model, inputs, seed, rtol, localise_s) or (
                f"not found within {localise_s:.0f}s")
        except Exception as exc:  # noqa: BLE001 - the main verdict stands
            rec["tp"]["first_failure"] = f"replay failed: {type(exc).__name__}: {_short(str(exc), 200)}"
        emit()


# ------------------------------------------------------------------------------ report


def _rel(x) -> str:
    return "" if x is None else f"{x:.1e}"


def _verdict_text(r: dict, n: int = 110) -> str:
    text = r.get("verdict", "")
    if r.get("error"):
        text += ": " + _short(r["error"], n)
    return text


def markdown_table(records: List[dict]) -> str:
    head = ("| model | input | params M | fxprune | fx exact groups / all | fx channels zeroed | fx params cut | "
            "fx max rel diff | TP | TP groups pruned / found (output layers) | TP channels pruned | TP params cut | "
            "TP max rel diff | TP first failing group |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        fx, tp = r.get("fxprune", {}), r.get("tp", {})
        shape = "x".join(map(str, r.get("input", [])[2:]))
        if r.get("set") == "hf" and r.get("input"):
            shape = f"{r['input'][-1]} tokens" if len(r["input"]) == 2 else shape
        fx_groups = f"{fx['prunable_exact']} / {fx['groups']}" if "groups" in fx else ""
        tp_groups = (f"{tp['pruned_groups']} / {tp['groups']} ({tp['output_layers']})"
                     if "output_layers" in tp else "")
        lines.append(
            f"| {r['model']} | {shape} | {_m(r.get('params_model'))} | {_verdict_text(fx)} | {fx_groups} | "
            f"{fx.get('zeroed_channels', '')} | {_pct(fx.get('params_full'), fx.get('params_slim'))} | "
            f"{_rel(fx.get('max_rel_diff'))} | {_verdict_text(tp)} | {tp_groups} | "
            f"{tp.get('pruned_channels', '')} | {_pct(tp.get('params_full'), tp.get('params_slim'))} | "
            f"{_rel(tp.get('max_rel_diff'))} | {_short(tp.get('first_failure', ''), 160)} |")
    return "\n".join(lines)


def summarize(records: List[dict]) -> dict:
    """Verdict counts per tool, and the models where one tool is correct and the other not
    (fxprune correct: exact, partial or inexact, i.e. it pruned and its slim model matches;
    TP correct: exact). Models whose Torch-Pruning side was not run are left out."""
    done = [r for r in records if r.get("tp", {}).get("verdict") not in (None, "pending", NOT_RUN)]
    fx_ok = {r["model"] for r in done if r["fxprune"]["verdict"] in FXPRUNE_CORRECT}
    tp_ok = {r["model"] for r in done if r["tp"]["verdict"] == "exact"}
    return {
        "models": len(done),
        "fxprune": dict(Counter(r["fxprune"]["verdict"] for r in done)),
        "tp": dict(Counter(r["tp"]["verdict"] for r in done)),
        "fxprune_correct": len(fx_ok),
        "tp_exact": len(tp_ok),
        "both": len(fx_ok & tp_ok),
        "only_fxprune": sorted(fx_ok - tp_ok),
        "only_tp": sorted(tp_ok - fx_ok),
        "neither": sorted({r["model"] for r in done} - fx_ok - tp_ok),
    }


def _summary_lines(name: str, s: dict) -> List[str]:
    def counts(c):
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -kv[1]))

    return [f"**{name}**: {s['models']} models. fxprune: {counts(s['fxprune'])}; pruned and exact "
            f"(exact + partial + inexact) {s['fxprune_correct']}. Torch-Pruning: {counts(s['tp'])}. "
            f"Both correct: {s['both']}; only fxprune: {len(s['only_fxprune'])}; only TP: {len(s['only_tp'])}; "
            f"neither: {len(s['neither'])}.", "",
            f"Only fxprune: {', '.join(s['only_fxprune']) or '-'}.", "",
            f"Only Torch-Pruning: {', '.join(s['only_tp']) or '-'}.", "",
            f"Neither: {', '.join(s['neither']) or '-'}.", ""]


def render(data: dict) -> str:
    env = data["env"]
    md = ["# Generality: fxprune vs Torch-Pruning, by numerical equivalence", "",
          f"Generated by `python benchmarks/generality.py` (torch {env.get('torch')}, torch-pruning "
          f"{env.get('torch_pruning')}, timm {env.get('timm')}, transformers {env.get('transformers')}; float32, "
          f"eval mode, random weights, seed {env.get('seed')}, tolerance max|diff|/max|out| <= {env.get('rtol')}). "
          "Each tool prunes a random half of every group it can prune; its pruned model is compared with the full "
          "model in which the same channels are zeroed (the procedure and its fairness are described in the "
          "script's docstring).", "",
          "Columns: *fxprune*: coverage_table's verdict (exact: every group prunable and exact but the output one; "
          "partial: some groups frozen for other reasons; inexact: some groups not zero-invariant, not pruned; "
          "frozen; error, an output mismatch included); *fx exact groups / all*: prunable exact groups (these are "
          "halved) of all groups; *TP*: exact (the pruned model matches), mismatch (runs, differs), frozen, error; "
          "*TP groups pruned / found (output layers)*: groups halved / groups `get_all_groups` yields (output "
          "layers, passed as `ignored_layers`); *TP first failing group*: the first group after which a one-group-at-a-time "
          "replay raises or differs.", ""]
    kept = [r for r in data["records"] if r.get("tp_kept") and r["tp"].get("verdict") != NOT_RUN]
    not_run = [r["model"] for r in data["records"] if r.get("tp", {}).get("verdict") == NOT_RUN]
    if kept:
        md += [f"Torch-Pruning's columns of {len(kept)} of {len(data['records'])} models are kept from an earlier "
               "full run (`--fxprune-only` re-ran fxprune's side only; Torch-Pruning's side does not depend on "
               f"fxprune); torch-pruning {env.get('torch_pruning')}.", ""]
    if not_run:
        md += [f"Torch-Pruning was not run on {len(not_run)} models new since that run ({', '.join(not_run)}); "
               "they are left out of the summary counts.", ""]
    md += ["## Summary", ""]
    by_set = defaultdict(list)
    for r in data["records"]:
        by_set[r["set"]].append(r)
    ordered = [s for s in SETS if s in by_set]
    for s in ordered:
        md += _summary_lines(s, summarize(by_set[s]))
    if len(ordered) > 1:
        md += _summary_lines("all sets", summarize(data["records"]))
    for s in ordered:
        md += [f"## {s}", "", markdown_table(by_set[s]), ""]
    return "\n".join(md)


def _env(args) -> dict:
    import timm
    import torch
    import torch_pruning
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "transformers": transformers.__version__, "torch_pruning": torch_pruning.__version__,
            "cpus": os.cpu_count(), "threads": int(os.environ.get("BENCH_THREADS", "1")), "dtype": "float32",
            "seed": args.seed, "rtol": args.rtol}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", nargs="+", choices=SETS + ("all",), default=["all"],
                    help="model sets, run in the order given (all = torchvision timm hf)")
    ap.add_argument("--models", nargs="*", default=None, help="these models only (timm/NAME, hf/NAME, or a "
                                                               "torchvision name)")
    ap.add_argument("--quick", action="store_true", help="a handful of models per set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rtol", type=float, default=1e-4, help="max |pruned - zeroed full| / max |full| (float32)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per model")
    ap.add_argument("--tp-time-limit", type=float, default=300,
                    help="seconds for Torch-Pruning's graph, pruning and comparison (past it: an error)")
    ap.add_argument("--localise-s", type=float, default=60, help="seconds for the one-group-at-a-time replay")
    ap.add_argument("--jobs", type=int, default=1, help="models run in parallel")
    ap.add_argument("--fresh", action="store_true", help="discard the records of an existing generality.json")
    ap.add_argument("--fxprune-only", action="store_true",
                    help="run fxprune's side only; keep each model's Torch-Pruning record from generality.json")
    ap.add_argument("--render", action="store_true", help="only rewrite generality.md from generality.json")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--list", action="store_true", help="print the models that would run and exit")
    ap.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        worker(args.worker, args.seed, args.rtol, args.tp_time_limit, args.localise_s, args.fxprune_only)
        return 0
    out = Path(args.out)
    json_path, md_path = out / "generality.json", out / "generality.md"
    if args.render:
        md_path.write_text(render(json.loads(json_path.read_text())))
        return 0

    sets = list(SETS) if "all" in args.set else args.set
    if args.models:
        names = list(args.models)
    else:
        names = [n for s in sets for n in (QUICK[s] if args.quick else set_names(s))]
    if args.list:
        print("\n".join(names))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    old = [] if args.fresh or not json_path.exists() else json.loads(json_path.read_text())["records"]
    old_tp = {r["model"]: r["tp"] for r in old if "tp" in r}
    data = {"env": _env(args), "records": [r for r in old if r["model"] not in set(names)]}
    lock = threading.Lock()
    options = ["--seed", str(args.seed), "--rtol", str(args.rtol), "--tp-time-limit", str(args.tp_time_limit),
               "--localise-s", str(args.localise_s)] + (["--fxprune-only"] if args.fxprune_only else [])

    def done(i: int, rec: dict) -> None:
        rec.setdefault("set", set_of(rec["model"]))
        if args.fxprune_only:
            rec["tp"] = old_tp.get(rec["model"], {"verdict": NOT_RUN, "error": "model new since the last full run"})
            rec["tp_kept"] = True
        if rec.get("tp", {}).get("verdict") == "pending":  # timed out during Torch-Pruning's turn
            rec["tp"] = {"verdict": "error", "error": rec.get("timeout", "timeout")}
        for tool in ("fxprune", "tp"):  # a worker that died before printing a record
            rec.setdefault(tool, {"verdict": rec.get("verdict", "error"), "error": rec.get("error", "")})
        print(f"[{i + 1}/{len(names)}] {rec['model']}: fxprune {_verdict_text(rec['fxprune'], 150)} | "
              f"TP {_verdict_text(rec['tp'], 150)} ({rec.get('total_s', 0):.0f}s)", file=sys.stderr, flush=True)
        with lock:
            data["records"].append(rec)
            data["summary"] = {s: summarize([r for r in data["records"] if r["set"] == s]) for s in SETS}
            json_path.write_text(json.dumps(data, indent=1))
            md_path.write_text(render(data))

    t0 = time.perf_counter()
    run_many(names, lambda n: run_worker(Path(__file__).resolve(), n, options, args.timeout), args.jobs, done)
    print(render(data))
    print(f"\n{len(names)} models in {time.perf_counter() - t0:.0f}s; wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
