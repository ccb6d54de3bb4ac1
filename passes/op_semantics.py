"""Op semantics: attach to every node the registry entry that gives its channel semantics
(``node.meta["fxprune.spec"]``; None for ops fxprune does not know, which the channel-deps
pass then freezes with the node named in the reason)."""
from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .lookup import Lookup
from .registry import REGISTRY, Registry

META_SPEC = "fxprune.spec"


class OpSemanticsPass(PassBase):
    name = "op_semantics"

    def __init__(self, registry: Registry = REGISTRY):
        super().__init__()
        self.registry = registry

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        lookup = Lookup(gm)
        for node in gm.graph.nodes:
            if node.op in ("call_module", "call_function", "call_method"):
                module = lookup.module(node.target) if node.op == "call_module" else None
                node.meta[META_SPEC] = self.registry.lookup(node, module)
        return PassResult(gm, False)
