"""Structured-sparsity optimizers over a program's zero-invariant groups."""
from .dhspg import DHSPG

__all__ = ["DHSPG"]
from .h2spg import H2SPG, select_units, unit_saliency  # noqa: E402,F401  (OTOv3 erasing mode)
