"""The language-model job: corpus and tokenizer are deterministic, batches are a function of the
step, and ``fxprune train --task causal-lm`` (tiny settings, a few steps) writes a slim
HuggingFace directory whose perplexity equals the full model's; resumed and ``--init-from``
runs behave as documented."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fxprune import cli
from fxprune.lm import data as lm_data
from fxprune.lm import train as lm_train
from fxprune.lm.corpus import stdlib_corpus
from fxprune.lm.tokenizer import EOS, encode_files, tokenizer_sha256, train_tokenizer

TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2", "--intermediate", "48",
        "--vocab-size", "300", "--corpus-bytes", "100000", "--seq-len", "32", "--batch-size", "4",
        "--val-tokens", "256", "--sample-tokens", "8", "--no-progress"]
TINY_TOKENS = ["--max-tokens", "1024"]  # 8 steps


def _train(*args) -> int:
    return cli.main(["train", "--task", "causal-lm", *args])


def test_corpus_selection_is_fixed():
    """Same selection and hash twice; the split is by file, test suites and installed
    packages are left out, the validation share follows the fraction."""
    a, b = stdlib_corpus(300_000), stdlib_corpus(300_000)
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    assert [p for p, _ in a.train] == [p for p, _ in b.train]
    train, val = {p for p, _ in a.train}, {p for p, _ in a.validation}
    assert train and val and not train & val
    assert not any(part in ("test", "tests", "site-packages") for p in train | val for part in p.split("/"))
    assert a.train_bytes + a.validation_bytes >= 300_000
    assert stdlib_corpus(600_000).sha256 != a.sha256
    more_val = stdlib_corpus(300_000, val_fraction=0.5)
    assert {p for p, _ in more_val.train} | {p for p, _ in more_val.validation} == train | val
    assert len(more_val.validation) > len(a.validation)


def test_tokenizer_is_deterministic_and_lossless():
    corpus = stdlib_corpus(100_000)
    texts = [t for _, t in corpus.train]
    tok = train_tokenizer(texts, 300)
    assert tokenizer_sha256(tok) == tokenizer_sha256(train_tokenizer(texts, 300))
    assert tok.get_vocab_size() == 300 and tok.token_to_id(EOS) == 0
    text = corpus.validation[0][1]
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    stream = encode_files(tok, [t for _, t in corpus.validation])
    assert stream.count(0) == len(corpus.validation) and stream[-1] == 0


def test_batches_are_a_function_of_the_step():
    n, batch = 10, 4
    full = lm_data.StepBatches(n, batch, seed=3, start=0, stop=6)
    steps = list(full)
    assert list(lm_data.StepBatches(n, batch, seed=3, start=4, stop=6)) == steps[4:]
    # every pass visits every window once, in a new order
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]
    ranks = [lm_data.StepBatches(n, batch, seed=3, start=0, stop=6, rank=r, world_size=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == steps
    windows = lm_data.Windows(torch.arange(100), 32)
    assert len(windows) == 3 and windows[1].tolist() == list(range(32, 65))
    with pytest.raises(ValueError, match="divisible"):
        lm_data.StepBatches(n, 3, 0, 0, 1, world_size=2)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    dense, pruned = str(root / "dense"), str(root / "pruned")
    assert _train("--out", dense, *TINY, *TINY_TOKENS, "--target-group-sparsity", "0") == 0
    assert _train("--out", pruned, *TINY, *TINY_TOKENS, "--checkpoint-every", "3") == 0
    return root, dense, pruned


def test_train_writes_a_slim_hf_model(tiny_runs):
    """Perplexity of the slim HuggingFace model equals the full model's; the directory loads
    with AutoModelForCausalLM and AutoTokenizer and gives the report's perplexity; the report
    has the figures it promises."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out = tiny_runs
    rep = json.load(open(os.path.join(out, "report.json")))
    ppl = rep["perplexity"]
    assert ppl["equal"] and ppl["relative_difference"] <= 1e-5 and ppl["validation_tokens"] == 256
    assert rep["config_slim"]["num_attention_heads"] == 2 and rep["config_slim"]["num_key_value_heads"] == 1
    assert rep["config_slim"]["intermediate_size"] == 24 and rep["group_sparsity"] == 0.5
    assert rep["params"]["slim"] < rep["params"]["full"]
    assert rep["flops_per_token"]["slim"] < rep["flops_per_token"]["full"]
    assert rep["tokens_seen"] == 1024 and rep["steps"] == 8 and not rep["padded"]
    assert rep["corpus"]["sha256"] == stdlib_corpus(100_000).sha256 and rep["python"]
    assert rep["wall_time_s"]["train"] > 0 and rep["cpu_time_s"]["train"] > 0
    assert rep["sample"]["slim_equals_full"] and open(os.path.join(out, "sample.txt")).read() == rep["sample"]["text"]
    model = AutoModelForCausalLM.from_pretrained(rep["hf_dir"]).eval()
    tok = AutoTokenizer.from_pretrained(rep["hf_dir"])
    assert model.config.intermediate_size == 24 and tok.convert_tokens_to_ids(EOS) == 0
    data = lm_data.build_data(100_000, 0.1, 300, open(os.path.join(rep["hf_dir"], "tokenizer.json")).read())
    again, _ = lm_train.perplexity(model, data.validation, 32, max_tokens=256)
    assert abs(again - ppl["slim"]) / ppl["slim"] <= 1e-6
    assert tok.decode(tok(rep["sample"]["prompt"])["input_ids"]) == rep["sample"]["prompt"]


def test_resume_ends_in_the_same_bits(tiny_runs, tmp_path, monkeypatch):
    """Interrupted after step 5 (checkpoints every 3 steps) and resumed: the same weights and
    perplexities as the uninterrupted run."""
    _, _, ref = tiny_runs
    out = str(tmp_path / "resumed")
    real = lm_train.build_loader

    def interrupted(*args, **kw):
        for i, batch in enumerate(real(*args, **kw)):
            if i == 5:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(lm_train, "build_loader", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train("--out", out, *TINY, *TINY_TOKENS, "--checkpoint-every", "3")
    monkeypatch.setattr(lm_train, "build_loader", real)
    assert torch.load(os.path.join(out, "checkpoints", "last.pt"), weights_only=True)["state"]["step"] == 3
    # settings come from the checkpoint; a different one is refused
    assert _train("--out", out, "--resume", "--max-tokens", "2048", "--no-progress") == 1
    assert _train("--out", out, "--resume", "--no-progress") == 0
    a, b = (json.load(open(os.path.join(d, "report.json"))) for d in (ref, out))
    assert a["perplexity"] == b["perplexity"] and a["sample"] == b["sample"]
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(d, "hf", "model.safetensors")) for d in (ref, out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_init_from_hf_directory_or_checkpoint(tiny_runs, tmp_path, capsys):
    """``--init-from`` the dense run's HuggingFace directory or its run directory (the
    checkpoint) starts from the same weights and tokenizer and ends in the same result."""
    _, dense, _ = tiny_runs
    post = ["--max-tokens", "512", "--val-tokens", "256", "--sample-tokens", "8", "--no-progress",
            "--corpus-bytes", "100000", "--seq-len", "32", "--batch-size", "4"]
    a, b = str(tmp_path / "from_hf"), str(tmp_path / "from_ckpt")
    assert _train("--out", a, "--init-from", os.path.join(dense, "hf"), *post) == 0
    assert _train("--out", b, "--init-from", dense, *post) == 0
    ra, rb = (json.load(open(os.path.join(d, "report.json"))) for d in (a, b))
    assert ra["perplexity"] == rb["perplexity"] and ra["perplexity"]["equal"]
    assert ra["config"]["lr"] == lm_train.POST_TRAINING_DEFAULTS["lr"]
    assert ra["corpus"]["tokenizer_sha256"] == json.load(open(os.path.join(dense, "report.json")))["corpus"][
        "tokenizer_sha256"]
    assert ra["params"]["slim"] < ra["params"]["full"]
    capsys.readouterr()
    assert _train("--out", a + "x", "--init-from", str(tmp_path / "nowhere"), *post) == 1
    assert "--init-from" in capsys.readouterr().err


def test_task_flag_dispatch(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--task", "causal-lm", "--help"])
    assert info.value.code == 0 and "--init-from" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--task", "nonsense"])
    assert _train("--max-tokens", "0", *TINY) == 1
    assert "--max-tokens" in capsys.readouterr().err
