"""Transformers through fxprune: torchvision ViT / Swin / MaxViT / ConvNeXt, timm families,
HuggingFace.

For every model of ``benchmarks/transformers_sweep.py`` (its list, builders and group
classifier; random weights, never downloaded):

* equivalence (``fxprune.testing.check_equivalence``): float64, eval mode, 30-50% of every
  prunable exact group zeroed (residual streams included), slim model vs zeroed full model,
  relative difference <= 1e-6, and the slim model strictly smaller;
* the groups: attention-head groups and MLP (hidden-width) groups are found and prunable
  where the architecture has them; every frozen or inexact group says why;
* residual-stream groups (the channels of a stream normalised across channels by a LayerNorm /
  RMSNorm / GroupNorm, owning the norm's affine parameters and the layers that write the
  stream) are exact and prunable by default: a removed channel is exactly zero in the stream,
  and the slim normalisation divides by the full model's channel count. Half of every
  residual group alone is removed, and the slim model is smaller, its norms half as wide, and
  equal to the zeroed full model. A model whose residual groups stay inexact must be listed in
  :data:`STILL_INEXACT` with the reason (none is, at present);
* grouped-query attention (HuggingFace Llama, 4 query / 2 key-value heads): a head group is a
  key/value head together with the query heads that share it.

Models are built as the sweep builds them, except torchvision's two ViT-L, which are built with 8
of their 24 layers (``Spec.light``) to fit a shared machine's memory.

The fast tier (timm vit / deit / swin tiny, HuggingFace BERT / GPT-2 / Llama / Qwen2 / Mistral /
ViT / T5 / CLIP vision small configs) runs by default; every other model is ``slow``:
``pytest -m slow tests/test_transformers.py``.
"""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import transformers_sweep as sweep  # noqa: E402  (model list, builders, group classifier)
import fxprune  # noqa: E402
from fxprune.program import max_output_difference  # noqa: E402
from fxprune.report import count_params  # noqa: E402
from fxprune.testing import check_equivalence, randomize_norms  # noqa: E402

RTOL = 1e-6

PARAMS = [pytest.param(name, id=name, marks=() if spec.fast else pytest.mark.slow)
          for name, spec in sweep.MODELS.items()]
# architectures with a residual stream normalised across channels (LeViT, say, normalises with
# BatchNorm only)
RESIDUAL = [p for p in PARAMS if sweep.MODELS[p.values[0]].residual]
# model -> pattern of the reason why its residual-stream groups are still inexact, where the math
# says they are (e.g. a norm written out by hand as (x - x.mean(-1)) / ..., whose x - mean makes
# a removed channel data-dependent); every other residual group must be exact and prunable
STILL_INEXACT: dict = {}


def _kinds(prog, model):
    kinds = sweep.classify(prog, model)
    by_kind = {}
    for g in prog.groups:
        by_kind.setdefault(kinds[g.id], []).append(g)
    return kinds, by_kind


def _describe(prog, kinds) -> str:
    return "\n".join(f"  [{kinds[g.id]}] {g!r}" for g in prog.groups)


@pytest.mark.parametrize("name", PARAMS)
def test_equivalence_and_groups(name, record_property):
    spec = sweep.MODELS[name]
    model, inputs = spec.build_light()
    res = check_equivalence(model, inputs, seed=0, frac=(0.3, 0.5), dtype=torch.float64, rtol=RTOL)
    prog = res.prog
    kinds, by_kind = _kinds(prog, model)
    listing = _describe(prog, kinds)
    counts = {k: len(v) for k, v in by_kind.items()}
    record_property("group_kinds", counts)
    record_property("frontend", sweep.frontend_of(prog))

    assert prog.groups, f"{name}: no groups found"
    assert res.max_rel_diff <= RTOL
    for g in prog.groups:
        if not (g.prunable and g.exact):
            assert g.reason, f"{name}: group {g.id} is frozen or inexact without a reason: {g!r}"

    exact = [g for g in prog.groups if g.prunable and g.exact]
    assert exact, f"{name}: no prunable exact group:\n{listing}"
    assert res.zeroed_channels > 0
    assert res.params_slim < res.params_full

    if spec.heads:
        heads = [g for g in by_kind.get("head", []) if g.prunable and g.exact]
        assert heads, f"{name}: no prunable attention-head group:\n{listing}"
    if spec.mlp:
        mlps = [g for g in by_kind.get("mlp", []) if g.prunable and g.exact]
        assert mlps, f"{name}: no prunable MLP group:\n{listing}"
    for g in by_kind.get("residual", []):
        if not (g.prunable and g.exact):
            pattern = STILL_INEXACT.get(name)
            assert pattern and not g.exact and re.search(pattern, g.reason), (
                f"{name}: residual-stream group not prunable and exact: {g!r}")
    if spec.residual:
        assert by_kind.get("residual"), f"{name}: no residual-stream group found:\n{listing}"


@pytest.mark.parametrize("name", [p for p in RESIDUAL if p.values[0] not in STILL_INEXACT])
def test_residual_stream_exact(name, record_property):
    """Half of every residual-stream group removed, and nothing else: the slim model equals the
    zeroed full one (float64, <= 1e-6 relative), is smaller, and every normalisation's affine
    parameters of a residual group keep exactly the channels left."""
    model, inputs = sweep.MODELS[name].build_light()
    full = copy.deepcopy(model).double().eval()
    randomize_norms(full, 0)
    x = tuple(t.double() if t.is_floating_point() else t for t in inputs)

    prog = fxprune.compile(full, x)
    kinds, by_kind = _kinds(prog, model)
    residual = by_kind.get("residual", [])
    assert residual, f"{name}: no residual-stream group:\n{_describe(prog, kinds)}"
    assert all(g.prunable and g.exact for g in residual), _describe(prog, kinds)
    masks = sweep.zero_half(prog, [g.id for g in residual])
    assert masks, f"{name}: every residual group has a single channel"
    prog.zero_(masks)
    slim = prog.construct_subnet(verify=False)
    diff, scale = max_output_difference(prog.module, slim, prog.example_inputs)
    rel = diff / scale if scale else diff
    record_property("residual_rel_diff", rel)
    assert rel <= RTOL, f"{name}: residual streams halved: relative difference {rel:.3e}"
    assert count_params(slim) < count_params(prog.module)

    norms = sweep.norm_params(model)
    full_params, slim_params = dict(prog.module.named_parameters()), dict(slim.named_parameters())
    checked = 0
    for g in residual:
        if g.id not in masks:
            continue
        removed = ~torch.as_tensor(masks[g.id])
        for sl in g.slices:
            if sl.param in norms and sl.param in slim_params:
                want = full_params[sl.param].shape[sl.dim] - int(removed[sl.channel].sum())
                assert slim_params[sl.param].shape[sl.dim] == want, (
                    f"{name}: {sl.param} has {slim_params[sl.param].shape[sl.dim]} channels, {want} kept")
                checked += 1
    assert checked, f"{name}: no normalisation parameter of a residual group found in the slim model"


def test_llama_grouped_query_heads():
    """Each head group of a GQA Llama owns one key/value head and its n_rep query heads: the
    rows of k_proj/v_proj of that head, the rows of q_proj of its query heads and the matching
    columns of o_proj; removing one drops 1 of 2 kv heads and 2 of 4 query heads."""
    model, inputs = sweep.MODELS["hf/llama"].build()
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    res = check_equivalence(model, inputs, seed=0, rtol=RTOL)
    prog = res.prog
    kinds, by_kind = _kinds(prog, model)
    heads = by_kind.get("head", [])
    assert len(heads) == cfg.num_hidden_layers, _describe(prog, kinds)
    for g in heads:
        assert g.prunable and g.exact and g.size == cfg.num_key_value_heads, repr(g)
        layer = re.search(r"layers\.(\d+)\.", g.params[0]).group(1)
        rows = {s.param.rsplit(".", 2)[-2]: s for s in g.slices}
        assert set(rows) == {"q_proj", "k_proj", "v_proj"}, repr(g)
        for c in range(g.size):
            assert sorted(rows["k_proj"].indices_of(c).tolist()) == list(range(c * d, (c + 1) * d))
            assert sorted(rows["v_proj"].indices_of(c).tolist()) == list(range(c * d, (c + 1) * d))
            assert sorted(rows["q_proj"].indices_of(c).tolist()) == list(range(c * n_rep * d, (c + 1) * n_rep * d))
        cols = [s for s in g.dependents if s.param.endswith(f"layers.{layer}.self_attn.o_proj.weight")]
        assert cols and cols[0].dim == 1 and len(cols[0].index) == cfg.num_attention_heads * d, repr(g)
    layer0 = res.slim.get_submodule("model.layers.0.self_attn")
    widths = {n: layer0.get_submodule(n).weight.shape for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert widths["k_proj"][0] == widths["v_proj"][0] == d * (cfg.num_key_value_heads - 1), widths
    assert widths["q_proj"][0] == widths["o_proj"][1] == d * n_rep * (cfg.num_key_value_heads - 1), widths


@pytest.mark.parametrize("name", ["hf/gpt2", pytest.param("hf/llama_eager", marks=pytest.mark.slow)])
def test_export_assertions_have_no_channel_effect(name):
    """``torch.export`` leaves dtype/shape checks in the graph (``aten._assert_tensor_metadata``):
    they read no values, so they freeze nothing and every head group stays prunable."""
    model, inputs = sweep.MODELS[name].build_light()
    res = check_equivalence(model, inputs, seed=0, rtol=RTOL)
    prog = res.prog
    asserts = [n for n in prog.module.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default]
    assert asserts, f"{name}: the export graph holds no _assert_tensor_metadata node"
    assert all(n.meta["fxprune.op"] == "assertion" for n in asserts)
    for g in prog.groups:
        assert "op without channel semantics" not in (g.reason or ""), repr(g)
    kinds, by_kind = _kinds(prog, model)
    heads = by_kind.get("head", [])
    assert heads and all(g.prunable and g.exact for g in heads), _describe(prog, kinds)
    assert res.params_slim < res.params_full


# model -> (parameter whose dim holds one row per head, that dim): attention that needs a per-head
# bias or scale sliced with its head, einsum, a normalisation over the head width, or torchvision
# Swin's fx-wrapped window attention (traced through by torch.export)
HEAD_OWNED = {
    "timm/levit_128s": ("attention_biases", 0),  # biases[:, idx] added to the scores
    "timm/efficientformer_l1": ("attention_biases", 0),
    "timm/swinv2_tiny_window8_256": ("logit_scale", 0),  # cosine attention: F.normalize(q), F.normalize(k)
    "hf/t5_encoder": ("relative_attention_bias.weight", 1),  # position bias as SDPA's attn_mask
    "tv/maxvit_t": ("relative_position_bias_table", 1),  # torch.einsum scores; table[idx] gathered on dim 0
    "tv/swin_t": ("relative_position_bias_table", 1),
    "tv/swin_v2_t": ("logit_scale", 0),
}
HEAD_FAST = {"timm/levit_128s", "timm/swinv2_tiny_window8_256", "hf/t5_encoder"}


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=() if n in HEAD_FAST else pytest.mark.slow)
                                  for n in HEAD_OWNED])
def test_head_groups_own_their_bias(name):
    """Every attention-head group is prunable and exact, owns its rows of the per-head bias or
    scale, and removing heads shrinks the model (float64 equivalence)."""
    model, inputs = sweep.MODELS[name].build_light()
    res = check_equivalence(model, inputs, seed=0, frac=(0.3, 0.5), rtol=RTOL)
    prog = res.prog
    kinds, by_kind = _kinds(prog, model)
    heads = by_kind.get("head", [])
    assert heads, f"{name}: no attention-head group:\n{_describe(prog, kinds)}"
    suffix, dim = HEAD_OWNED[name]
    for g in heads:
        assert g.prunable and g.exact, f"{name}: {g!r}"
        owned = [s for s in g.slices if s.param.endswith(suffix) and s.dim == dim]
        assert owned and all(set(s.channel.tolist()) == set(range(g.size)) for s in owned), (
            f"{name}: not every head owns rows of {suffix}: {g!r}")
    if name.startswith("tv/swin"):
        assert sweep.frontend_of(prog) == "export"
    assert res.params_slim < res.params_full


def _zero_per_group(prog, model, count):
    """Zero ``count(group)`` leading channels of every prunable group but the residual streams
    (``model``: the model compiled); returns the slim model. The configs tested here are those
    of fewer heads and narrower MLPs; the hidden size (RMS norms rescaled, LayerNorms reported)
    has tests of its own in test_hf.py."""
    kinds = sweep.classify(prog, model)
    masks = {}
    for g in prog.groups:
        if g.prunable and kinds[g.id] != "residual":
            keep = torch.ones(g.size, dtype=torch.bool)
            keep[:count(g)] = False
            masks[g.id] = keep
    prog.zero_(masks)
    return prog.construct_subnet()


def test_hf_config_rebuilds_the_slim_llama():
    """Half of every head and MLP group removed: the written config (fewer query and kv heads,
    narrower MLP) builds a LlamaForCausalLM that takes the slim weights as they are and gives
    the slim GraphModule's logits."""
    from transformers import LlamaForCausalLM

    model, inputs = sweep.MODELS["hf/llama"].build()
    model = model.double()
    prog = fxprune.compile(model, inputs)
    slim = _zero_per_group(prog, model, lambda g: g.size // 2)
    res = fxprune.hf_config(model, slim)
    cfg = model.config
    assert res.homogeneous, res.explain()
    assert res.changed == {"num_attention_heads": (cfg.num_attention_heads, cfg.num_attention_heads // 2),
                           "num_key_value_heads": (cfg.num_key_value_heads, cfg.num_key_value_heads // 2),
                           "intermediate_size": (cfg.intermediate_size, cfg.intermediate_size // 2)}
    assert res.config.head_dim == cfg.head_dim and model.config.num_attention_heads == cfg.num_attention_heads
    rebuilt = LlamaForCausalLM(res.config).double().eval()
    missing, unexpected = rebuilt.load_state_dict(slim.state_dict(), strict=False)
    assert not missing, missing
    with torch.no_grad():
        want = slim(*inputs)
        got = rebuilt(*inputs).logits
    want = want.logits if hasattr(want, "logits") else torch.utils._pytree.tree_leaves(want)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_hf_config_saves_config_json(tmp_path):
    from transformers import AutoConfig

    model, inputs = sweep.MODELS["hf/t5_encoder"].build()
    prog = fxprune.compile(model, inputs)
    slim = _zero_per_group(prog, model, lambda g: g.size // 2)
    res = fxprune.hf_config(model, slim)  # the T5 encoder sits under a task head: prefix "encoder."
    assert res.prefix == "encoder." and res.homogeneous, res.explain()
    assert set(res.changed) == {"num_heads", "d_ff"}
    path = res.save(str(tmp_path))
    loaded = AutoConfig.from_pretrained(str(tmp_path))
    assert path.endswith("config.json") and loaded.num_heads == 2 and loaded.d_ff == 64


def test_hf_config_reports_what_no_config_can_say():
    """Layers that keep different head counts have no single ``num_attention_heads``; BERT's
    head count also sets its head width, so pruned heads at a fixed width have no config at
    all. Both are reported, never written."""
    model, inputs = sweep.MODELS["hf/llama"].build()
    prog = fxprune.compile(model, inputs)
    layer_of = lambda g: int(re.search(r"layers\.(\d+)\.", g.params[0]).group(1))
    heads = [g for g in prog.groups if g.prunable and any("k_proj" in p for p in g.params)]
    uneven = {g.id: layer_of(g) for g in heads}
    slim = _zero_per_group(prog, model, lambda g: uneven.get(g.id, 0))  # layer 0 keeps 2 kv heads, layer 1 one
    res = fxprune.hf_config(model, slim)
    assert not res.homogeneous, res.explain()
    assert res.heterogeneous == {"num_attention_heads": [2, 4], "num_key_value_heads": [1, 2]}, res.explain()
    with pytest.raises(fxprune.UnsupportedInputError, match="differs across layers"):
        res.save("/nonexistent")

    model, inputs = sweep.MODELS["hf/bert"].build()
    prog = fxprune.compile(model, inputs)
    res = fxprune.hf_config(model, _zero_per_group(prog, model, lambda g: g.size // 2))
    assert res.config is None and res.changed["intermediate_size"] == (128, 64)
    assert any(k.endswith("attention.self.query.weight") for k in res.mismatched), res.explain()
