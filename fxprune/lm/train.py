"""``fxprune train --task causal-lm``: train a decoder on the standard library's sources with
DHSPG, then write the slim model as a HuggingFace directory.

One run: select the corpus and train its tokenizer (:mod:`fxprune.lm.data`), build the model
(by default a small Llama with grouped-query attention: 4 layers, hidden 256, 8 query / 4
key-value heads, SwiGLU 688, embeddings tied) or load the one to start from (``init_from``:
a HuggingFace directory or an fxprune checkpoint), compile it (``fxprune.compile``; the
exported graph shares the model's parameters), and train the model with ``fxprune.DHSPG``
(AdamW base update) on ``max_tokens`` tokens: a linear warm-up, a cosine decay, and DHSPG's
pruning phase between ``start_pruning_fraction`` and ``start_pruning_fraction +
pruning_fraction`` of the steps; ``target_group_sparsity=0`` trains the dense baseline. At the
end the slim GraphModule is built (``Program.construct_subnet``, verified), turned into the
model's own class (:func:`fxprune.hf.to_pretrained`) and saved with its tokenizer in
``OUT/hf``; ``OUT/report.json`` holds the validation perplexity of the full and the slim model,
parameters, FLOPs per token, tokens seen, wall and CPU time, the corpus hash and the Python
version; ``OUT/sample.txt`` a greedy sample of the slim model.

Checkpoints are the image job's (:func:`fxprune.train.save_checkpoint`: atomic, digested,
``last.pt`` and ``prev.pt``), written every ``checkpoint_every`` steps and after the last one;
they also hold the tokenizer and the model's config, so ``--init-from`` can start from one.
The batch of a step and the schedules are functions of the step, so a resumed run ends in
the bits of an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from ..train import (_write_json, load_checkpoint, resume_path, rng_state, save_checkpoint, seed_everything,
                     set_rng_state)
from .corpus import DEFAULT_BYTES, DEFAULT_VAL_FRACTION
from .data import LMData, build_data, build_loader, validation_batches
from .tokenizer import DEFAULT_VOCAB_SIZE, hf_tokenizer

CHECKPOINT_KIND = "causal-lm"


@dataclass
class LMConfig:
    """Everything that determines a language-model run's result.

    Token budgets are in tokens (targets); one optimizer step takes ``batch_size * seq_len``.
    Fractions are of the run's steps.
    """

    layers: int = 4
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 688
    tie_embeddings: bool = True
    vocab_size: int = DEFAULT_VOCAB_SIZE
    seq_len: int = 128
    batch_size: int = 16
    max_tokens: int = 1_500_000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    target_group_sparsity: float = 0.5
    start_pruning_fraction: float = 0.25
    pruning_fraction: float = 0.25
    corpus_bytes: int = DEFAULT_BYTES
    val_fraction: float = DEFAULT_VAL_FRACTION
    val_tokens: Optional[int] = None  # None: the whole validation split
    init_from: Optional[str] = None
    seed: int = 0
    sample_tokens: int = 64
    sample_prompt: str = "import os\n\n\ndef "


#: Defaults that change when a run starts from a trained model (``init_from``): compressing
#: a trained model is a short run at a lower learning rate that partitions the channels at
#: once and reaches the target within the first tenth of the steps (measured on the default
#: model, 0.75M tokens: pruning over 5-50% of the steps gave perplexity 39.90, over 2-22%
#: 39.28, over 0-10% 38.92, over 0-5% 38.90; see README, "Language models").
POST_TRAINING_DEFAULTS = dict(max_tokens=750_000, lr=1e-3, warmup_fraction=0.02, start_pruning_fraction=0.0,
                              pruning_fraction=0.1)


@dataclass
class LMRunOptions:
    """Settings that do not change a run's result."""

    out: Optional[str] = None
    resume: Optional[str] = None  # a checkpoint path, or "" for OUT's latest
    device: Optional[str] = None
    progress: bool = True
    checkpoint_every: int = 100  # optimizer steps
    num_workers: int = 0


def default_out(config: LMConfig) -> str:
    """``runs/causal-lm-stdlib`` (``-from-<name>`` with ``init_from``)."""
    if config.init_from:
        name = os.path.basename(os.path.normpath(config.init_from)) or "model"
        return os.path.join("runs", f"causal-lm-stdlib-from-{name}")
    return os.path.join("runs", "causal-lm-stdlib")


def total_steps(config: LMConfig) -> int:
    return max(1, config.max_tokens // (config.batch_size * config.seq_len))


def lr_at(config: LMConfig, step: int, steps: int) -> float:
    """Learning rate of step ``step`` of ``steps``: linear warm-up over ``warmup_fraction``,
    then a cosine from ``lr`` to ``min_lr_ratio * lr`` at the last step."""
    warm = round(config.warmup_fraction * steps)
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm - 1)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------------------------
# construction (model, optimizer, data): separate so that a distributed run can wrap each


def build_model(config: LMConfig, vocab_size: int, eos_id: int) -> torch.nn.Module:
    """The default model: a ``transformers.LlamaForCausalLM`` with grouped-query attention,
    random weights drawn from ``config.seed``; the output layer shares the embedding's weight
    unless ``config.tie_embeddings`` is False."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=config.hidden, intermediate_size=config.intermediate,
                      num_hidden_layers=config.layers, num_attention_heads=config.heads,
                      num_key_value_heads=config.kv_heads, max_position_embeddings=max(1024, config.seq_len),
                      tie_word_embeddings=config.tie_embeddings, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    return LlamaForCausalLM(cfg)


def load_start(path: str) -> Tuple[torch.nn.Module, Optional[str]]:
    """The model a run starts from, and its tokenizer's JSON (None when the source has none).

    ``path``: a HuggingFace directory (``config.json`` and weights, read with
    ``AutoModelForCausalLM.from_pretrained``; ``tokenizer.json`` beside them is used), or an
    fxprune language-model checkpoint (a ``.pt`` file, or a run directory whose
    ``checkpoints/last.pt`` is read). Nothing in the files runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tok_path = os.path.join(path, "tokenizer.json")
        tok = open(tok_path, encoding="utf-8").read() if os.path.isfile(tok_path) else None
        return model, tok
    ckpt_path = path if os.path.isfile(path) else resume_path(path)
    state = load_checkpoint(ckpt_path)
    if state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{ckpt_path} is not a language-model checkpoint of fxprune train --task causal-lm")
    cfg = json.loads(state["model_config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    model.load_state_dict(state["model"])
    return model, state["tokenizer"]


def build_optimizer(prog, config: LMConfig, steps: int):
    """``fxprune.DHSPG`` with the AdamW base update over every parameter of the model, pruning
    every prunable group: attention heads, MLP channels and the hidden size (residual stream,
    exact since its RMSNorms keep the full count, with the embedding tied to the output layer
    or not; DHSPG's construction check freezes before training any group whose removal would
    not be exact). The uniform
    partition gives every group the same share of zero channels, so every layer keeps the same
    widths and the slim config is homogeneous."""
    import fxprune

    return fxprune.DHSPG(prog, lr=config.lr, variant="adamw", weight_decay=config.weight_decay,
                         target_group_sparsity=config.target_group_sparsity,
                         start_pruning_step=round(config.start_pruning_fraction * steps),
                         pruning_steps=max(1, round(config.pruning_fraction * steps)), partition="uniform")


# --------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 16,
               max_tokens: Optional[int] = None, device=None) -> Tuple[float, int]:
    """``(exp(mean negative log-likelihood), number of targets)`` of ``model`` over the windows
    of ``tokens`` (:func:`fxprune.lm.data.validation_batches`), eval mode, no cache."""
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    for batch in validation_batches(tokens, seq_len, batch_size, max_tokens):
        batch = batch.to(device) if device is not None else batch
        logits = model(batch[:, :-1], use_cache=False).logits
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), batch[:, 1:].reshape(-1),
                                     reduction="sum"))
        count += batch[:, 1:].numel()
    model.train(was)
    return math.exp(nll / count), count


def flops_per_token(model: torch.nn.Module, seq_len: int, device=None) -> float:
    """FLOPs of one forward pass over ``seq_len`` tokens, divided by ``seq_len``
    (``torch.utils.flop_counter``; a multiply-add is 2)."""
    from ..report import count_flops

    ids = torch.zeros((1, seq_len), dtype=torch.long, device=device)

    class NoCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, use_cache=False).logits

    return count_flops(NoCache(model), (ids,)) / seq_len


def greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy tokens after ``prompt`` (``LongTensor[1, n]``), key/value cache on,
    end-of-text not stopping the generation."""
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          num_beams=1, use_cache=True)


# --------------------------------------------------------------------------------------------
# the run


def resume_lm_config(saved: Dict[str, Any], given: Dict[str, Any]) -> LMConfig:
    """The checkpoint's config; a given setting that differs from it is an error (the
    schedules are laid out over the whole budget, so not even ``max_tokens`` may change)."""
    config = LMConfig(**saved)
    for k, v in given.items():
        if v != saved.get(k):
            raise ValueError(f"the checkpoint was trained with {k}={saved.get(k)!r}; a resumed run cannot "
                             f"change it to {v!r}")
    return config


def check_config(config: LMConfig) -> None:
    for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "seq_len", "batch_size", "max_tokens"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(config, name)}")
    if config.heads % config.kv_heads or config.hidden % config.heads:
        raise ValueError(f"--heads ({config.heads}) must divide --hidden ({config.hidden}) and be a multiple "
                         f"of --kv-heads ({config.kv_heads})")
    if not 0.0 <= config.target_group_sparsity < 1.0:
        raise ValueError(f"--target-group-sparsity must be in [0, 1), not {config.target_group_sparsity}")
    for name in ("start_pruning_fraction", "pruning_fraction", "warmup_fraction", "min_lr_ratio"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], not {getattr(config, name)}")
    if config.target_group_sparsity > 0 and config.start_pruning_fraction + config.pruning_fraction > 1.0:
        raise ValueError("--start-pruning-fraction plus --pruning-fraction exceeds the run: the sparsity target "
                         "would not be reached")
    if config.init_from and not os.path.exists(config.init_from):
        raise ValueError(f"--init-from {config.init_from}: no such file or directory")


def train_lm(config: LMConfig, options: Optional[LMRunOptions] = None, given: Optional[Dict[str, Any]] = None,
             start_model: Optional[torch.nn.Module] = None, tokenizer_json: Optional[str] = None) -> Dict[str, Any]:
    """Run the language-model job as configured; returns the report (also OUT/report.json).

    ``given``: with ``options.resume``, the settings passed explicitly (checked against the
    checkpoint's). ``start_model`` (with its ``tokenizer_json``): an in-memory model to start
    from instead of ``config.init_from`` (used by benchmarks for a model pruned elsewhere).
    """
    import fxprune
    from tqdm.auto import tqdm

    options = options or LMRunOptions()
    t_start, c_start = time.perf_counter(), time.process_time()
    if not options.progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    ckpt, out = None, options.out
    if options.resume is not None:
        path = options.resume or resume_path(out or default_out(config))
        ckpt = load_checkpoint(path)
        if ckpt.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"{path} is not a checkpoint of fxprune train --task causal-lm")
        config = resume_lm_config(ckpt["config"], given or {})
        out = out or os.path.dirname(os.path.dirname(os.path.abspath(path)))
    out = out or default_out(config)
    check_config(config)
    device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # the model to train and the tokenizer it reads
    if ckpt is not None:
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = json.loads(ckpt["model_config"])
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        tokenizer_json = ckpt["tokenizer"]
    elif start_model is not None:
        model = start_model
    elif config.init_from:
        model, tokenizer_json = load_start(config.init_from)
    else:
        model = None
    data = build_data(config.corpus_bytes, config.val_fraction, config.vocab_size, tokenizer_json)
    if ckpt is not None and ckpt["corpus_sha256"] != data.corpus.sha256:
        raise CheckpointError(f"the corpus differs from the checkpoint's (sha256 {data.corpus.sha256} here, "
                              f"{ckpt['corpus_sha256']} there): another Python version?")
    if model is None:
        model = build_model(config, data.vocab_size, data.eos_id)
    if model.get_input_embeddings().num_embeddings < data.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.get_input_embeddings().num_embeddings}) is smaller than "
                         f"the tokenizer's ({data.vocab_size})")
    seed_everything(config.seed)
    model.to(device).float()
    steps = total_steps(config)
    example = next(validation_batches(data.validation, min(64, config.seq_len), 2))[:, :-1].to(device)
    model.eval()
    prog = fxprune.compile(model, (example,))
    opt = build_optimizer(prog, config, steps)
    gen = torch.Generator()
    start, history, spent = 0, [], {"seconds": 0.0, "cpu_seconds": 0.0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], gen)
        start, history, spent = int(ckpt["step"]), list(ckpt["history"]), dict(ckpt["spent"])

    tokens_per_step = config.batch_size * config.seq_len
    loader = build_loader(data.train, config.seq_len, config.batch_size, config.seed, start, steps,
                          num_workers=options.num_workers)
    bar = tqdm(total=steps * tokens_per_step, initial=start * tokens_per_step, unit="tok", unit_scale=True,
               desc="causal-lm", disable=not options.progress, dynamic_ncols=True, smoothing=0.1)
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    loss_sum, loss_n = 0.0, 0
    step = start
    for step, batch in enumerate(loader, start=start):
        batch = batch.to(device)
        lr = lr_at(config, step, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(batch[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        bar.update(tokens_per_step)
        done = step + 1
        if done % 10 == 0 or done == steps:
            bar.set_postfix(loss=f"{loss_sum / loss_n:.3f}", gs=f"{opt.metrics()['group_sparsity']:.3f}",
                            lr=f"{lr:.2e}")
        if done % options.checkpoint_every == 0 or done == steps:
            now_t, now_c = time.perf_counter(), time.process_time()
            spent = {"seconds": spent["seconds"] + now_t - t0, "cpu_seconds": spent["cpu_seconds"] + now_c - c0}
            t0, c0 = now_t, now_c
            history.append({"step": done, "tokens": done * tokens_per_step, "train_loss": loss_sum / loss_n,
                            "lr": lr, "group_sparsity": opt.metrics()["group_sparsity"], **spent})
            loss_sum, loss_n = 0.0, 0
            save_checkpoint({"kind": CHECKPOINT_KIND, "config": dataclasses.asdict(config), "step": done,
                             "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "rng": rng_state(gen), "history": history, "spent": spent,
                             "tokenizer": data.tokenizer.to_str(), "model_config": model.config.to_json_string(),
                             "corpus_sha256": data.corpus.sha256}, os.path.join(out, "checkpoints"))
    bar.close()

    report = finish_lm(prog, model, opt, data, config, out, device)
    report.update({"tokens_seen": steps * tokens_per_step, "steps": steps, "history": history,
                   "wall_time_s": {"train": spent["seconds"], "this_invocation": time.perf_counter() - t_start},
                   "cpu_time_s": {"train": spent["cpu_seconds"], "this_invocation": time.process_time() - c_start}})
    _write_json(os.path.join(out, "report.json"), report)
    print(summary_table(report, out))
    return report


def finish_lm(prog, model, opt, data: LMData, config: LMConfig, out: str, device) -> Dict[str, Any]:
    """Build, check and save the slim HuggingFace model; measure both models. Returns the
    report without the run's times."""
    import transformers
    from transformers import AutoModelForCausalLM

    from ..hf import check_outputs, to_pretrained
    from ..report import count_params

    model.eval()
    slim = prog.construct_subnet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf = to_pretrained(prog, slim, pad=True)
    padded = [str(w.message) for w in caught if "zero channels put back" in str(w.message)]
    hf_dir = os.path.join(out, "hf")
    hf.save_pretrained(hf_dir)
    hf_tokenizer(data.tokenizer).save_pretrained(hf_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    reload_rel = check_outputs(slim, reloaded, prog.example_inputs)

    ppl_full, n_val = perplexity(model, data.validation, config.seq_len, max_tokens=config.val_tokens, device=device)
    ppl_slim, _ = perplexity(hf, data.validation, config.seq_len, max_tokens=config.val_tokens, device=device)
    rel = abs(ppl_slim - ppl_full) / ppl_full
    prompt = torch.tensor([data.tokenizer.encode(config.sample_prompt).ids], device=device)
    with torch.no_grad():
        tokens_slim = greedy(hf, prompt, config.sample_tokens)
        tokens_full = greedy(model, prompt, config.sample_tokens)
    sample = data.tokenizer.decode(tokens_slim[0].tolist())
    with open(os.path.join(out, "sample.txt"), "w", encoding="utf-8") as f:
        f.write(sample)
    metrics = opt.metrics()
    return {
        "task": "causal-lm",
        "config": dataclasses.asdict(config),
        "perplexity": {"full": ppl_full, "slim": ppl_slim, "relative_difference": rel, "equal": rel <= 1e-5,
                       "validation_tokens": n_val},
        "params": {"full": count_params(model), "slim": count_params(hf)},
        "flops_per_token": {"full": flops_per_token(model, config.seq_len, device),
                            "slim": flops_per_token(hf, config.seq_len, device)},
        "group_sparsity": metrics["group_sparsity"],
        "zero_channels": metrics["zero_channels"],
        "prunable_channels": metrics["prunable_channels"],
        "model_class": type(hf).__name__,
        "config_full": _widths(model.config),
        "config_slim": _widths(hf.config),
        "padded": padded,
        "hf_dir": hf_dir,
        "reload_relative_difference": reload_rel,
        "sample": {"prompt": config.sample_prompt, "text": sample, "new_tokens": config.sample_tokens,
                   "slim_equals_full": bool(torch.equal(tokens_slim, tokens_full))},
        "corpus": data.summary(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }


def _widths(cfg) -> Dict[str, Any]:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_hidden_layers", "vocab_size", "rms_norm_eps")
    return {k: getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None}


def summary_table(report: Dict[str, Any], out: str) -> str:
    p, f, q = report["params"], report["flops_per_token"], report["perplexity"]

    def cut(full, slim):
        return f"-{100 * (1 - slim / full):.1f}%" if full else ""

    rows = [("", "full", "slim", "change"),
            ("validation perplexity", f"{q['full']:.4f}", f"{q['slim']:.4f}", f"{q['relative_difference']:.1e} rel"),
            ("params (M)", f"{p['full'] / 1e6:.3f}", f"{p['slim'] / 1e6:.3f}", cut(p["full"], p["slim"])),
            ("FLOPs/token (M)", f"{f['full'] / 1e6:.2f}", f"{f['slim'] / 1e6:.2f}", cut(f["full"], f["slim"]))]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)) for r in rows]
    lines += [f"group sparsity {report['group_sparsity']:.3f} ({report['zero_channels']}/"
              f"{report['prunable_channels']} channels), {report['tokens_seen']:,} tokens, training "
              f"{report['wall_time_s']['train']:.0f} s wall, {report['cpu_time_s']['train']:.0f} s CPU",
              f"slim {report['model_class']} in {report['hf_dir']}, report in {os.path.join(out, 'report.json')}, "
              f"greedy sample in {os.path.join(out, 'sample.txt')}"]
    return "\n".join(lines)
