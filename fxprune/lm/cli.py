"""``fxprune train --task causal-lm ...``: the language-model job's command line.

With no options it trains the default small Llama from scratch on the standard library's
sources with DHSPG at group sparsity 0.5 over attention heads, MLP channels and the hidden size
(its embedding tied to the output layer unless ``--untie-embeddings``), and writes the slim
HuggingFace directory, report.json and a greedy sample to ``runs/causal-lm-stdlib``.
``--init-from DIR`` compresses a trained model instead (a HuggingFace directory or an fxprune
checkpoint) within ``--max-tokens``; ``--target-group-sparsity 0`` trains the dense baseline.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import List, Optional

from ..errors import FxPruneError
from .train import POST_TRAINING_DEFAULTS, LMConfig, LMRunOptions, train_lm

_DEFAULTS = LMConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fxprune train --task causal-lm",
        description="Train a decoder language model on the Python standard library's sources with DHSPG, then "
        "write the slim model as a HuggingFace directory (OUT/hf), OUT/report.json and a greedy sample.")
    d = _DEFAULTS

    def opt(flag, type_, default, help_, **kw):
        # None marks "not given", so that a resumed run can tell given settings from defaults.
        p.add_argument(flag, type=type_, default=None, help=f"{help_} (default: {default})", **kw)

    post = ", ".join(f"{k.replace('_', '-')} {v:g}" for k, v in POST_TRAINING_DEFAULTS.items())
    opt("--init-from", str, "none: train from scratch", "start from a trained model: a HuggingFace directory "
        f"(its tokenizer.json is used) or an fxprune checkpoint / run directory; changes the defaults to {post}")
    opt("--max-tokens", int, d.max_tokens, "training budget in tokens")
    opt("--target-group-sparsity", float, d.target_group_sparsity, "fraction of the prunable head, MLP and "
        "hidden-size channels driven to zero; 0 trains the dense baseline")
    opt("--start-pruning-fraction", float, d.start_pruning_fraction, "share of the steps before DHSPG partitions "
        "the channels and starts pruning")
    opt("--pruning-fraction", float, d.pruning_fraction, "share of the steps over which DHSPG reaches the target")
    opt("--lr", float, d.lr, "peak learning rate (AdamW base update)")
    opt("--min-lr-ratio", float, d.min_lr_ratio, "final learning rate of the cosine, relative to --lr")
    opt("--warmup-fraction", float, d.warmup_fraction, "share of the steps of linear warm-up")
    opt("--weight-decay", float, d.weight_decay, "decoupled weight decay")
    opt("--grad-clip", float, d.grad_clip, "gradient-norm clipping (0: none)")
    opt("--batch-size", int, d.batch_size, "sequences per step")
    opt("--seq-len", int, d.seq_len, "tokens per sequence")
    opt("--layers", int, d.layers, "decoder layers of the default Llama")
    opt("--hidden", int, d.hidden, "hidden size of the default Llama")
    opt("--heads", int, d.heads, "query heads of the default Llama")
    opt("--kv-heads", int, d.kv_heads, "key/value heads of the default Llama (grouped-query attention)")
    opt("--intermediate", int, d.intermediate, "SwiGLU width of the default Llama")
    p.add_argument("--untie-embeddings", dest="tie_embeddings", action="store_const", const=False, default=None,
                   help="give the default Llama an output layer of its own instead of the embedding's weight "
                   "(default: tied)")
    opt("--vocab-size", int, d.vocab_size, "byte-level BPE vocabulary trained on the training split")
    opt("--corpus-bytes", int, d.corpus_bytes, "size of the standard-library selection")
    opt("--val-fraction", float, d.val_fraction, "share of the selected files held out for validation")
    opt("--val-tokens", int, "the whole split", "validation targets scored at the end")
    opt("--seed", int, d.seed, "random seed (initialisation and data order)")
    opt("--sample-tokens", int, d.sample_tokens, "tokens of the greedy sample")
    p.add_argument("--out", default=None, help="output directory (default: runs/causal-lm-stdlib)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from OUT/checkpoints/last.pt, or from CHECKPOINT; settings come from it")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(LMConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    settings = dict(POST_TRAINING_DEFAULTS) if given.get("init_from") else {}
    settings.update(given)
    options = LMRunOptions(out=args.out, resume=args.resume, device=args.device, progress=not args.no_progress,
                           checkpoint_every=max(1, args.checkpoint_every))
    try:
        train_lm(LMConfig(**settings), options, given)
    except (FxPruneError, ValueError) as e:
        print(f"fxprune train: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
