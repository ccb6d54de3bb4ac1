"""The op-semantics registry: the one place that says what every op does to channels.

An entry (:class:`OpSpec`) is keyed by what a torch.fx node calls:

* ``call_module``: the module class (looked up along the MRO, so subclasses inherit);
* ``call_function``: the target callable (``torch.cat``, ``operator.add``, ``F.relu`` ...; a
  custom autograd Function by its ``X.apply``);
* ``call_method``: the method name (``"view"``, ``"chunk"`` ...).

Each entry has a ``rule`` that maps the channel tracks of the node's inputs to those of its
output, links parameter dimensions to channels and states what a zeroed channel becomes
(see :mod:`fxprune.passes.rule_context`), and optionally a ``rewrite`` that fixes the node
after pruning: new module attributes (``in_channels``, ``num_features`` ...) or recomputed
constant arguments (``view`` sizes, ``split`` sections ...). Ops without an entry freeze
every channel they touch, with the node named in the reason.

Users extend it with :func:`register_module`, :func:`register_function` or
:func:`register_method`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Union

import torch.fx

from .autograd_functions import autograd_function


@dataclass(frozen=True)
class OpSpec:
    """Channel semantics of one op.

    Attributes:
        name: a short readable name (``"conv"``, ``"elementwise_add"``).
        rule: ``rule(ctx) -> channels`` (see :class:`~fxprune.passes.rule_context.RuleContext`).
        rewrite: ``rewrite(rctx) -> None``, fixes the node after pruning (optional).
        selects: the op reads only the positions it outputs (slicing, ``split``, a tuple
            element, ``x.shape``), so channels absent from its output are not dropped by it.
            Any other op must account for every input channel (propagate, link or freeze it)
            or the channel-deps pass freezes the rest.
    """

    name: str
    rule: Callable
    rewrite: Optional[Callable] = None
    selects: bool = False


def op_name(target) -> str:
    """Readable name of a call_function target: ``aten.transpose.int`` -> ``"transpose"``."""
    return getattr(target, "_opname", None) or getattr(target, "__name__", str(target))


class Registry:
    def __init__(self):
        self.modules: Dict[type, OpSpec] = {}
        self.functions: Dict[object, OpSpec] = {}
        self.methods: Dict[str, OpSpec] = {}

    def lookup(self, node: torch.fx.Node, module: Optional[torch.nn.Module] = None) -> Optional[OpSpec]:
        if node.op == "call_module":
            for cls in type(module).__mro__:
                if cls in self.modules:
                    return self.modules[cls]
            return None
        if node.op == "call_function":
            try:
                spec = self.functions.get(node.target)
            except TypeError:  # unhashable target
                return None
            cls = autograd_function(node.target) if spec is None else None
            return self.functions.get(cls.apply) if cls is not None else spec
        if node.op == "call_method":
            return self.methods.get(node.target)
        return None

    def __len__(self) -> int:
        return len(self.modules) + len(self.functions) + len(self.methods)


REGISTRY = Registry()

Key = Union[type, object, str]


def _register(table: dict, keys: Iterable[Key], spec: OpSpec) -> None:
    for key in keys:
        table[key] = spec


def register_module(*classes: type, name: Optional[str] = None, rewrite: Optional[Callable] = None,
                    selects: bool = False):
    """Decorator: ``rule`` gives the channel semantics of modules of these classes."""

    def deco(rule):
        _register(REGISTRY.modules, classes, OpSpec(name or rule.__name__, rule, rewrite, selects))
        return rule

    return deco


def register_function(*targets, name: Optional[str] = None, rewrite: Optional[Callable] = None,
                      selects: bool = False):
    """Decorator: ``rule`` gives the channel semantics of ``call_function`` nodes of these targets."""

    def deco(rule):
        _register(REGISTRY.functions, [t for t in targets if t is not None], OpSpec(name or rule.__name__, rule, rewrite, selects))
        return rule

    return deco


def register_method(*names: str, name: Optional[str] = None, rewrite: Optional[Callable] = None,
                    selects: bool = False):
    """Decorator: ``rule`` gives the channel semantics of ``call_method`` nodes of these names."""

    def deco(rule):
        _register(REGISTRY.methods, names, OpSpec(name or rule.__name__, rule, rewrite, selects))
        return rule

    return deco
