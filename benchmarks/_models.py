"""Models shared by the benchmarks and the torchvision zoo test.

One place that says, for every torchvision classification and segmentation model, how to
build it with random weights and which (small) input it takes, plus a synthetic residual
network whose depth can be dialled up to measure how analysis time grows with graph size.

Input sizes are the smallest convenient ones that the architecture accepts, so that the
whole zoo runs on a laptop CPU: 64x64 for almost every CNN, 80x80 for inception_v3 (its stem
needs at least 75), 224x224 for maxvit_t (every stage's feature map must be a multiple of its
7x7 partitions, so 224 is the least it takes). ViTs are built with ``image_size`` equal to
their (small) input size; that only shortens the learned position embedding, the layers are
the same as at 224.

Builders never download anything: ``weights=None`` everywhere and ``weights_backbone=None``
for the segmentation models.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torchvision import models as tvm

CLASSIFICATION: List[str] = sorted(tvm.list_models(module=tvm))
SEGMENTATION: List[str] = sorted(tvm.list_models(module=tvm.segmentation))
ALL: List[str] = CLASSIFICATION + SEGMENTATION

# Architectures built from attention blocks (token mixing, LayerNorm over channels, relative
# position tables). Their groups may legitimately be frozen or inexact; a CNN has none of them.
TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit")

# Side length of the square input each model is run at (default 64).
_SIDE: Dict[str, int] = {
    "inception_v3": 80,
    "maxvit_t": 224,
    "vit_h_14": 56,  # patch 14: 4x4 patches
}

# Extra constructor arguments (besides weights=None).
_KWARGS: Dict[str, dict] = {
    # Explicit init_weights silences a FutureWarning; it is the default's behaviour. Their
    # auxiliary heads run in training mode only, so the eval-mode graph leaves them out.
    "googlenet": {"init_weights": True},
    "inception_v3": {"init_weights": True},
}


def is_transformer(name: str) -> bool:
    return name.startswith(TRANSFORMER_PREFIXES)


def input_side(name: str) -> int:
    return _SIDE.get(name, 64)


def input_shape(name: str, batch: int = 1) -> Tuple[int, int, int, int]:
    side = input_side(name)
    return (batch, 3, side, side)


def build(name: str, seed: int = 0, fill_zeros: bool = True, side: int = 0) -> nn.Module:
    """The torchvision model ``name`` with random weights, in eval mode, for inputs of ``side``
    pixels (0: :func:`input_side`; only ViTs depend on it, through their position embedding).

    With ``fill_zeros`` every parameter that the model's own initialisation leaves all zero
    (biases, ViT's classification head) is drawn from N(0, 0.02^2) instead: a zero head makes
    the output identically zero, and zero biases hide mistakes about the constants a removed
    channel leaves behind, so a test on such a model would prove nothing.
    """
    kwargs = dict(_KWARGS.get(name, {}))
    if name in SEGMENTATION:
        kwargs.setdefault("weights_backbone", None)
    if name.startswith("vit_"):
        kwargs.setdefault("image_size", side or input_side(name))
    torch.manual_seed(seed)
    model = tvm.get_model(name, weights=None, **kwargs)
    if fill_zeros:
        fill_zero_params(model, seed)
    return model.eval()


@torch.no_grad()
def fill_zero_params(model: nn.Module, seed: int = 0) -> int:
    """Redraw every all-zero floating-point parameter from N(0, 0.02^2); returns how many."""
    gen = torch.Generator().manual_seed(seed + 1)
    n = 0
    for p in model.parameters():
        if p.is_floating_point() and p.numel() and not p.any():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
            n += 1
    return n


def example_inputs(name: str, batch: int = 1, seed: int = 0,
                   dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*input_shape(name, batch), generator=gen, dtype=dtype),)


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------
# Synthetic residual network: stem conv, then ``blocks`` x (conv-bn-relu-conv-bn + identity,
# relu), then global pooling and a linear head. Every block adds a constant number of graph
# nodes, so analysis time should grow linearly in ``blocks``.


class BasicBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + x)


class ResidualNet(nn.Module):
    def __init__(self, blocks: int, channels: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def build_synthetic(blocks: int, channels: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return ResidualNet(blocks, channels).eval()


SYNTHETIC_SIDE = 16  # input side for the synthetic nets: graph size, not pixels, is measured

# Models of the compile-time benchmark: (label, builder, example_inputs).
COMPILE_TIME_MODELS = ["resnet50", "densenet121", "convnext_tiny", "efficientnet_b0", "regnet_y_400mf", "vit_b_16",
                       "resnet_synth_100", "resnet_synth_1000"]


def build_for_benchmark(label: str, side: int = 0) -> Tuple[nn.Module, Tuple[torch.Tensor]]:
    """A model of COMPILE_TIME_MODELS (or any zoo name) and its example inputs.

    ``side`` overrides the zoo model's input side (0: the small default of :func:`input_side`);
    the synthetic nets always take ``SYNTHETIC_SIDE``.
    """
    gen = torch.Generator().manual_seed(0)
    if label.startswith("resnet_synth_"):
        blocks = int(label.rsplit("_", 1)[1])
        x = torch.randn(1, 3, SYNTHETIC_SIDE, SYNTHETIC_SIDE, generator=gen)
        return build_synthetic(blocks), (x,)
    side = side or input_side(label)
    return build(label, side=side), (torch.randn(1, 3, side, side, generator=gen),)


__all__ = [
    "ALL", "CLASSIFICATION", "SEGMENTATION", "COMPILE_TIME_MODELS", "ResidualNet",
    "build", "build_for_benchmark", "build_synthetic", "example_inputs", "fill_zero_params", "input_shape",
    "input_side", "is_transformer", "num_params",
]
