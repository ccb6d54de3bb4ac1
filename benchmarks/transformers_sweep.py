"""Transformer sweep: torchvision, timm and HuggingFace attention models through fxprune.

For every model of :data:`MODELS` (torchvision ViT / Swin v1, v2 / MaxViT / ConvNeXt; timm vit,
deit, swin, convnext, convnext v2, poolformer, levit, efficientformer, mobilevit, beit, eva,
coat, cait; HuggingFace BERT, GPT-2, Llama, Qwen2 and Mistral with grouped-query attention, ViT,
T5 encoder, CLIP vision built from small configs), in its own process, float64, eval mode:

* ``fxprune.compile`` (``frontend="auto"``: symbolic tracing, ``torch.export`` when tracing
  fails) and the groups it finds, sorted into attention-head groups, MLP (hidden-width)
  groups, residual-stream groups (the channels of a stream normalised across channels by a
  LayerNorm / RMSNorm / GroupNorm: exact, since the slim normalisation keeps the full model's
  channel count) and the rest (see :func:`classify`);
* the equivalence check of ``fxprune.testing.check_equivalence`` (30-50% of every prunable
  exact group, residual streams included, zeroed; slim vs zeroed full, relative difference
  <= 1e-6);
* parameters cut when a random 50% of every prunable exact group is zeroed;
* only where some groups are still inexact: with ``allow_inexact=True``, 50% of every inexact
  group zeroed as well, and the measured output difference of the slim model (it is not
  expected to be zero).

Verdicts: **exact**: some exact group is prunable and the check passes; **inexact**: no
prunable exact group, but inexact ones exist; **frozen**: nothing prunable even with
``allow_inexact``; **error**: an exception or a failed check (the message says which).

Usage::

    python benchmarks/transformers_sweep.py               # every model
    python benchmarks/transformers_sweep.py --models timm/vit_tiny_patch16_224 hf/llama
    python benchmarks/transformers_sweep.py --render benchmarks/results/transformers.json

Prints a Markdown table and writes benchmarks/results/transformers.md and .json.
No weights are downloaded: every model is built with random weights from its constructor
or a small config.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

RTOL = 1e-6


# ------------------------------------------------------------------------------- models


@dataclass
class Spec:
    """How to build one model and what its groups should look like.

    Attributes:
        name: ``source/model`` (``tv/``, ``timm/``, ``hf/``).
        build: ``() -> (model, example_inputs)``, random weights, eval mode.
        heads: attention-head groups are expected to be found and prunable.
        mlp: MLP (hidden-width) groups are expected to be found and prunable.
        residual: the model has a residual stream normalised across channels (a LayerNorm,
            RMSNorm or GroupNorm with affine parameters): its groups are expected to be
            found, exact and prunable.
        fast: part of the fast test tier.
        note: how the model differs from the named one (image size, depth), if it does.
        light: a smaller build of the same layers for the test suite, where the model itself
            needs more memory than a shared test machine has (the sweep builds the model).
    """

    name: str
    build: Callable[[], Tuple[nn.Module, tuple]]
    heads: bool = True
    mlp: bool = True
    residual: bool = True
    fast: bool = False
    note: str = ""
    light: Optional[Callable[[], Tuple[nn.Module, tuple]]] = None

    def build_light(self) -> Tuple[nn.Module, tuple]:
        return (self.light or self.build)()


@torch.no_grad()
def _fill_zero_params(model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw all-zero parameters (zero-initialised heads, biases, layer scales) from N(0, 0.02^2):
    a zero head makes the output identically zero and proves nothing."""
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        if p.is_floating_point() and p.numel() and not p.any():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
    return model


def _image(side: int, seed: int = 0) -> tuple:
    return (torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(seed)),)


def _tokens(n: int = 8, vocab: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


# torchvision: the zoo's builders (benchmarks/_models.py), where image sizes are documented.
def _tv(name: str) -> Callable:
    def build():
        import _models

        return _models.build(name, seed=0), _models.example_inputs(name, seed=0)

    return build


_TV_VIT = {"vit_l_16": (16, 16, 1024, 4096), "vit_l_32": (32, 16, 1024, 4096), "vit_h_14": (14, 16, 1280, 5120)}


def _tv_vit_layers(name: str, num_layers: int, side: int) -> Callable:
    """A large torchvision ViT (patch, heads, width and MLP width of ``name``) with fewer encoder
    layers, every one of them the named model's layer: vit_h_14 has 632M parameters, and a
    float64 copy plus its slim model would take some 10 GB."""
    def build():
        from torchvision.models.vision_transformer import VisionTransformer

        patch, heads, hidden, mlp = _TV_VIT[name]
        torch.manual_seed(0)
        m = VisionTransformer(image_size=side, patch_size=patch, num_layers=num_layers, num_heads=heads,
                              hidden_dim=hidden, mlp_dim=mlp)
        return _fill_zero_params(m).eval(), _image(side)

    return build


def _timm(name: str, side: int, **kwargs) -> Callable:
    def build():
        import timm

        torch.manual_seed(0)
        kw = dict(pretrained=False, num_classes=10, **kwargs)
        if side:
            kw.setdefault("img_size", side)
        m = timm.create_model(name, **kw)
        return _fill_zero_params(m).eval(), _image(side or 224)

    return build


class SequenceHead(nn.Module):
    """An encoder (HuggingFace, returning ``last_hidden_state``) with a linear head on the first
    token: a task head, so that the residual stream does not reach the model output."""

    def __init__(self, encoder: nn.Module, width: int, classes: int = 4):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, classes)

    def forward(self, input_ids):
        return self.head(self.encoder(input_ids=input_ids).last_hidden_state[:, 0])


def _hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=3)
    m = BertForSequenceClassification(cfg)
    return _fill_zero_params(m).eval(), (_tokens(),)


def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4, use_cache=False)
    m = GPT2LMHeadModel(cfg)
    return _fill_zero_params(m).eval(), (_tokens(),)


def decoder_config(family: str = "Llama", **overrides):
    """A small config of a HuggingFace decoder family (``"Llama"``, ``"Qwen2"``, ``"Mistral"``:
    the class ``{family}Config``): 2 layers, width 64, 4 query / 2 key-value heads of width 16,
    MLP width 96, vocabulary 96, untied output head."""
    import transformers

    cfg = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, use_cache=False, tie_word_embeddings=False)
    cfg.update(overrides)
    return getattr(transformers, f"{family}Config")(**cfg)


def llama_config(**overrides):
    return decoder_config("Llama", **overrides)


def _hf_decoder(family: str, attn: Optional[str] = None) -> Callable:
    """``{family}ForCausalLM`` from :func:`decoder_config` (``attn``: the attention implementation,
    default sdpa)."""
    def build():
        import transformers

        torch.manual_seed(0)
        cfg = decoder_config(family)
        if attn:
            cfg._attn_implementation = attn
        m = getattr(transformers, f"{family}ForCausalLM")(cfg)
        return _fill_zero_params(m).eval(), (_tokens(),)

    return build


def _hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, num_labels=5)
    m = ViTForImageClassification(cfg)
    return _fill_zero_params(m).eval(), _image(32)


class PooledHead(nn.Module):
    """A vision encoder (HuggingFace, returning ``pooler_output``) with a linear head: a task
    head, so that the residual stream (``last_hidden_state``) does not reach the model output."""

    def __init__(self, encoder: nn.Module, width: int, classes: int = 4):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, classes)

    def forward(self, pixel_values):
        return self.head(self.encoder(pixel_values=pixel_values).pooler_output)


def _hf_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, projection_dim=32)
    m = PooledHead(CLIPVisionModel(cfg), 64)
    return _fill_zero_params(m).eval(), _image(32)


def _hf_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=96, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2, use_cache=False,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)
    m = SequenceHead(T5EncoderModel(cfg), 64)
    return _fill_zero_params(m).eval(), (_tokens(),)


def _specs() -> List[Spec]:
    s: List[Spec] = []
    # torchvision: the zoo's builders and inputs (ViT and Swin at 64x64, MaxViT at 224x224)
    for name in ("vit_b_16", "vit_b_32"):
        s.append(Spec(f"tv/{name}", _tv(name)))
    # the test suite builds the two ViT-L with 8 of their 24 layers (peak memory ~8 GB -> ~3 GB)
    s.append(Spec("tv/vit_l_16", _tv("vit_l_16"), light=_tv_vit_layers("vit_l_16", 8, 64)))
    s.append(Spec("tv/vit_l_32", _tv("vit_l_32"), light=_tv_vit_layers("vit_l_32", 8, 64)))
    s.append(Spec("tv/vit_h_14", _tv_vit_layers("vit_h_14", 4, 28), note="4 of its 32 layers, 28x28"))
    for name in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b"):
        s.append(Spec(f"tv/{name}", _tv(name), note="64x64"))
    s.append(Spec("tv/maxvit_t", _tv("maxvit_t"), note="224x224"))
    s.append(Spec("tv/convnext_tiny", _tv("convnext_tiny"), heads=False, note="64x64"))
    # timm
    s += [
        Spec("timm/vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", 32), fast=True, note="32x32"),
        Spec("timm/deit_tiny_patch16_224", _timm("deit_tiny_patch16_224", 32), fast=True, note="32x32"),
        Spec("timm/deit_tiny_distilled_patch16_224", _timm("deit_tiny_distilled_patch16_224", 32), note="32x32"),
        Spec("timm/swin_tiny_patch4_window7_224", _timm("swin_tiny_patch4_window7_224", 64, window_size=4),
             fast=True, note="64x64, window 4"),
        Spec("timm/swinv2_tiny_window8_256", _timm("swinv2_tiny_window8_256", 64, window_size=4),
             note="64x64, window 4"),
        Spec("timm/convnext_atto", _timm("convnext_atto", 0), heads=False, note="224x224"),
        Spec("timm/convnext_tiny", _timm("convnext_tiny", 0), heads=False, note="224x224"),
        # global response normalisation (GRN): an L2 norm over space, divided by its mean over channels
        Spec("timm/convnextv2_atto", _timm("convnextv2_atto", 0), heads=False, note="224x224"),
        # GroupNorm with one group over the stream: a channel-mixing norm with per-channel affine parameters
        Spec("timm/poolformer_s12", _timm("poolformer_s12", 0), heads=False, note="224x224"),
        Spec("timm/poolformerv2_s12", _timm("poolformerv2_s12", 0), heads=False, note="224x224"),
        # BatchNorm only: the residual stream is not normalised across channels
        Spec("timm/levit_128s", _timm("levit_128s", 64), residual=False, note="64x64"),
        Spec("timm/efficientformer_l1", _timm("efficientformer_l1", 0), note="224x224"),
        Spec("timm/mobilevit_xxs", _timm("mobilevit_xxs", 64), note="64x64"),
        Spec("timm/beit_base_patch16_224", _timm("beit_base_patch16_224", 32, embed_dim=192, depth=4, num_heads=3),
             note="tiny width (192, 3 heads, 4 layers), 32x32"),
        Spec("timm/eva02_tiny_patch14_224", _timm("eva02_tiny_patch14_224", 28), note="28x28"),
        Spec("timm/coat_lite_tiny", _timm("coat_lite_tiny", 64), note="64x64"),
        Spec("timm/coat_tiny", _timm("coat_tiny", 64), note="64x64"),
        Spec("timm/cait_xxs24_224", _timm("cait_xxs24_224", 32), note="32x32"),
    ]
    # HuggingFace transformers, small configs
    s += [
        Spec("hf/bert", _hf_bert, fast=True, note="BertForSequenceClassification, 2x64, 4 heads"),
        Spec("hf/gpt2", _hf_gpt2, fast=True, note="GPT2LMHeadModel, 2x64, 4 heads"),
        Spec("hf/llama", _hf_decoder("Llama"), fast=True, note="LlamaForCausalLM, 2x64, 4 q / 2 kv heads (sdpa)"),
        Spec("hf/llama_eager", _hf_decoder("Llama", "eager"), note="as hf/llama, eager attention"),
        Spec("hf/qwen2", _hf_decoder("Qwen2"), fast=True, note="Qwen2ForCausalLM, 2x64, 4 q / 2 kv heads (sdpa)"),
        Spec("hf/mistral", _hf_decoder("Mistral"), fast=True, note="MistralForCausalLM, 2x64, 4 q / 2 kv heads (sdpa)"),
        Spec("hf/vit", _hf_vit, fast=True, note="ViTForImageClassification, 2x64, 4 heads, 32x32"),
        Spec("hf/t5_encoder", _hf_t5, fast=True, note="T5EncoderModel 2x64, 4 heads, + linear head"),
        Spec("hf/clip_vision", _hf_clip_vision, fast=True,
             note="CLIPVisionModel 2x64, 4 heads, 32x32, + linear head on the pooled output"),
    ]
    return s


MODELS: Dict[str, Spec] = {sp.name: sp for sp in _specs()}
FAST = [n for n, sp in MODELS.items() if sp.fast]


# ------------------------------------------------------------------------------- group kinds

_NORM_CLASS = re.compile(r"LayerNorm|RMSNorm|RmsNorm|GroupNorm")
# parameters of attention modules, by the names torchvision, timm and HuggingFace give them
_MLP_PATH = re.compile(r"(^|\.)(mlp|ffn|feed_forward|intermediate)(\.|$)", re.I)
_ATTN_PATH = re.compile(r"(^|\.)(attn|attention|self_attn|selfattention|factoratt_crpe)(\.|$)", re.I)


def frontend_of(prog) -> str:
    """``"export"`` when the graph is made of ATen overloads (torch.export), else ``"fx"``, with
    the classes of the modules kept opaque that are not torch.nn's own (e.g. timm's
    non-traceable ones, which the symbolic tracer falls back to keeping as leaves)."""
    from fxprune.passes.trace import training_dependent_modules

    nodes = prog.module.graph.nodes
    if any(isinstance(n.target, torch._ops.OpOverload) for n in nodes):
        return "export"
    mods = [prog.module.get_submodule(n.target) for n in nodes if n.op == "call_module"]
    opaque = sorted({type(m).__name__ for m in mods if not type(m).__module__.startswith("torch.")
                     and not isinstance(m, training_dependent_modules())})
    return "fx" + (f" (leaves: {', '.join(opaque)})" if opaque else "")


def norm_params(model: nn.Module) -> set:
    """Names of the parameters of the normalisations that mix channels (LayerNorm, RMSNorm,
    GroupNorm and their subclasses, by class name for HuggingFace's own); not BatchNorm."""
    out = set()
    for mname, m in model.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or _NORM_CLASS.search(type(m).__name__):
            out |= {f"{mname}.{p}" if mname else p for p, _ in m.named_parameters(recurse=False)}
    return out


def classify(prog, model: nn.Module) -> Dict[int, str]:
    """Sort the groups of a program by what they prune (``model``: the model compiled, for the
    classes of its modules; the program's parameter names are the model's).

    * ``"residual"``: the channels of a normalised stream: owning both a channel-mixing norm's
      affine parameters and those of the layers that write the stream (exact: the slim norm
      keeps the full channel count); or, without such parameters, made inexact by a
      normalisation over them (a norm without affine parameters, a hand-written one);
    * ``"head"``: attention heads: each channel owns a block of several output rows (or columns,
      for GPT-2's transposed ``Conv1D``) of a projection weight, head_dim of each of q/k/v;
    * ``"mlp"``: one output row per channel of a linear (or 1x1 convolution) weight outside an
      attention module: the hidden width of a feed-forward block, a pooler (or two rows of a
      gated MLP packed in one weight, under an ``mlp``/``ffn`` path);
    * ``"conv"``: channels of a spatial (k x k, k > 1) convolution;
    * ``"output"``: frozen because it reaches the model output;
    * ``"other"``: anything else (position tables, vocabulary rows, a norm's parameters alone).
    """
    norms = norm_params(model)
    shapes = {n: tuple(p.shape) for n, p in list(prog.module.named_parameters()) + list(prog.module.named_buffers())}
    kinds = {}
    for g in prog.groups:
        reason = (g.reason or "").lower()
        params = set(g.params)
        normed = params & norms
        if (normed and params - normed) or (not g.exact and re.search(r"norm|over channels", reason)):
            kinds[g.id] = "residual" if g.size > 1 else "other"
            continue
        if normed:
            kinds[g.id] = "other"  # a norm's own parameters only (e.g. over a flattened patch)
            continue
        if not g.prunable and "model output" in reason:
            kinds[g.id] = "output"
            continue
        if "embedding rows" in reason:
            kinds[g.id] = "other"  # a vocabulary / position table's rows
            continue
        per_channel, spatial = [], False
        for sl in g.slices:
            shape = shapes.get(sl.param, ())
            if len(shape) < 2 or not sl.param.endswith("weight"):
                continue  # projections only: not position tables, tokens or layer scales
            per_channel.append(int(torch.bincount(sl.channel, minlength=g.size).max()))
            spatial |= len(shape) > 2 and any(k > 1 for k in shape[2:])
        if not per_channel or g.size < 2:
            kinds[g.id] = "other"
        elif max(per_channel) > 1 and all(_MLP_PATH.search(p) for p in params):
            kinds[g.id] = "mlp"  # a gated MLP packed in one weight (SwiGLU): gate and value rows
        elif max(per_channel) > 1:
            kinds[g.id] = "head"
        elif any(_ATTN_PATH.search(p) for p in params):
            kinds[g.id] = "other"  # one row per channel inside attention: q/k/v split apart, head mixing
        else:
            kinds[g.id] = "conv" if spatial else "mlp"
    return kinds


# ------------------------------------------------------------------------------- one model


def zero_half(prog, group_ids, seed: int = 0):
    """Keep-masks dropping a random half of each of the given groups (those of size >= 2)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    masks = {}
    for gid in group_ids:
        g = prog.groups[gid]
        if g.size < 2:
            continue
        keep = np.ones(g.size, bool)
        keep[rng.choice(g.size, g.size // 2, replace=False)] = False
        masks[gid] = keep
    return masks


def analyse(name: str, *, inexact: bool = True, seed: int = 0) -> dict:
    """Everything the sweep reports about one model (raises on a failed equivalence check)."""
    import copy

    import fxprune
    from fxprune.program import max_output_difference
    from fxprune.report import count_params
    from fxprune.testing import check_equivalence, randomize_norms

    spec = MODELS[name]
    rec: dict = {"model": name, "note": spec.note}
    t0 = time.perf_counter()
    model, inputs = spec.build()
    rec["build_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    res = check_equivalence(model, inputs, seed=seed, rtol=RTOL)
    rec["check_s"] = time.perf_counter() - t0
    prog = res.prog
    kinds = classify(prog, model)
    rec["frontend"] = frontend_of(prog)
    rec["nodes"] = len(prog.module.graph.nodes)
    rec["groups"] = len(prog.groups)
    rec["max_rel_diff"] = res.max_rel_diff
    count = Counter()
    for g in prog.groups:
        k = kinds[g.id]
        if g.prunable and g.exact:
            count[f"{k}_prunable"] += 1
        count[k] += 1
    rec["head_groups"] = count["head"]
    rec["head_groups_prunable"] = count["head_prunable"]
    rec["mlp_groups"] = count["mlp"]
    rec["mlp_groups_prunable"] = count["mlp_prunable"]
    rec["residual_groups"] = count["residual"]
    rec["residual_groups_prunable"] = count["residual_prunable"]
    rec["prunable_exact"] = sum(g.prunable and g.exact for g in prog.groups)
    rec["inexact"] = sum(not g.exact for g in prog.groups)
    rec["frozen"] = sum(not g.prunable for g in prog.groups)
    rec["group_details"] = [{"id": g.id, "size": g.size, "kind": kinds[g.id], "prunable": g.prunable,
                             "exact": g.exact, "reason": g.reason, "params": g.params[:6]} for g in prog.groups]
    del res, prog  # the float64 copies: the large ViTs need the memory for the next steps
    gc.collect()

    # parameters cut at 50% of every prunable exact group (float64 copy of the model)
    full = copy.deepcopy(model).double().eval()
    randomize_norms(full, seed)
    x64 = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    p50 = fxprune.compile(full, x64)
    p50.zero_(zero_half(p50, [g.id for g in p50.groups if g.prunable and g.exact], seed))
    slim = p50.construct_subnet(verify=False)
    pf, ps = count_params(p50.module), count_params(slim)
    diff, scale = max_output_difference(p50.module, slim, p50.example_inputs)
    rec["params_full"], rec["params_slim"] = pf, ps
    rec["params_cut"] = 1 - ps / pf
    rec["half_rel_diff"] = diff / scale if scale else diff
    del p50, slim
    gc.collect()
    if rec["model"].startswith("hf/"):
        # the config of the heads and MLPs cut, the residual stream kept: a stock HuggingFace norm
        # of a narrower stream would divide by the slim width, the slim model's by the full one
        full = copy.deepcopy(model).double().eval()  # compile shares the parameters: p50 zeroed them
        randomize_norms(full, seed)
        pcfg = fxprune.compile(full, x64)
        k3 = classify(pcfg, model)
        pcfg.zero_(zero_half(pcfg, [g.id for g in pcfg.groups if g.prunable and g.exact and k3[g.id] != "residual"],
                             seed))
        hf = fxprune.hf_config(full, pcfg.construct_subnet(verify=False))
        rec["hf_config"] = {"homogeneous": hf.homogeneous, "changed": {k: list(v) for k, v in hf.changed.items()},
                            "explain": hf.explain()}
        del pcfg
    del full
    gc.collect()

    # only where groups are still inexact: with allow_inexact they become prunable; zero half of them too
    if inexact and rec["inexact"]:
        try:
            full = copy.deepcopy(model).double().eval()
            randomize_norms(full, seed)
            pin = fxprune.compile(full, x64, allow_inexact=True)
            loose_ids = [g.id for g in pin.groups if g.prunable and not g.exact]
            rec["inexact_prunable"] = len(loose_ids)
            pin.zero_(zero_half(pin, loose_ids, seed))
            slim = pin.construct_subnet(verify=False)
            diff, scale = max_output_difference(pin.module, slim, pin.example_inputs)
            rec["inexact_params_slim"] = count_params(slim)
            rec["inexact_rel_diff"] = diff / scale if scale else diff
        except Exception as exc:  # reported, not fatal: the exact path is the contract
            rec["inexact_error"] = f"{type(exc).__name__}: {_short(str(exc), 400)}"
    rec["verdict"] = _verdict(rec)
    return rec


def _verdict(rec: dict) -> str:
    if rec["prunable_exact"]:
        return "exact"
    if rec["inexact"]:
        return "inexact"
    return "frozen"


def _short(text: str, n: int = 120) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


_KIND_ORDER = {"head": 0, "mlp": 1, "residual": 2, "conv": 3, "other": 4, "output": 5}


def normalize_reason(reason: str) -> str:
    """A reason without node names and source locations: ``(node 'add_3' (call_function
    _operator.add) at /x.py:12)`` -> ``(_operator.add)``."""
    r = re.sub(r" at /[^\s)]+", "", reason or "(no reason)")
    r = re.sub(r" \(node '[^']*' \(call_module [^()]*\)\)", "", r)
    r = re.sub(r" \(node '[^']*' \((?:call_function|call_method|output) ([^()]*)\)\)", r" (\1)", r)
    r = r.replace("torch._ops.aten.", "aten.")
    r = re.sub(r"\(function ([^()]*)\) \(\1\)", r"(function \1)", r)
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'…'", r))


def _reason_of(rec: dict) -> str:
    """The most common reasons why groups are frozen or inexact, by kind of group."""
    if rec["verdict"] == "error":
        return _short(rec.get("error", ""), 300)
    reasons = Counter()
    for g in rec.get("group_details", []):
        if not (g["prunable"] and g["exact"]) and g["kind"] != "output":
            reasons[(g["kind"], normalize_reason(g["reason"]))] += 1
    items = sorted(reasons.items(), key=lambda kv: (_KIND_ORDER.get(kv[0][0], 9), -kv[1]))
    parts = [f"{kind} {n}x: {_short(r, 110)}" for (kind, r), n in items[:3]]
    if len(items) > 3:
        parts.append(f"+{len(items) - 3} more")
    return "; ".join(parts)


def run_one(name: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "verdict": "error", "error": f"timeout after {timeout:.0f}s", "total_s": timeout}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-4:]
        rec = {"model": name, "verdict": "error", "error": " | ".join(tail) or f"exit {proc.returncode}"}
    else:
        rec = json.loads(lines[-1])
    rec["total_s"] = time.perf_counter() - t0
    return rec


def worker(name: str) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    try:
        return analyse(name)
    except Exception as exc:
        import traceback

        tb = traceback.extract_tb(exc.__traceback__)
        where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        return {"model": name, "note": MODELS[name].note, "verdict": "error",
                "error": f"{type(exc).__name__}: {_short(str(exc), 1500)}{where}"}


# ------------------------------------------------------------------------------- report


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _e(x) -> str:
    return "" if x is None else f"{x:.1e}"


def markdown(records: List[dict]) -> str:
    head = ("| model | frontend | groups | head groups | MLP groups | residual groups | frozen | inexact | "
            "params cut @50% | max rel diff | allow_inexact: rel diff | verdict | why groups are frozen / inexact |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        name = r["model"] + (f" ({r['note']})" if r.get("note") else "")
        loose = _e(r.get("inexact_rel_diff"))
        if r.get("inexact_error"):
            loose = "error: " + _short(r["inexact_error"], 90)
        lines.append(
            f"| {name} | {r.get('frontend', '')} | {r.get('groups', '')} | "
            f"{_ratio(r, 'head_groups')} | {_ratio(r, 'mlp_groups')} | {_ratio(r, 'residual_groups')} | "
            f"{r.get('frozen', '')} | {r.get('inexact', '')} | {_pct(r.get('params_cut'))} | "
            f"{_e(r.get('max_rel_diff'))} | "
            f"{loose} | {r['verdict']} | {_reason_of(r)} |")
    counts = Counter(r["verdict"] for r in records)
    lines += ["", "Verdicts: " + ", ".join(f"{k} {counts.get(k, 0)}" for k in ("exact", "inexact", "frozen", "error"))
              + f" (of {len(records)})"]
    return "\n".join(lines)


def hf_config_table(records: List[dict]) -> str:
    lines = ["| model | config written | fields changed | why not |", "|---|---|---|---|"]
    for r in records:
        hf = r.get("hf_config")
        if hf is None:
            continue
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in hf["changed"].items())
        why = "" if hf["homogeneous"] else _short(hf["explain"], 160)
        lines.append(f"| {r['model']} | {'yes' if hf['homogeneous'] else 'no'} | {changed} | {why} |")
    return "\n".join(lines)


def _ratio(r: dict, key: str) -> str:
    if key not in r:
        return ""
    return f"{r[key + '_prunable']}/{r[key]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="default: every model of MODELS")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--list", action="store_true", help="print the model names and exit")
    ap.add_argument("--render", metavar="JSON", help="only rewrite transformers.md from a transformers.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the records of the other models of an existing transformers.json (re-run some)")
    ap.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.list:
        print("\n".join(MODELS))
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    if args.render:
        data = json.loads(Path(args.render).read_text())
        print(write_markdown(data["records"], data["env"], Path(args.out) / "transformers.md"))
        return 0

    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models: {unknown}")
    t0 = time.perf_counter()
    records = []
    for i, name in enumerate(names):
        r = run_one(name, args.timeout)
        records.append(r)
        msg = r.get("error", "") if r["verdict"] == "error" else ""
        print(f"[{i + 1}/{len(names)}] {name}: {r['verdict']} ({r.get('total_s', 0):.1f}s) {_short(msg, 300)}",
              file=sys.stderr, flush=True)
    import timm
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "transformers": transformers.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
           "threads": int(os.environ.get("BENCH_THREADS", "1")), "wall_s": time.perf_counter() - t0,
           "loadavg_end": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge and (out / "transformers.json").exists():
        old = {r["model"]: r for r in json.loads((out / "transformers.json").read_text())["records"]}
        old.update({r["model"]: r for r in records})
        records = [old[n] for n in MODELS if n in old]
    (out / "transformers.json").write_text(json.dumps({"env": env, "rtol": RTOL, "records": records}, indent=1))
    print(write_markdown(records, env, out / "transformers.md"))
    return 0


def reason_table(records: List[dict]) -> str:
    """Every distinct reason (node names and locations blanked) why a group is frozen or inexact,
    by kind of group, with the models it occurs in."""
    buckets: Dict[tuple, dict] = {}
    for r in records:
        for g in r.get("group_details", []):
            if (g["prunable"] and g["exact"]) or g["kind"] == "output":
                continue
            state = ", ".join(w for w, on in (("frozen", not g["prunable"]), ("inexact", not g["exact"])) if on)
            key = (g["kind"], state, normalize_reason(g["reason"]))
            b = buckets.setdefault(key, {"groups": 0, "models": []})
            b["groups"] += 1
            if r["model"] not in b["models"]:
                b["models"].append(r["model"])
    lines = ["| group kind | state | reason | groups | models |", "|---|---|---|---|---|"]
    for (kind, state, reason), b in sorted(buckets.items(), key=lambda kv: (_KIND_ORDER.get(kv[0][0], 9),
                                                                            -len(kv[1]["models"]), -kv[1]["groups"])):
        lines.append(f"| {kind} | {state} | {_short(reason, 220)} | {b['groups']} | {', '.join(b['models'])} |")
    errors = [r for r in records if r["verdict"] == "error" or r.get("inexact_error")]
    if errors:
        lines += ["", "Errors:", ""]
        for r in errors:
            if r["verdict"] == "error":
                lines.append(f"- **{r['model']}**: {_short(r.get('error', ''), 600)}")
            if r.get("inexact_error"):
                lines.append(f"- **{r['model']}** with `allow_inexact=True`: {_short(r['inexact_error'], 600)}")
    return "\n".join(lines)


def write_markdown(records: List[dict], env: dict, path: Path) -> str:
    table = markdown(records)
    md = ["# Transformer sweep", "",
          "Generated by `python benchmarks/transformers_sweep.py` (float64, eval mode, random weights, "
          f"torch {env['torch']}, timm {env['timm']}, transformers {env['transformers']}).", "",
          "Columns: *frontend*: the graph `fxprune.compile(frontend=\"auto\")` built (symbolic tracing, "
          "with the non-torch modules it kept opaque, or `torch.export`); *head groups* / *MLP groups*: "
          "prunable and exact / found (see `classify`); *residual groups*: groups of a residual stream "
          "normalised across channels (LayerNorm, RMSNorm, GroupNorm), prunable and exact / found: the slim "
          "normalisation keeps the full model's channel count; *frozen*: groups not prunable by default; "
          "*inexact*: groups whose removal would change the output; "
          "*params cut @50%*: a random half of every prunable exact group (residual streams included) zeroed "
          "and removed; *max rel diff*: `fxprune.testing.check_equivalence` (30-50% zeroed, must be <= 1e-6); "
          "*allow_inexact: rel diff*: only for models with inexact groups, half of each of them zeroed as well, "
          "slim vs zeroed full (measured, not expected to be zero); *verdict*: exact (some group is prunable "
          "and exact, and the check passes), inexact "
          "(only inexact groups), frozen (nothing prunable), error.", "", table, "",
          "## Why groups are frozen or inexact", "", reason_table(records), "",
          "## HuggingFace configs after the 50% cut of heads and MLPs", "",
          "`fxprune.hf_config(model, slim)`: the config whose class rebuilds every slim parameter shape "
          "(written with `.save(directory)`), or why none does; for a slim model of half of every head and "
          "MLP group, the residual stream kept (its slim norms keep the full model's channel count, which no "
          "stock HuggingFace norm of a narrower stream does).", "", hf_config_table(records), ""]
    path.write_text("\n".join(md))
    return table


if __name__ == "__main__":
    sys.exit(main())
