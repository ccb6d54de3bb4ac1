"""Model factories for ``fxprune train``.

``--model`` is either a torchvision classification model name (``resnet18``, ``vgg11_bn``,
``mobilenet_v2``, ...), built untrained with ``num_classes`` outputs, or ``module:factory``:
a callable the user's code provides, called with ``num_classes=`` (and ``in_channels=`` when
it accepts it).

torchvision's ImageNet models shrink their input 4x in the stem (a 7x7 stride-2 conv and a
stride-2 max-pool for ResNets), which leaves almost nothing of a 32x32 image. For inputs of at
most :data:`SMALL_IMAGE` pixels, :func:`adapt_to_small_images` applies the usual CIFAR change:
the stem conv becomes 3x3 with stride 1, and a ResNet's stem max-pool is removed. Vision
transformers (ViT, Swin, MaxViT) keep their patch embedding; ViT and MaxViT are built for
``image_size``. GoogLeNet and Inception v3 are built without auxiliary classifiers.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError

SMALL_IMAGE = 64


def build(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """The model ``name`` (torchvision name or ``module:factory``), untrained."""
    if ":" in name:
        factory = _import_factory(name)
        kwargs = {"num_classes": num_classes}
        if "in_channels" in _parameters(factory):
            kwargs["in_channels"] = in_channels
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    check_name(name)
    import torchvision

    kwargs = {"weights": None, "num_classes": num_classes}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False  # one output, as every other classifier
    if name.startswith("vit_"):
        kwargs["image_size"] = image_size
    if name.startswith("maxvit_"):
        kwargs["input_size"] = (image_size, image_size)
    model = torchvision.models.get_model(name, **kwargs)
    # Transformers embed patches rather than shrink the image in a stem; they keep theirs.
    transformer = name.startswith(("vit_", "swin_", "maxvit_"))
    if image_size <= SMALL_IMAGE and not transformer:
        adapt_to_small_images(model, in_channels)
    elif in_channels != 3:
        raise ConfigError(f"--model {name}: torchvision's {name} takes 3 input channels, not {in_channels}",
                          "--model")
    return model


def check_name(name: str) -> None:
    """Raise ConfigError naming ``--model`` unless ``name`` is a torchvision classification
    model or an importable, callable ``module:factory`` (nothing is built)."""
    if ":" in name:
        _import_factory(name)
        return
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(f"--model must be a torchvision classification model name (e.g. resnet18) or "
                          f"module:factory, not {name!r}", "--model")


def adapt_to_small_images(model: nn.Module, in_channels: int = 3) -> nn.Module:
    """Give ``model`` a stem for small inputs (in place): its first conv becomes a 3x3,
    stride-1 conv reading ``in_channels`` channels, and a ResNet-style ``maxpool`` attribute
    becomes the identity."""
    name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)),
                      (None, None))
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d to adapt")
    model.set_submodule(name, nn.Conv2d(in_channels, conv.out_channels, kernel_size=3, stride=1,
                                        padding=1, bias=conv.bias is not None))
    if isinstance(getattr(model, "maxpool", None), nn.MaxPool2d):
        model.maxpool = nn.Identity()
    return model


def _norm(c: int, norm: bool) -> nn.Module:
    return nn.BatchNorm2d(c) if norm else nn.Identity()


class _Block(nn.Module):
    """A basic residual block: conv-bn-relu-conv-bn plus a (projected) shortcut; without
    ``norm``, biased convs and no BatchNorm."""

    def __init__(self, cin: int, cout: int, stride: int, norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)
        self.bn1 = _norm(cout, norm)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm)
        self.bn2 = _norm(cout, norm)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not norm),
                                          _norm(cout, norm))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A two-stage residual network, small enough for tests and quick demonstrations
    (``norm=False``: without BatchNorm)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 8, norm: bool = True):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=not norm),
                                  _norm(width, norm), nn.ReLU())
        self.layer1 = _Block(width, width, 1, norm)
        self.layer2 = _Block(width, 2 * width, 2, norm)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny_resnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """``--model fxprune.models:tiny_resnet``."""
    return TinyResNet(num_classes, in_channels)


def tiny_plain_resnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """``--model fxprune.models:tiny_plain_resnet``: :class:`TinyResNet` without BatchNorm. With
    no batch statistics, a data-parallel run takes the steps of one process with the same
    global batch."""
    return TinyResNet(num_classes, in_channels, norm=False)


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"--model {spec}: cannot import {module_name!r}: {e}", "--model") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"--model {spec}: {module_name} has no attribute {attr!r}", "--model")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"--model {spec} is not callable", "--model")
    return obj


def _parameters(fn: Callable) -> set:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()
