"""Running a model in eval mode without losing its own train/eval flags."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Eval mode for the duration; afterwards every submodule gets its own flag back (a model
    may mix them, e.g. a frozen BatchNorm in a training network). A model already in eval mode
    throughout is left as it is."""
    flags = [(m, m.training) for m in module.modules()]
    if any(flag for _, flag in flags):
        module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            if m.training != flag:
                m.training = flag
