"""Models that neither front end traces whole, shared by the region benchmarks and tests.

* ``DETECTION``: every model of ``torchvision.models.list_models(module=detection)``, random
  weights (``weights=None, weights_backbone=None``), eval mode, at a small input side. Their
  score thresholds are 0 so that every image yields a full set of detections to compare, and
  their batch norms are calibrated on the example image (``fxprune.testing.calibrate_norms``):
  a random network with random statistics saturates into features that are constant over
  space, whose exactly equal scores make the order of detections a matter of rounding.
* ``VIDEO``: torchvision's ``swin3d_t`` and ``mvit_v1_b`` (video) and ``raft_small`` (optical
  flow); ``mvit_v1_mini`` is MViT-v1's architecture at 4 blocks and 32x32x4 for the fast tests.
* ``MOE``: HuggingFace Mixtral and Qwen2-MoE at small configs (default experts
  implementation).

Nothing is downloaded: every builder takes random weights.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
import torch.nn as nn

DETECTION: List[str] = sorted(__import__("torchvision").models.list_models(
    module=__import__("torchvision").models.detection))
RESNET50_FPN = [n for n in DETECTION if "resnet50_fpn" in n]
VIDEO: List[str] = ["swin3d_t", "mvit_v1_b", "raft_small"]
MOE: List[str] = ["mixtral", "qwen2_moe"]

DETECTION_SIDE = 160  # input side (and min/max_size of the R-CNN/RetinaNet/FCOS transforms)


def _score_kwargs(name: str) -> dict:
    return {"box_score_thresh": 0.0} if "rcnn" in name else {"score_thresh": 0.0}


def build_detection(name: str, side: int = DETECTION_SIDE, seed: int = 0, calibrate: bool = True
                    ) -> Tuple[nn.Module, tuple]:
    """A torchvision detector with random weights and its example inputs ``([image],)``."""
    from torchvision.models import detection

    torch.manual_seed(seed)
    kwargs = dict(weights=None, weights_backbone=None, **_score_kwargs(name))
    if not name.startswith("ssd"):
        kwargs.update(min_size=side, max_size=side)
    model = getattr(detection, name)(**kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(3, side, side, generator=gen)
    if calibrate:
        from fxprune.testing import calibrate_norms

        second = torch.rand(3, side, side, generator=gen)  # two images: a 1x1 map still gives two values
        calibrate_norms(model, [image, second], seed=seed)
    return model, ([image],)


def mvit_v1_mini() -> nn.Module:
    """MViT-v1's blocks (pooling attention, no relative positions, class-token residual off) at
    4 blocks, 16-64 channels, 32x32 pixels and 4 frames."""
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    blocks = [MSBlockConfig(1, 16, 32, [], [3, 3, 3], [], [1, 4, 4]),
              MSBlockConfig(2, 32, 32, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 2, 2]),
              MSBlockConfig(2, 32, 64, [], [3, 3, 3], [], [1, 2, 2]),
              MSBlockConfig(4, 64, 64, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1])]
    return MViT(spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=False,
                residual_with_cls_embed=False, rel_pos_embed=False, proj_after_attn=False,
                stochastic_depth_prob=0.0, num_classes=10)


def build_video(name: str, seed: int = 0) -> Tuple[nn.Module, tuple]:
    """A video or optical-flow model with random weights and its example inputs."""
    import torchvision

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name == "swin3d_t":
        return torchvision.models.video.swin3d_t(weights=None).eval(), (torch.rand(1, 3, 4, 64, 64, generator=gen),)
    if name == "mvit_v1_b":
        return torchvision.models.video.mvit_v1_b(weights=None).eval(), (
            torch.rand(1, 3, 16, 224, 224, generator=gen),)
    if name == "mvit_v1_mini":
        return mvit_v1_mini().eval(), (torch.rand(1, 3, 4, 32, 32, generator=gen),)
    if name == "raft_small":
        # RAFT's correlation pyramid needs feature maps of at least 16x16: 128x128 images
        return torchvision.models.optical_flow.raft_small(weights=None).eval(), (
            torch.rand(1, 3, 128, 128, generator=gen), torch.rand(1, 3, 128, 128, generator=gen))
    raise KeyError(name)


def build_moe(name: str, seed: int = 0, layers: int = 2) -> Tuple[nn.Module, dict]:
    """A small HuggingFace mixture-of-experts causal LM (random weights, 4 experts of which each
    token takes 2, grouped-query attention) and its keyword example inputs."""
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
    if name == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        model = MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=4, **common))
    elif name == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=24,
                                                   shared_expert_intermediate_size=40, num_experts=4,
                                                   decoder_sparse_step=1, **common))
    else:
        raise KeyError(name)
    gen = torch.Generator().manual_seed(seed)
    return model.eval(), {"input_ids": torch.randint(0, 64, (1, 16), generator=gen), "use_cache": False}


BUILDERS: Dict[str, Callable] = {**{n: build_detection for n in DETECTION}, **{n: build_video for n in VIDEO},
                                 "mvit_v1_mini": build_video, **{n: build_moe for n in MOE}}


def build(name: str, seed: int = 0):
    """``(model, example_inputs)`` of any model above."""
    return BUILDERS[name](name, seed=seed)


__all__ = ["DETECTION", "RESNET50_FPN", "VIDEO", "MOE", "build", "build_detection", "build_video", "build_moe",
           "mvit_v1_mini"]
