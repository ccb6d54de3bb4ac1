"""fxprune's analysis and rewrite passes over torch.fx GraphModules.

Pipeline (see :class:`Pipeline`): trace -> shape_prop -> op_semantics -> channel_deps ->
symbolic_shapes; then the prune rewrite builds the slim model.
"""
from . import ops_aten, ops_attention, ops_full_count, ops_library, ops_nn, ops_tensor  # noqa: F401  (op semantics)
from .channel_deps import ChannelAnalysis, ChannelDepsPass, build_groups, walk
from .channels import ANY, CONST, ZERO, TensorChannels, Track
from .op_semantics import OpSemanticsPass
from .pipeline import Pipeline
from .prune_rewrite import prune_rewrite
from .registry import REGISTRY, OpSpec, register_function, register_method, register_module
from .shape_prop import ShapePropPass
from .symbolic import SymbolicShapes, SymbolicShapesPass
from .trace import FxPruneTracer, export, trace

__all__ = [
    "ANY", "CONST", "ZERO", "ChannelAnalysis", "ChannelDepsPass", "FxPruneTracer", "OpSemanticsPass", "OpSpec",
    "Pipeline", "REGISTRY", "ShapePropPass", "SymbolicShapes", "SymbolicShapesPass", "TensorChannels", "Track",
    "build_groups", "export", "prune_rewrite", "register_function", "register_method", "register_module", "trace", "walk",
]
