"""Slim HuggingFace models: ``fxprune.hf.to_pretrained``, ``save_pretrained``/``from_pretrained``
without fxprune, greedy ``generate`` with the key/value cache; decoders compiled with their
default ``use_cache=True``.

Every model is a small config with random weights in float64 (nothing downloaded). The slim
model is half of every prunable head and MLP group removed (exact): the HuggingFace model
must give the slim GraphModule's logits (relative difference <= 1e-10), and its greedy
``generate`` the full model's 20 new tokens. One subprocess, whose import system cannot find
fxprune, loads every saved directory with ``AutoModelForCausalLM.from_pretrained``.
"""
from __future__ import annotations

import json
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
    elif name == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                             bos_token_id=0, eos_token_id=1, pad_token_id=1))
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
# what half of every head and MLP group gives in each config: (field, value)
EXPECTED = {"llama": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 48},
            "qwen2": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 48},
            "mistral": {"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 48},
            "gpt2": {"n_head": 4, "n_inner": 128}}  # heads padded back: GPT2Config ties head width to n_head

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
        _zero(prog, lambda g: g.size // 2)
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
    """The slim HuggingFace model has the slim widths in its config, the slim GraphModule's
    logits, and greedy ``generate`` (key/value cache) gives the full model's 20 new tokens;
    saved and loaded back without fxprune, it gives the same logits and tokens."""
    made, loaded, caught, ids = round_trips
    m = made[name]
    hf, model, slim = m["hf"], m["model"], m["slim"]
    assert type(hf) is type(model)
    for field, value in EXPECTED[name].items():
        assert getattr(hf.config, field) == value, (field, getattr(hf.config, field))
    assert count_params(hf) < count_params(model)
    want = _logits(slim, ids)
    assert _rel(want, hf(ids).logits.detach()) <= 1e-10
    prompt = ids[:1, :5]
    tokens = _greedy(hf, prompt)
    assert tokens.shape[1] == 5 + NEW_TOKENS
    assert torch.equal(tokens, _greedy(model, prompt)), "greedy tokens differ from the full model's"
    back = loaded[name]
    assert back["class"] == type(model).__name__ and not back["fxprune_loaded"]
    assert _rel(want, back["logits"]) <= 1e-10
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
    _zero(prog, lambda g: g.size // 2)
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
    _zero(prog, lambda g: g.size // 2 if layer(g) == 0 else g.size // 4)  # layer 0: 1 kv head, 48; layer 1: 2, 72
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


def test_hidden_size_from_the_slim_widths(tmp_path):
    """Residual-stream channels (normalised by RMSNorm, so inexact here) removed with
    ``allow_inexact=True``: the config's ``hidden_size`` comes from the slim weights, and the
    HuggingFace model equals the slim GraphModule (not the full model: the norms now average
    over fewer channels). With the cache, ``generate`` gives the tokens of a decode that
    recomputes every step; saved and loaded back, the same logits."""
    from transformers import AutoModelForCausalLM

    model = _decoder("llama")
    ids = _ids()
    prog = fxprune.compile(model, (ids,), allow_inexact=True)
    residual = [g for g in prog.prunable_groups if not g.exact]
    assert len(residual) == 1 and residual[0].size == 64
    keep = torch.ones(64, dtype=torch.bool)
    keep[::4] = False
    prog.zero_({residual[0].id: keep})
    slim = prog.construct_subnet(verify=False)
    hf = fxhf.to_pretrained(prog, slim)
    assert hf.config.hidden_size == 48 and hf.config.head_dim == 16 and hf.config.num_attention_heads == 4
    assert hf.model.norm.weight.shape == (48,)
    assert _rel(_logits(slim, ids), hf(ids).logits.detach()) <= 1e-10
    prompt = ids[:1, :5]
    assert torch.equal(_greedy(hf, prompt), _greedy(hf, prompt, cache=False))
    hf.save_pretrained(str(tmp_path))
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64).eval()
    assert back.config.hidden_size == 48
    assert _rel(_logits(slim, ids), back(ids).logits.detach()) <= 1e-10


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
    _zero(prog, lambda g: g.size // 2)
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
    and the config is left as it was; head and MLP groups are prunable and exact."""
    model = _decoder("opt")
    assert model.config.use_cache is True
    ids = _ids()
    prog = fxprune.compile(model, (ids,))
    assert model.config.use_cache is True
    assert len([g for g in prog.prunable_groups if g.exact]) == 4, prog.summary()
    _zero(prog, lambda g: g.size // 2)
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
