"""Slim HuggingFace models: ``fxprune.hf.to_pretrained``, ``save_pretrained``/``from_pretrained``
without fxprune, greedy ``generate`` with the key/value cache; decoders compiled with their
default ``use_cache=True``.

Every model is a small config with random weights in float64 (nothing downloaded). The slim
model is half of every prunable head and MLP group removed (exact), and for the RMSNorm models
(Llama, Qwen2, Mistral) 24 of the 64 hidden-size (residual-stream) channels too: the
HuggingFace model must give the slim GraphModule's logits (relative difference <= 1e-10; <= 1e-6
with a smaller hidden size, whose rescaled RMSNorm weights and eps round in the float32 that
the class normalises in), and its greedy ``generate`` the full model's 20 new tokens. One
subprocess, whose import system cannot find fxprune, loads every saved directory with
``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fxprune
import fxprune.hf as fxhf
from fxprune.report import count_params

NEW_TOKENS = 20
VOCAB = 96
HIDDEN, HIDDEN_CUT = 64, 24  # residual channels of the test decoders, and how many the RMSNorm ones lose
RMS = ("llama", "qwen2", "mistral")


def _decoder(name: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    if name == "llama":
        m = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif name == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif name == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None))
    elif name == "qwen3":
        m = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=16))
    elif name in ("gpt2", "gpt2_untied"):
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                             bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                             tie_word_embeddings=name == "gpt2"))
    elif name == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                                           bos_token_id=0, eos_token_id=1, pad_token_id=1))
    else:
        raise ValueError(name)
    with torch.no_grad():  # non-trivial norms and biases, so that nothing hides behind ones and zeros
        g = torch.Generator().manual_seed(1)
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in n or "ln" in n else 0.0))
    return m.double().eval()


def _ids(batch=2, length=12, seed=0):
    return torch.randint(2, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _zero(prog, count):
    """Zero ``count(group)`` leading channels of every prunable group."""
    masks = {}
    for g in prog.prunable_groups:
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[:count(g)] = False
        masks[g.id] = keep
    prog.zero_(masks)


def _is_hidden(g) -> bool:
    """The residual-stream (hidden-size) group: it owns the norms' weights."""
    return g.size == HIDDEN and any(re.search(r"norm|\bln_", p) for p in g.params)


def _heads_mlp(count):
    """``count`` for head and MLP groups, none of the hidden size."""
    return lambda g: 0 if _is_hidden(g) else count(g)


def _cut(name):
    """Half of every head and MLP group; HIDDEN_CUT hidden channels of the RMSNorm models.
    (GPT-2's tied embedding is, as a producer of the residual stream, not zeroed with the hidden
    group, which makes that group inexact; the LayerNorm hidden size is tested on its own.)"""
    return lambda g: (HIDDEN_CUT if name in RMS else 0) if _is_hidden(g) else g.size // 2


def _greedy(model, prompt, cache=True):
    return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                          use_cache=cache)


def _logits(module, ids):
    with torch.no_grad():
        out = module(ids)
    return out["logits"] if isinstance(out, dict) or hasattr(out, "logits") else out


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


# ----------------------------------------------------------------------------------------------
# round trips: Llama (GQA), Qwen2, Mistral, GPT-2, with one subprocess that loads them all


ROUND_TRIP = ("llama", "qwen2", "mistral", "gpt2")
# what _cut gives in each config: (field, value); the RMSNorm eps grows by D / D'
_SLIM_RMS = {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 48, "head_dim": 16,
             "hidden_size": HIDDEN - HIDDEN_CUT, "rms_norm_eps": 1e-6 * HIDDEN / (HIDDEN - HIDDEN_CUT)}
EXPECTED = {"llama": _SLIM_RMS, "qwen2": _SLIM_RMS, "mistral": _SLIM_RMS,
            "gpt2": {"n_head": 4, "n_inner": 128, "n_embd": 64}}  # heads padded back: GPT2Config ties head width to n_head

LOADER = textwrap.dedent("""
    import importlib.util, json, os, sys
    # no fxprune: drop the editable-install finders and every path entry that holds the package
    sys.meta_path[:] = [f for f in sys.meta_path if "fxprune" not in (getattr(f, "__module__", "") + repr(f))]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "fxprune" not in repr(h)]
    sys.path[:] = [p for p in sys.path if not os.path.exists(os.path.join(p or os.getcwd(), "fxprune"))]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("fxprune") is None, "fxprune is importable"
    import torch
    from transformers import AutoModelForCausalLM
    task = json.load(open(sys.argv[1]))
    out = {}
    for name, d in task["dirs"].items():
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
        ids = torch.tensor(task["ids"])
        with torch.no_grad():
            logits = m(ids).logits
        gen = m.generate(ids[:1, :5], max_new_tokens=task["n"], min_new_tokens=task["n"], do_sample=False)
        out[name] = {"class": type(m).__name__, "logits": logits, "tokens": gen,
                     "fxprune_loaded": any(k.split(".")[0] == "fxprune" for k in sys.modules)}
    torch.save(out, task["out"])
""")


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """For each model: full model, Program, slim GraphModule, HuggingFace model, saved dir; and
    what the fxprune-free subprocess read back from every dir."""
    root = tmp_path_factory.mktemp("hf")
    ids = _ids()
    made, caught = {}, {}
    for name in ROUND_TRIP:
        model = _decoder(name)
        prog = fxprune.compile(model, (ids,))
        _zero(prog, _cut(name))
        slim = prog.construct_subnet()
        if name == "gpt2":
            with pytest.raises(fxprune.UnsupportedInputError) as info:
                fxhf.to_pretrained(prog, slim)
            caught[name] = str(info.value)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                hf = fxhf.to_pretrained(prog, slim, pad=True)
            caught[name + "/warning"] = " ".join(str(x.message) for x in w)
        else:
            hf = fxhf.to_pretrained(prog, slim)
        d = str(root / name)
        hf.save_pretrained(d)
        made[name] = dict(model=model, prog=prog, slim=slim, hf=hf, dir=d)
    task = {"dirs": {n: v["dir"] for n, v in made.items()}, "ids": ids.tolist(), "n": NEW_TOKENS,
            "out": str(root / "loaded.pt")}
    (root / "task.json").write_text(json.dumps(task))
    proc = subprocess.run([sys.executable, "-c", LOADER, str(root / "task.json")], cwd=str(root),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(task["out"], weights_only=True)
    return made, loaded, caught, ids


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_round_trip(round_trips, name):
    """The slim HuggingFace model has the slim widths in its config, the slim GraphModule's and
    the zeroed full model's logits, and greedy ``generate`` (key/value cache) gives the full
    model's 20 new tokens; saved and loaded back without fxprune, it gives the same logits and
    tokens. With a smaller hidden size (Llama, Qwen2, Mistral) the class's RMSNorms over D'
    channels, weights times sqrt(D/D') and eps times D/D', compute the slim model's full-count
    norms; they normalise in float32, where the rescaled values round: 1e-6, not 1e-10."""
    made, loaded, caught, ids = round_trips
    m = made[name]
    hf, model, slim = m["hf"], m["model"], m["slim"]
    tol = 1e-6 if name in RMS else 1e-10
    assert type(hf) is type(model)
    for field, value in EXPECTED[name].items():
        assert getattr(hf.config, field) == value, (field, getattr(hf.config, field))
    assert count_params(hf) < count_params(model)
    want = _logits(slim, ids)
    got = hf(ids).logits.detach()
    assert _rel(want, got) <= tol
    assert _rel(_logits(model, ids), got) <= tol
    prompt = ids[:1, :5]
    tokens = _greedy(hf, prompt)
    assert tokens.shape[1] == 5 + NEW_TOKENS
    assert torch.equal(tokens, _greedy(model, prompt)), "greedy tokens differ from the full model's"
    back = loaded[name]
    assert back["class"] == type(model).__name__ and not back["fxprune_loaded"]
    assert _rel(got, back["logits"]) <= 1e-12  # the same class, config and weights
    assert torch.equal(back["tokens"], tokens)


def test_gpt2_heads_need_padding(round_trips):
    """GPT2Config's head count also sets the head width (and transformers 5 has no
    ``pruned_heads``): heads pruned at a fixed width are refused with the reason; ``pad=True``
    puts the zero heads back and keeps the narrower MLP."""
    made, _, caught, _ = round_trips
    assert "no GPT2Config" in caught["gpt2"] and "c_attn" in caught["gpt2"] and "pad=True" in caught["gpt2"]
    assert "zero channels put back" in caught["gpt2/warning"]
    hf = made["gpt2"]["hf"]
    assert hf.transformer.h[0].attn.c_attn.weight.shape == (64, 192)
    assert hf.transformer.h[0].mlp.c_fc.weight.shape == (64, 128)


def test_float32_tolerance_and_meta_device():
    """float32: within 1e-5 of the slim GraphModule. On the meta device the same call builds
    the slim class with no weights (no check can run there), with the same config."""
    model = _decoder("llama").float()
    ids = _ids()
    prog = fxprune.compile(model, (ids,))
    _zero(prog, _cut("llama"))
    slim = prog.construct_subnet()
    hf = fxhf.to_pretrained(prog, slim)
    assert next(hf.parameters()).dtype == torch.float32
    assert fxhf.check_outputs(slim, hf, (ids,)) <= 1e-5
    meta = fxhf.to_pretrained(model.to("meta"), slim.to("meta"))
    assert all(p.is_meta for p in meta.parameters())
    assert meta.config.to_dict() == {**hf.config.to_dict()}
    assert count_params(meta) == count_params(hf)


def test_heterogeneous_widths():
    """Layers that keep different head counts and MLP widths have no config: the error names
    the fields and says how to get homogeneous widths; ``pad=True`` fills every layer up to
    the widest with zero channels, exactly."""
    model = _decoder("llama")
    ids = _ids()
    prog = fxprune.compile(model, (ids,))
    layer = lambda g: int(re.search(r"layers\.(\d+)\.", g.params[0]).group(1))
    _zero(prog, _heads_mlp(lambda g: g.size // 2 if layer(g) == 0 else g.size // 4))  # layer 0: 1 kv head, 48; layer 1: 2, 72
    slim = prog.construct_subnet()
    with pytest.raises(fxprune.UnsupportedInputError, match="differs across layers") as info:
        fxhf.to_pretrained(prog, slim)
    assert "uniform partition" in str(info.value) and "intermediate_size" in str(info.value)
    with pytest.warns(UserWarning, match="zero channels put back"):
        hf = fxhf.to_pretrained(prog, slim, pad=True)
    assert (hf.config.num_key_value_heads, hf.config.intermediate_size) == (2, 72)
    prompt = ids[:1, :5]
    assert torch.equal(_greedy(hf, prompt), _greedy(model, prompt))
    with pytest.raises(fxprune.UnsupportedInputError, match="needs the Program"):
        fxhf.to_pretrained(model, slim, pad=True)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hidden_size_rms_identity(round_trips, name):
    """The hidden size went from D = 64 to D' = 40: ``hf_config`` writes ``hidden_size`` 40 and
    ``rms_norm_eps`` times D/D', and ``param_scales`` multiplies exactly the RMSNorm weights over
    the hidden size (every layer's two and the final one) by sqrt(D/D'); the HuggingFace model
    holds them so scaled and every other tensor as the slim GraphModule has it."""
    made, _, _, _ = round_trips
    model, slim, hf = made[name]["model"], made[name]["slim"], made[name]["hf"]
    res = fxprune.hf_config(model, slim)
    full, kept = HIDDEN, HIDDEN - HIDDEN_CUT
    assert res.changed["hidden_size"] == (full, kept)
    assert res.changed["rms_norm_eps"] == (1e-6, 1e-6 * full / kept)
    norms = {f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert set(res.param_scales) == norms | {"model.norm.weight"}
    assert set(res.param_scales.values()) == {math.sqrt(full / kept)}
    assert res.norm_dtype == torch.float32 and not res.unexpressible
    state = slim.state_dict()
    for key, value in hf.state_dict().items():
        factor = res.param_scales.get(key, 1.0)
        assert torch.equal(value, state[key] * factor if factor != 1.0 else state[key]), key
    assert hf.model.norm.weight.shape == (kept,) and hf.model.embed_tokens.weight.shape == (VOCAB, kept)


def test_qk_norms_sharing_the_eps_are_reported():
    """Qwen3 normalises queries and keys per head with the same ``rms_norm_eps`` as its norms
    over the hidden size: no eps keeps both exact at a smaller hidden size, so the config is
    not written (the per-head norms are not rescaled either); ``pad=True`` puts the hidden
    channels back and keeps the narrower heads and MLP."""
    model = _decoder("qwen3")
    ids = _ids()
    prog = fxprune.compile(model, (ids,))
    _zero(prog, _cut("llama"))
    slim = prog.construct_subnet()
    res = fxprune.hf_config(model, slim)
    assert res.config is None and not res.param_scales
    assert "q_norm" in res.unexpressible["hidden_size"] and "rms_norm_eps also sets" in res.explain()
    with pytest.raises(fxprune.UnsupportedInputError, match="only RMS norms have an identity"):
        fxhf.to_pretrained(prog, slim)
    with pytest.warns(UserWarning, match="zero channels put back"):
        hf = fxhf.to_pretrained(prog, slim, pad=True)
    assert (hf.config.hidden_size, hf.config.num_key_value_heads, hf.config.intermediate_size) == (64, 1, 48)
    assert hf.config.rms_norm_eps == 1e-6
    assert _rel(_logits(model, ids), hf(ids).logits.detach()) <= 1e-10


def _layernorm_models():
    import transformers as tf

    torch.manual_seed(0)
    bert = tf.BertForSequenceClassification(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=3)).double().eval()
    return {"gpt2": _decoder("gpt2_untied"), "bert": bert}


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_layernorm_hidden_size_is_reported(name):
    """GPT-2's and BERT's residual stream runs through LayerNorm, which subtracts the mean: no
    width and eps of the class give the slim model's full-count statistics. 16 of the 64
    residual channels, one of the 4 heads and a quarter of the MLP removed (exact in the slim
    GraphModule; the classes' head width hidden / heads stays 16 and GPT-2's MLP width
    4 * n_embd fits, so every shape has a config):
    ``hf_config`` writes no config and names the LayerNorms; ``to_pretrained`` refuses with the
    reason, and ``pad=True`` puts the channels back, exactly."""
    model = _layernorm_models()[name]
    ids = _ids()
    prog = fxprune.compile(model, (ids,))
    hidden = [g for g in prog.prunable_groups if _is_hidden(g) or any("LayerNorm" in p for p in g.params)]
    assert len(hidden) == 1 and hidden[0].size == HIDDEN and hidden[0].exact
    _zero(prog, lambda g: 16 if g is hidden[0] else 1 if g.size == 4 else g.size // 4)
    slim = prog.construct_subnet()
    field = "n_embd" if name == "gpt2" else "hidden_size"
    res = fxprune.hf_config(model, slim)
    assert res.config is None and not res.mismatched and not res.heterogeneous, res.explain()
    assert res.changed[field] == (HIDDEN, 48)
    assert res.unexpressible and all("LayerNorm" in why and "subtracts the mean" in why
                                     for why in res.unexpressible.values()), res.unexpressible
    assert any(re.search(r"ln_1|attention\.output\.LayerNorm", k) for k in res.unexpressible), res.unexpressible
    with pytest.raises(fxprune.UnsupportedInputError, match="normalises over the"):
        res.save("/nonexistent")
    with pytest.raises(fxprune.UnsupportedInputError, match="only RMS norms have an identity"):
        fxhf.to_pretrained(prog, slim)
    with pytest.warns(UserWarning, match="zero channels put back"):
        hf = fxhf.to_pretrained(prog, slim, pad=True)
    assert getattr(hf.config, field) == HIDDEN
    assert _rel(_logits(model, ids), hf(ids).logits.detach()) <= 1e-10


def test_weights_named_in_a_wrapper_are_refused_clearly():
    """Without the Program, a wrapped model's outputs are not the HuggingFace model's: the
    check says so instead of comparing the wrong tensors."""
    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.lm = m

        def forward(self, ids):
            return self.lm(ids).logits.mean(-1)

    model = Wrap(_decoder("llama"))
    ids = _ids()
    prog = fxprune.compile(model, (ids,))
    _zero(prog, _heads_mlp(lambda g: 0 if any(p.endswith("lm_head.weight") for p in g.params) else g.size // 2))
    slim = prog.construct_subnet()
    with pytest.raises(fxprune.UnsupportedInputError, match="sits at 'lm'"):
        fxhf.to_pretrained(prog, slim)
    hf = fxhf.to_pretrained(prog, slim, verify=False)
    assert hf.config.intermediate_size == 48


# ----------------------------------------------------------------------------------------------
# decoders as users load them: use_cache=True


def test_compile_decoder_with_default_cache():
    """OPT (and every HF decoder) is built with ``use_cache=True``, which returns a
    ``DynamicCache`` that torch.export refuses in an output: the export runs without the cache
    and the config is left as it was; head and MLP groups are prunable and exact (the hidden
    size, under LayerNorm and a tied embedding, is tested elsewhere)."""
    model = _decoder("opt")
    assert model.config.use_cache is True
    ids = _ids()
    prog = fxprune.compile(model, (ids,))
    assert model.config.use_cache is True
    assert len([g for g in prog.prunable_groups if g.exact and not _is_hidden(g)]) == 4, prog.summary()
    _zero(prog, _heads_mlp(lambda g: g.size // 2))
    with pytest.warns(UserWarning, match="zero channels put back"):  # OPT's head width is hidden / heads
        hf = fxhf.to_pretrained(prog, pad=True)
    assert (hf.config.num_attention_heads, hf.config.ffn_dim) == (4, 64)
    prompt = ids[:1, :5]
    assert torch.equal(_greedy(hf, prompt), _greedy(model, prompt))


def test_error_of_the_front_end_that_came_closest():
    """Both front ends fail on a model that returns the cache itself; the error leads with
    torch.export's, which traced every module before failing at the output."""
    class ReturnsCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(ids, use_cache=True).past_key_values

    with pytest.raises(fxprune.TraceError) as info:
        fxprune.compile(ReturnsCache(_decoder("opt")), (_ids(),))
    msg = str(info.value)
    assert msg.startswith("torch.export cannot export") and "ReturnsCache" in msg.splitlines()[0] and "DynamicCache" in msg.splitlines()[0]
    assert "The torch.fx front end failed too" in msg
    assert info.value.modules_done > 10


# ----------------------------------------------------------------------------------------------
# the language-model job with the hidden size pruned


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lm_job_prunes_the_hidden_size(tmp_path, tied):
    """``fxprune train --task causal-lm`` (tiny settings, 8 steps; the embedding tied to the
    output layer, as by default, or not: ``--untie-embeddings``) prunes half of the hidden size
    with the heads and MLP channels: the slim config has hidden_size 16 of 32 and rms_norm_eps
    times 2, the slim HuggingFace model's perplexity equals the full model's, the saved
    directory reloads with the slim GraphModule's logits and generates the full model's greedy
    tokens."""
    from transformers import AutoModelForCausalLM

    from fxprune import cli

    out = str(tmp_path / "run")
    tiny = ["--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--intermediate", "48",
            "--vocab-size", "300", "--corpus-bytes", "100000", "--seq-len", "32", "--batch-size", "4",
            "--val-tokens", "256", "--sample-tokens", "8", "--no-progress", "--max-tokens", "1024"]
    untie = [] if tied else ["--untie-embeddings"]
    assert cli.main(["train", "--task", "causal-lm", "--out", out, *untie, *tiny]) == 0
    rep = json.load(open(os.path.join(out, "report.json")))
    assert rep["config"]["tie_embeddings"] is tied
    slim_cfg = rep["config_slim"]
    assert slim_cfg["hidden_size"] == 16 and slim_cfg["rms_norm_eps"] == 1e-6 * 32 / 16
    assert (slim_cfg["num_attention_heads"], slim_cfg["num_key_value_heads"], slim_cfg["intermediate_size"]) == (2, 1, 24)
    assert rep["perplexity"]["equal"] and not rep["padded"] and rep["sample"]["slim_equals_full"]
    assert rep["reload_relative_difference"] <= 1e-5
    back = AutoModelForCausalLM.from_pretrained(rep["hf_dir"]).eval()
    assert back.config.hidden_size == 16 and back.model.norm.weight.shape == (16,)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) is tied
    assert rep["params"]["slim"] < rep["params"]["full"] / 2
