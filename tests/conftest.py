"""Test-suite settings: one intra-op thread per process. The suite's models are small, where
thread start-up costs more than it saves (and xdist workers would oversubscribe the cores)."""
import torch

torch.set_num_threads(1)
