"""Mixture-of-experts layers with stacked expert weights, made prunable expert by expert.

HuggingFace transformers 5 stores the experts of every mixture-of-experts model (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek, ...) in one module whose weights are 3-D tensors
``gate_up_proj[E, 2I, H]`` (or ``up_proj``) and ``down_proj[E, H, I]`` (transposed in some
models), made by the ``transformers.integrations.moe.use_experts_implementation`` decorator
that also gives the module its layout flags (``has_gate``, ``has_bias``, ``is_transposed``,
``is_concatenated``, ``has_post_expert_norm``). Its implementations ("grouped_mm",
"batched_mm", the eager loop) compute all experts with one batched op or index the stacked
tensor by a routed expert id, so an expert's intermediate width cannot differ from another's:
pruning in that layout can only remove a channel from every expert at once.

To prune each expert's MLP on its own, region compile replaces such a module (in the
program's module, never in the user's model) by an :class:`ExpertDispatch`: one
:class:`ExpertMLP` per expert, whose ``nn.Linear`` weights are *views* of the stacked tensors
(training the program's module writes into the user's stacked weights; gradients are the
views'), and the token dispatch of transformers' eager implementation (the same routing and
weighting; sums may be taken in another order than the default ``grouped_mm``). Every expert
is called on every forward pass (possibly with no tokens), so each is recorded, and each is a
region of its own: its intermediate width is a group of its own, while the router's output
(the number of experts) and the expert outputs are region boundaries.

The gate is the module's own ``_apply_gate`` (``act(gate) * up`` by default), so a model's
custom gate (GPT-OSS's clamped interleaved SwiGLU) is computed exactly as transformers does;
where it slices the interleaved halves with a stride, its channels stay frozen.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def is_stacked_experts(module: nn.Module) -> bool:
    """A transformers experts module with stacked 3-D weights (see the module docstring)."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or not all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed",
                                                                       "is_concatenated")):
        return False
    names = ("gate_up_proj", "down_proj") if module.has_gate else ("up_proj", "down_proj")
    ws = [getattr(module, a, None) for a in names]
    return all(isinstance(w, nn.Parameter) and w.dim() == 3 and w.shape[0] == n for w in ws)


def stacked_experts(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every stacked experts module of ``model``."""
    return [(name, m) for name, m in model.named_modules() if name and is_stacked_experts(m)]


def _view_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` whose weight ``[out, in]`` and bias are parameters viewing the given
    tensors (shared storage)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return lin


class ExpertMLP(nn.Module):
    """Expert ``e`` of a stacked experts module, with its own ``nn.Linear`` layers viewing the
    stacked weights: ``down(_apply_gate(gate_up(x)))`` (``down(act(up(x)))`` without a gate),
    then the module's ``post_expert_norm`` if it has one. ``x: [tokens, hidden]``."""

    def __init__(self, experts: nn.Module, e: int):
        super().__init__()
        tr = bool(experts.is_transposed)
        grad = experts.down_proj.requires_grad

        def w(name: str) -> torch.Tensor:
            t = getattr(experts, name).detach()[e]
            return t.t() if tr else t

        def b(name: str) -> Optional[torch.Tensor]:
            t = getattr(experts, name + "_bias", None) if experts.has_bias else None
            return None if t is None else t.detach()[e]

        self.has_gate = bool(experts.has_gate)
        first = "gate_up_proj" if self.has_gate else "up_proj"
        setattr(self, first, _view_linear(w(first), b(first), grad))
        self.down_proj = _view_linear(w("down_proj"), b("down_proj"), grad)
        if hasattr(experts, "act_fn"):
            self.act_fn = experts.act_fn
        self.post_expert_norm = getattr(experts, "post_expert_norm", None) if getattr(
            experts, "has_post_expert_norm", False) else None
        object.__setattr__(self, "_owner", experts)  # its _apply_gate (not a submodule: no second copy of weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_gate:
            h = type(self._owner)._apply_gate(self._owner, self.gate_up_proj(x))
        else:
            h = self.act_fn(self.up_proj(x))
        h = self.down_proj(h)
        if self.post_expert_norm is not None:
            h = self.post_expert_norm(h)
        return h


class ExpertDispatch(nn.ModuleList):
    """The experts of a stacked experts module as a list of :class:`ExpertMLP`, called like it:
    ``forward(hidden_states[T, H], top_k_index[T, k], top_k_weights[T, k]) -> [T, H]``, each
    token's output the routing-weighted sum of its experts' outputs (transformers' eager
    implementation). Every expert is called, with the tokens routed to it (possibly none)."""

    def __init__(self, experts: nn.Module):
        super().__init__([ExpertMLP(experts, e) for e in range(experts.num_experts)])
        self.num_experts = experts.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args, **kwargs) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        for e, expert in enumerate(self):
            top_k_pos, token_idx = torch.where(mask[e])
            out = expert(hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


def unstack_experts(model: nn.Module) -> nn.Module:
    """``model`` with every stacked experts module replaced by an :class:`ExpertDispatch`
    (modules on the way shallow-copied, see :func:`fxprune.regions.build.swap_in`); ``model``
    itself when it has none. ``model`` is not modified."""
    from fxprune.regions.build import swap_in

    found = stacked_experts(model)
    if not found:
        return model
    return swap_in(model, {name: ExpertDispatch(m) for name, m in found})


__all__ = ["ExpertDispatch", "ExpertMLP", "is_stacked_experts", "stacked_experts", "unstack_experts"]
