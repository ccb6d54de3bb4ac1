"""Language-model quality against Torch-Pruning: validation perplexity at equal parameters and tokens.

Every run is ``fxprune train --task causal-lm`` (:func:`fxprune.lm.train.train_lm`) on the same
standard-library corpus, tokenizer, model (the job's default Llama: 4 layers, hidden 256,
8 query / 4 key-value heads, SwiGLU 688, tied embeddings) and seed:

* ``dense``: ``--target-group-sparsity 0`` for ``--dense-tokens`` tokens (the baseline; also the
  trained model the post-training rows start from);
* ``dhspg-scratch``: the job's defaults (DHSPG at group sparsity 0.5 over heads and MLP
  channels) from random weights, for the same ``--dense-tokens``;
* ``dhspg-from-dense``: ``--init-from`` the dense model's HuggingFace directory, DHSPG at 0.5,
  ``--post-tokens`` tokens (the job's post-training defaults: lr 1e-3, pruning over the first
  10% of the steps, then training on);
* ``tp-magnitude``: Torch-Pruning's magnitude pruning of the dense model to the widths of the
  ``dhspg-from-dense`` slim model (per layer: key/value heads and MLP channels), with
  ``GroupMagnitudeImportance(p=2, group_reduction="mean")`` as its LLM example uses, no
  training;
* ``tp-magnitude+ft``: the same, then trained with the same recipe as ``dhspg-from-dense``
  (same tokens, learning rate, schedule; no pruning) through the same job.

Torch-Pruning 1.6's ``DependencyGraph`` does not terminate when it forms the attention-head
groups of a grouped-query Llama (two query heads per key/value head; its issue #527 reports
the same on Qwen3), so the MLP channels are pruned through its dependency graph
(``get_pruning_group`` on ``gate_proj``) and the heads with its pruning functions
(``prune_linear_out_channels`` on q/k/v, ``prune_linear_in_channels`` on o), ranked by the
same L2-magnitude importance computed over each key/value head's rows and columns.

Perplexity is ``exp`` of the mean negative log-likelihood over every window of the validation
split (files never trained on). FLOPs per token: ``torch.utils.flop_counter`` over one
sequence of the training length, divided by its length. "tokens" counts training tokens of the
row's own run plus, for the post-training rows, the dense run's.

Runs are resumable: a finished run (its ``report.json``) is read back, an interrupted one is
resumed from its checkpoint. Usage::

    python benchmarks/quality_lm.py                        # 1.5M dense tokens, 0.75M post-training
    python benchmarks/quality_lm.py --quick --dense-tokens 8192 --post-tokens 4096 --work /tmp/q --out /tmp/q/r

Writes ``results/quality_lm.json``, ``results/quality_lm.md`` and ``results/quality_lm.png``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import fxprune  # noqa: E402,F401
import fxprune.hf  # noqa: E402,F401  (imported up front: a long run is not affected by later edits)
from fxprune.lm.data import build_data  # noqa: E402
from fxprune.lm.train import (POST_TRAINING_DEFAULTS, LMConfig, LMRunOptions, flops_per_token,  # noqa: E402
                              load_start, perplexity, train_lm)
from fxprune.report import count_params  # noqa: E402


def run(label: str, config: LMConfig, work: str, **kw) -> dict:
    """One job run (read back when finished, resumed when interrupted); its report."""
    out = os.path.join(work, label)
    done = os.path.join(out, "report.json")
    if os.path.isfile(done):
        return json.load(open(done))
    resume = "" if os.path.isfile(os.path.join(out, "checkpoints", "last.pt")) else None
    print(f"--- {label}: {config.max_tokens:,} tokens", flush=True)
    return train_lm(config, LMRunOptions(out=out, resume=resume, progress=sys.stderr.isatty()), {}, **kw)


def row(label: str, rep: dict, tokens: int, note: str = "") -> dict:
    wall = rep["wall_time_s"]["train"]
    return {"method": label, "val_ppl": rep["perplexity"]["slim"], "val_ppl_full": rep["perplexity"]["full"],
            "params": rep["params"]["slim"], "flops_per_token": rep["flops_per_token"]["slim"], "tokens": tokens,
            "run_tokens": rep["tokens_seen"], "train_wall_s": wall,
            "tokens_per_s": rep["tokens_seen"] / wall if wall else None, "note": note}


# --------------------------------------------------------------------------------------------
# Torch-Pruning


def _slim_widths(hf_dir: str) -> Dict[str, int]:
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    return {"num_key_value_heads": cfg["num_key_value_heads"], "num_attention_heads": cfg["num_attention_heads"],
            "intermediate_size": cfg["intermediate_size"]}


def tp_magnitude_prune(model, widths: Dict[str, int], example: torch.Tensor):
    """Prune ``model`` (a Llama) in place to ``widths`` with Torch-Pruning (see module docstring)."""
    import torch_pruning as tp

    cfg = model.config
    imp = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")
    was = cfg.use_cache
    cfg.use_cache = False
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, output_transform=lambda o: o.logits)
    cfg.use_cache = was
    with torch.no_grad():
        _prune_layers(model, dg, imp, widths)
    cfg.num_key_value_heads = widths["num_key_value_heads"]
    cfg.num_attention_heads = widths["num_attention_heads"]
    cfg.intermediate_size = widths["intermediate_size"]
    return model


def _prune_layers(model, dg, imp, widths: Dict[str, int]) -> None:
    import torch_pruning as tp

    cfg = model.config
    d = cfg.head_dim
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    for layer in model.model.layers:
        mlp, attn = layer.mlp, layer.self_attn
        n = mlp.gate_proj.out_features
        group = dg.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(range(n)))
        scores = imp(group)
        drop = torch.argsort(scores)[: n - widths["intermediate_size"]].tolist()
        dg.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=drop).prune()
        kv = attn.k_proj.out_features // d
        # per key/value head: mean over q, k, v, o of the squared L2 norm of the head's slices
        per = [attn.k_proj.weight.view(kv, -1).pow(2).sum(1), attn.v_proj.weight.view(kv, -1).pow(2).sum(1),
               attn.q_proj.weight.view(kv, -1).pow(2).sum(1),
               attn.o_proj.weight.view(-1, kv, n_rep * d).pow(2).sum((0, 2))]
        scores = torch.stack(per).mean(0)
        heads = sorted(torch.argsort(scores)[: kv - widths["num_key_value_heads"]].tolist())
        kv_rows = [h * d + i for h in heads for i in range(d)]
        q_rows = [h * n_rep * d + i for h in heads for i in range(n_rep * d)]
        tp.prune_linear_out_channels(attn.k_proj, kv_rows)
        tp.prune_linear_out_channels(attn.v_proj, kv_rows)
        tp.prune_linear_out_channels(attn.q_proj, q_rows)
        tp.prune_linear_in_channels(attn.o_proj, q_rows)


# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense-tokens", type=int, default=LMConfig().max_tokens)
    p.add_argument("--post-tokens", type=int, default=POST_TRAINING_DEFAULTS["max_tokens"])
    p.add_argument("--work", default="runs/quality_lm", help="run directories (checkpoints, HF models)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "quality_lm"))
    p.add_argument("--quick", action="store_true", help="a 2-layer, 32-wide model on 150 kB: a smoke test")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    base = LMConfig(max_tokens=args.dense_tokens)
    if args.quick:
        base = dataclasses.replace(base, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=48, vocab_size=300,
                                   corpus_bytes=150_000, seq_len=32, batch_size=4, val_tokens=2048)
    post = dataclasses.replace(base, **{**POST_TRAINING_DEFAULTS, "max_tokens": args.post_tokens})

    dense = run("dense", dataclasses.replace(base, target_group_sparsity=0.0), args.work)
    scratch = run("dhspg-scratch", base, args.work)
    dense_hf = dense["hf_dir"]
    from_dense = run("dhspg-from-dense", dataclasses.replace(post, init_from=dense_hf), args.work)

    widths = _slim_widths(from_dense["hf_dir"])
    model, tok_json = load_start(dense_hf)
    data = build_data(base.corpus_bytes, base.val_fraction, base.vocab_size, tok_json)
    example = data.validation[: base.seq_len].unsqueeze(0)
    tp_model = tp_magnitude_prune(copy.deepcopy(model).eval(), widths, example)
    tp_ppl, _ = perplexity(tp_model, data.validation, base.seq_len, max_tokens=base.val_tokens)
    tp_row = {"method": "tp-magnitude", "val_ppl": tp_ppl, "val_ppl_full": tp_ppl, "params": count_params(tp_model),
              "flops_per_token": flops_per_token(tp_model, base.seq_len), "tokens": dense["tokens_seen"],
              "run_tokens": 0, "train_wall_s": 0.0, "tokens_per_s": None, "note": "no training after pruning"}
    tp_ft = run("tp-magnitude-ft", dataclasses.replace(post, target_group_sparsity=0.0), args.work,
                start_model=tp_model, tokenizer_json=tok_json)

    rows = [row("dense", dense, dense["tokens_seen"]),
            row("dhspg-scratch", scratch, scratch["tokens_seen"]),
            row("dhspg-from-dense", from_dense, dense["tokens_seen"] + from_dense["tokens_seen"]),
            tp_row,
            row("tp-magnitude+ft", tp_ft, dense["tokens_seen"] + tp_ft["tokens_seen"])]
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
            "cpus": os.cpu_count(), "load_average_start": load0, "load_average_end": os.getloadavg(),
            "dense_tokens": args.dense_tokens, "post_tokens": args.post_tokens, "corpus": dense["corpus"],
            "widths_full": dense["config_slim"], "widths_slim": from_dense["config_slim"],
            "this_invocation_s": time.perf_counter() - t0,
            "runs_wall_s": sum(r["wall_time_s"]["this_invocation"] for r in (dense, scratch, from_dense, tp_ft)),
            "slim_equals_full": {k: r["perplexity"]["equal"] for k, r in
                                 (("dhspg-scratch", scratch), ("dhspg-from-dense", from_dense))}}
    table = markdown(rows)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(table + "\n")
    plot(rows, args.out + ".png")
    return 0


def markdown(rows: List[dict]) -> str:
    lines = ["| method | val. perplexity (slim) | full model | params (M) | MFLOPs/token | tokens (M) | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"| {r['method']} | {r['val_ppl']:.3f} | {r['val_ppl_full']:.3f} | {r['params'] / 1e6:.3f} | "
                     f"{r['flops_per_token'] / 1e6:.2f} | {r['tokens'] / 1e6:.2f} | {tps} |")
    return "\n".join(lines)


def plot(rows: List[dict], path: str) -> None:
    """Validation perplexity per method (bars), with parameters and training tokens as labels."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7.0, 3.6))
    names = [r["method"] for r in rows][::-1]
    values = [r["val_ppl"] for r in rows][::-1]
    full = max(r["params"] for r in rows)
    colors = ["#888888" if r["params"] == full else ("#1f77b4" if r["method"].startswith("dhspg") else "#d62728")
              for r in rows][::-1]
    bars = ax.barh(names, values, color=colors)
    for bar, r in zip(bars, rows[::-1]):
        ax.text(bar.get_width() * 1.01, bar.get_y() + bar.get_height() / 2,
                f"{r['val_ppl']:.2f}  ({r['params'] / 1e6:.2f} M params, {r['tokens'] / 1e6:.2f} M tokens)",
                va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.9)
    ax.set_xlabel("validation perplexity (lower is better)")
    ax.set_title("Llama 4x256 (GQA) on the Python standard library's sources", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
