"""Submodules and tensor attributes of a GraphModule by qualified name."""
from __future__ import annotations

from typing import Dict, Optional

import torch


def get_tensor(gm: torch.nn.Module, name: str) -> Optional[torch.Tensor]:
    """The tensor attribute ``name`` of ``gm`` (parameter, buffer or constant); None if there is none."""
    module_path, _, attr = name.rpartition(".")
    try:
        owner = gm.get_submodule(module_path) if module_path else gm
    except AttributeError:
        return None
    t = getattr(owner, attr, None)
    return t if isinstance(t, torch.Tensor) else None


class Lookup:
    """A GraphModule's submodules and tensor attributes by qualified name.

    With ``index`` (for a walk over many nodes) every submodule is listed once up front, so a
    lookup is a dict access instead of a ``get_submodule`` walk down the module path; the
    module tree must not change while the lookup is in use.
    """

    def __init__(self, gm: torch.nn.Module, index: bool = True):
        self.gm = gm
        self._modules = dict(gm.named_modules(remove_duplicate=False)) if index else {}

    def canonical_names(self) -> Dict[str, str]:
        """Every parameter and buffer name -> the first name of the same tensor (tied weights),
        in the order of ``named_parameters`` then ``named_buffers`` (duplicates kept)."""
        modules = list(self._modules.items() if self._modules else self.gm.named_modules(remove_duplicate=False))
        first: Dict[int, str] = {}
        out: Dict[str, str] = {}
        for members in ("_parameters", "_buffers"):
            for path, m in modules:
                for attr, t in getattr(m, members).items():
                    if t is not None:
                        name = f"{path}.{attr}" if path else attr
                        out[name] = first.setdefault(id(t), name)
        return out

    def modules(self):
        """Every submodule (with repeats for a module under several names)."""
        return self._modules.values() if self._modules else self.gm.modules()

    def module(self, path: str) -> torch.nn.Module:
        """``gm.get_submodule(path)``; raises AttributeError if there is no such module."""
        m = self._modules.get(path)
        return m if m is not None else self.gm.get_submodule(path)

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        """The tensor attribute ``name`` (parameter, buffer or constant); None if there is none."""
        module_path, _, attr = name.rpartition(".")
        owner = self._modules.get(module_path)
        if owner is None:
            return get_tensor(self.gm, name)
        # a registered parameter or buffer is what getattr would return (no attribute can
        # shadow it); anything else goes through getattr
        t = owner._parameters.get(attr)
        if t is None:
            t = owner._buffers.get(attr)
        if t is None:
            t = getattr(owner, attr, None)
        return t if isinstance(t, torch.Tensor) else None
