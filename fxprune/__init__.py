"""fxprune: train once, get an exact slim network.

fxprune traces a PyTorch model with torch.fx, finds by graph analysis the groups of
parameters that must be removed together (zero-invariant groups, OTOv2), trains with
structured-sparsity optimizers, and regenerates a slim ``torch.fx.GraphModule`` whose output
equals the trained model's.

    prog = fxprune.compile(model, example_inputs)
    opt = fxprune.DHSPG(prog, lr=0.1, target_group_sparsity=0.5)
    ...  # train as usual
    slim = prog.construct_subnet()        # verified against the full model
    print(fxprune.report(model, slim, example_inputs))
"""
from .errors import (CheckpointError, ExportError, FxPruneError, RewriteError, TraceError,
                     UnsupportedInputError, VerificationError)
from .ir import Erasable, Group, Slice
from .program import Program, compile
from .report import Report, report
# Imported eagerly (it needs only torch): a lazy attribute named like its submodule would be
# shadowed by the submodule once anything imported fxprune.export.
from .export import ExportResult, export
from .hf_config import HFConfig, hf_config

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "Erasable", "ExportError", "ExportResult", "FxPruneError", "Group", "Program", "Report", "RewriteError", "Slice", "TraceError",
    "UnsupportedInputError", "VerificationError", "compile", "export", "report", "DHSPG", "H2SPG", "load", "save",
    "ATO", "HFConfig", "hf_config",
]


def __getattr__(name):  # optional parts load on first use
    if name == "DHSPG":
        from .optim import DHSPG

        return DHSPG
    if name == "H2SPG":
        from .optim import H2SPG

        return H2SPG
    if name == "ATO":
        from .ato import ATO

        return ATO
    if name in ("load", "save"):
        from . import io

        return getattr(io, name)
    if name in ("testing", "hf", "lm"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")
