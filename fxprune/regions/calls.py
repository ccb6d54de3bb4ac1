"""How a region is called: its inputs as a flat list of tensors, and the GraphModule class
that accepts both the submodule's own call and that flat list.

A submodule is called with any Python arguments (a tensor, a list of feature maps, a dict,
``attention_mask=None``, ``training=False``). Region compile binds them to the submodule's
``forward`` signature (defaults applied, so positional and keyword calls look alike) and
flattens the bound arguments with ``torch.utils._pytree``: tensor leaves become the inputs of
the region's graph, every other leaf is a *constant* recorded with the call and baked into the
graph. A :class:`CallSpec` keeps that structure and those constants; a later call whose
structure or constants differ raises :class:`fxprune.RegionError` instead of running a graph
built for other inputs.
"""
from __future__ import annotations

import enum
import inspect
import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_flatten_with_path, tree_unflatten

from fxprune.errors import RegionError

# leaves that a region may take as constants: compared with == at every call
CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
                  torch.memory_format, enum.Enum, type(Ellipsis))

META_CALL = "fxprune.region_call"
_USER_PRESERVED = "_user_preserved_attributes"  # torch.fx.GraphModule.__deepcopy__ restores these


class NotFlat(Exception):
    """An argument that is neither a tensor, a pytree container nor a plain constant."""


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b) or (a != a and b != b)  # NaN constants compare equal to themselves
    except Exception:  # noqa: BLE001 - an == that does not return a bool: not a constant we can check
        return False


class CallSpec:
    """The call convention of a region (see the module docstring).

    Attributes:
        signature: ``inspect.Signature`` of the submodule's ``forward``.
        treespec: pytree structure of the bound arguments (an ordered dict by parameter name).
        constants: one entry per leaf: the constant value, or None at a tensor leaf.
        is_tensor: one bool per leaf.
        names: a Python identifier per tensor leaf (``x``, ``features_0``), the placeholder
            names of the region's graph.
    """

    def __init__(self, signature: inspect.Signature, treespec, constants: List[Any], is_tensor: List[bool],
                 names: List[str]):
        self.signature = signature
        self.treespec = treespec
        self.constants = constants
        self.is_tensor = is_tensor
        self.names = names

    @property
    def num_tensors(self) -> int:
        return sum(self.is_tensor)

    @classmethod
    def of(cls, module: torch.nn.Module, args: tuple, kwargs: dict) -> Tuple["CallSpec", List[torch.Tensor]]:
        """The spec of one call and its tensor leaves. Raises :class:`NotFlat` for an argument
        that is not a tensor, a pytree container or a constant of :data:`CONSTANT_TYPES`."""
        signature = inspect.signature(module.forward)
        arguments = _bind(signature, args, kwargs)
        with_paths, treespec = tree_flatten_with_path(arguments)
        constants, is_tensor, tensors, names = [], [], [], []
        for path, leaf in with_paths:
            if isinstance(leaf, torch.Tensor):
                constants.append(None)
                is_tensor.append(True)
                tensors.append(leaf)
                names.append(_identifier(path, names))
            elif isinstance(leaf, CONSTANT_TYPES):
                constants.append(leaf)
                is_tensor.append(False)
            else:
                raise NotFlat(f"argument {_path_text(path)} is a {type(leaf).__name__}, which fxprune can "
                              f"neither flatten into tensors nor compare as a constant")
        return cls(signature, treespec, constants, is_tensor, names), tensors

    def same_as(self, other: "CallSpec") -> bool:
        """Same structure and same constants."""
        return (self.treespec == other.treespec and self.is_tensor == other.is_tensor
                and all(_same(a, b) for a, b, t in zip(self.constants, other.constants, self.is_tensor) if not t))

    def difference(self, other: "CallSpec") -> str:
        """What differs between two calls, in words ('' if nothing)."""
        if self.treespec != other.treespec or self.is_tensor != other.is_tensor:
            return f"argument structure {other.treespec} instead of {self.treespec}"
        for i, (a, b, t) in enumerate(zip(self.constants, other.constants, self.is_tensor)):
            if not t and not _same(a, b):
                return f"constant argument #{i} is {b!r}, it was {a!r} when the region was compiled"
        return ""

    def tensors(self, args: tuple, kwargs: dict, region: str) -> List[torch.Tensor]:
        """The tensor inputs of a call: the submodule's own call convention, or already the flat
        tensor list. Raises :class:`fxprune.RegionError` for any other call."""
        try:
            arguments = _bind(self.signature, args, kwargs)
        except TypeError:
            arguments = None
        if arguments is not None:
            leaves, treespec = tree_flatten(arguments)
            if treespec == self.treespec:
                out = []
                for i, (leaf, const, t) in enumerate(zip(leaves, self.constants, self.is_tensor)):
                    if t:
                        if not isinstance(leaf, torch.Tensor):
                            break
                        out.append(leaf)
                    elif not _same(leaf, const):
                        raise RegionError(
                            f"region '{region}' was compiled for constant argument #{i} = {const!r}, called with "
                            f"{leaf!r}; its graph has that value built in. Compile with example inputs that "
                            f"call it as training and inference do, or exclude it: "
                            f"fxprune.compile(..., exclude=['{region}'])")
                else:
                    return out
        if not kwargs and len(args) == self.num_tensors and all(isinstance(a, torch.Tensor) for a in args):
            return list(args)
        raise RegionError(
            f"region '{region}' was compiled for calls {self.describe()}; called with "
            f"{_describe_call(args, kwargs)}. Compile with example inputs that call it as training and "
            f"inference do, or exclude it: fxprune.compile(..., exclude=['{region}'])")

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> Tuple[list, dict]:
        """``(args, kwargs)`` of the submodule's call with these tensor leaves."""
        it = iter(tensors)
        leaves = [next(it) if t else c for c, t in zip(self.constants, self.is_tensor)]
        arguments = tree_unflatten(leaves, self.treespec)
        args, kwargs = [], {}
        for p in self.signature.parameters.values():
            if p.name not in arguments:
                continue
            v = arguments[p.name]
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                args.append(v)
            elif p.kind is p.VAR_POSITIONAL:
                args.extend(v)
            elif p.kind is p.KEYWORD_ONLY:
                kwargs[p.name] = v
            else:
                kwargs.update(v)
        return args, kwargs

    def describe(self) -> str:
        return f"({', '.join(self.names)}) with structure {self.treespec}"

    def __repr__(self) -> str:
        return f"CallSpec{self.describe()}"


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _path_text(path) -> str:
    return "".join(str(k) for k in path)


def _identifier(path, taken: List[str]) -> str:
    text = re.sub(r"\W+", "_", "_".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                                        for k in path)).strip("_") or "x"
    if text[0].isdigit() or text in ("self",):
        text = "x_" + text
    name, k = text, 1
    while name in taken:
        name, k = f"{text}_{k}", k + 1
    return name


def _describe_call(args: tuple, kwargs: dict) -> str:
    def one(v):
        return f"Tensor{tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


class FlatCall(torch.nn.Module):
    """The submodule ``inner`` called with the flat tensor inputs of ``spec``: what the front
    ends trace. Made by :func:`flat_call`, whose class has a ``forward`` with one named
    parameter per tensor input (symbolic tracing and ``torch.export`` both need a fixed arity
    and read ``forward`` from the class)."""

    def __init__(self, inner: torch.nn.Module, spec: CallSpec):
        super().__init__()
        self.inner = inner
        self.spec = spec


def flat_call(inner: torch.nn.Module, spec: CallSpec) -> FlatCall:
    """A :class:`FlatCall` of ``inner`` (see there)."""
    names = list(spec.names)
    src = (f"def forward(self, {', '.join(names)}):\n"
           f"    args, kwargs = self.spec.rebuild([{', '.join(names)}])\n"
           f"    return self.inner(*args, **kwargs)\n")
    namespace: dict = {}
    exec(compile(src, f"<fxprune region call {type(inner).__name__}>", "exec"), namespace)  # noqa: S102 - generated above
    cls = type(f"FlatCall_{type(inner).__name__}", (FlatCall,), {"forward": namespace["forward"]})
    return cls(inner, spec)


class KwargsCall(torch.nn.Module):
    """``module(*inputs, **kwargs)``: a model called as region compile called it (keyword
    arguments fixed by ``concrete_args``)."""

    def __init__(self, module: torch.nn.Module, kwargs: dict):
        super().__init__()
        self.module = module
        self.kwargs = kwargs

    def forward(self, *inputs):
        return self.module(*inputs, **self.kwargs)


class RegionGraphModule(torch.fx.GraphModule):
    """A region's GraphModule. It takes the place of a submodule in the program's module and is
    called as that submodule was (``backbone(images)``, ``head(features)``); fxprune's passes
    call it with the flat tensor inputs (:class:`CallSpec`). Any other call raises
    :class:`fxprune.RegionError`. ``region_call`` is its :class:`CallSpec`, ``region_name``
    its qualified name."""

    region_call: Optional[CallSpec]
    region_name: str

    def __call__(self, *args, **kwargs):
        spec = self.__dict__.get("region_call")
        if spec is None:
            return super().__call__(*args, **kwargs)
        return super().__call__(*spec.tensors(args, kwargs, self.__dict__.get("region_name", "?")))

    # Code between regions may read the submodule it called (``self.head.num_anchors``,
    # ``self.block[0].weight``): what the graph does not hold is looked up on
    # ``region_original``, the submodule the region replaces (for a slim region, a copy of it
    # holding the slim region's own tensors and modules).
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.region_module
            if original is None or name.startswith("__"):
                raise
            return getattr(original, name)

    def __getitem__(self, index):
        return self._original("indexing")[index]

    def __len__(self) -> int:
        return len(self._original("len()"))

    def __bool__(self) -> bool:  # a module is true, whatever len() says
        return True

    def __iter__(self):
        return iter(self._original("iteration"))

    @property
    def region_module(self) -> Optional[torch.nn.Module]:
        """The submodule this region replaces (see above), or None."""
        held = self.__dict__.get("region_original")
        return held.module if held is not None else None

    def _original(self, what: str) -> torch.nn.Module:
        original = self.region_module
        if original is None:
            raise TypeError(f"region '{self.__dict__.get('region_name', '?')}' does not support {what}")
        return original


def region_graph_module(gm: torch.fx.GraphModule, spec: CallSpec, name: str,
                        rename: Optional[Callable[[str], str]] = None, original: Optional[torch.nn.Module] = None,
                        class_name: Optional[str] = None) -> RegionGraphModule:
    """A :class:`RegionGraphModule` over ``gm``'s graph (taken over, not copied) and attributes
    (shared, not copied). ``rename`` maps the targets of ``get_attr``/``call_module`` nodes to
    their names in the region (the front ends trace the submodule under a wrapper)."""
    attrs = {}
    graph = gm.graph
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            old = node.target
            new = rename(old) if rename is not None else old
            if not new:
                raise RegionError(f"region '{name}' is a single opaque module call")
            attrs[new] = _fetch(gm, old)
            node.target = new
    out = RegionGraphModule(attrs, graph, class_name=class_name or "GraphModule")
    out.meta.update({k: v for k, v in gm.meta.items() if k != _USER_PRESERVED})
    set_region_call(out, spec, name, original)
    out.training = gm.training
    return out


def set_region_call(gm: RegionGraphModule, spec: CallSpec, name: str,
                    original: Optional[torch.nn.Module] = None) -> None:
    """Attach the call convention and the replaced submodule (kept through ``copy.deepcopy``;
    the submodule is not registered, so its tensors are not counted twice)."""
    attrs = dict(region_call=spec, region_name=name, region_original=_Held(original) if original is not None else None)
    gm.__dict__.update(attrs)
    gm.meta.setdefault(_USER_PRESERVED, {}).update(attrs)


class _Held:
    """Holds a module as a plain attribute (``setattr`` would register a module as a child)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module


def rebound_original(original: Optional[torch.nn.Module], gm: torch.nn.Module) -> Optional[torch.nn.Module]:
    """A copy of ``original`` whose submodules, parameters and buffers are ``gm``'s where ``gm``
    has them under the same name (a slim region's): what the slim region's attribute lookups
    fall back to."""
    if original is None:
        return None
    memo: dict = {}
    for path, sub in gm.named_modules():
        if not path:
            continue
        try:
            mine = original.get_submodule(path)
        except AttributeError:
            continue
        if type(mine) is type(sub):
            memo[id(mine)] = sub
    for path, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        try:
            mine = _fetch(original, path)
        except AttributeError:
            continue
        if isinstance(mine, torch.Tensor):
            memo[id(mine)] = t
    import copy

    return copy.deepcopy(original, memo)


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = ["CallSpec", "FlatCall", "KwargsCall", "flat_call", "rebound_original", "NotFlat", "RegionGraphModule", "region_graph_module", "set_region_call",
           "CONSTANT_TYPES"]


def region_paths(model: torch.nn.Module) -> List[str]:
    """Qualified names of the region GraphModules inside ``model`` (a region program's module
    or slim model)."""
    return [name for name, m in model.named_modules() if name and isinstance(m, RegionGraphModule)]


def refuse_region_model(model: torch.nn.Module, what: str) -> None:
    """Raise :class:`fxprune.UnsupportedInputError` if ``model`` is a region-compiled model
    (not itself a GraphModule, with region GraphModules inside), saying what to do instead."""
    from fxprune.errors import UnsupportedInputError

    if isinstance(model, torch.fx.GraphModule):
        return
    names = region_paths(model)
    if not names:
        return
    shown = ", ".join(f"'{n}'" for n in names[:4]) + (" ..." if len(names) > 4 else "")
    raise UnsupportedInputError(
        f"{what} cannot take a region-compiled model ({type(model).__name__} with regions {shown}): the code between "
        f"its regions is the model's own Python, which fxprune neither serialises nor exports. Save or export each "
        f"slim region on its own, e.g. for name in [{shown}]: {what}(model.get_submodule(name), ...), with the "
        f"region's tensor inputs (prog.regions[i].example_inputs), and put them back into your model class with "
        f"setattr; or keep the whole model with torch.save(model.state_dict(), ...) together with your model's code")
