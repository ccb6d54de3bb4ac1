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

The public names load on first use, so that ``fxprune train -h`` answers without importing
torch.
"""
import importlib
import importlib.util
import sys
import types

__version__ = "0.1.0"

# public name -> (submodule, attribute)
_PUBLIC = {
    **{name: (".errors", name) for name in (
        "CheckpointError", "ConfigError", "DatasetError", "ExportError", "FxPruneError", "RegionError", "RewriteError",
        "TraceError", "UnsupportedInputError", "VerificationError")},
    "Erasable": (".ir", "Erasable"), "Group": (".ir", "Group"), "Slice": (".ir", "Slice"),
    "Program": (".program", "Program"), "compile": (".program", "compile"),
    "Report": (".report", "Report"), "report": (".report", "report"),
    "ExportResult": (".export", "ExportResult"), "export": (".export", "export"),
    "HFConfig": (".hf_config", "HFConfig"), "hf_config": (".hf_config", "hf_config"),
    "DHSPG": (".optim", "DHSPG"), "H2SPG": (".optim", "H2SPG"), "ATO": (".ato", "ATO"),
    "load": (".io", "load"), "save": (".io", "save"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        module, attr = _PUBLIC[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value  # cached: the next access does not come here
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule: fxprune.testing, ...
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """``fxprune.export`` is the function, although a submodule has the same name: importing the
    submodule (which Python records as an attribute of the package) does not replace it."""

    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            self.__dict__.pop(name, None)  # loaded from the submodule on the next access
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
