"""The official checkpoint layout of the `tiny_vit` family: MobileSAM's and Light HQ-SAM's TinyViT keys."""

import math
import re
from collections.abc import Mapping
from typing import Any

from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import TinyViTConfig
from finesam.model.registry import EncoderChain
from finesam.model.tiny_vit import (
    BatchNorm2d,
    BiasedAttention,
    Conv2dBN,
    ConvStem,
    LocalConv,
    MBConv,
    MBConvStage,
    PatchMerging,
    TinyViTBlock,
    TinyViTStage,
)
from finesam.weights.layouts import Checkpoint, CheckpointLayout, count, neck_modules, shape_of

# the ImageNet classifier head TinyViT checkpoints carry; SAM never uses it
UNUSED_KEY = re.compile(r"image_encoder\.(norm_head|head)\.")


def recognises(state_dict: Mapping[str, Tensor]) -> bool:
    """TinyViT's convolutional stem (`patch_embed.seq`) or its stages (`layers`)."""
    return any(key.startswith(("image_encoder.patch_embed.seq.", "image_encoder.layers.")) for key in state_dict)


def infer_encoder(state_dict: Mapping[str, Tensor]) -> tuple[TinyViTConfig, int]:
    """TinyViT stage widths, depths, and the heads and windows of its attention stages; input size 1024 (the
    weights do not depend on it)."""
    dims = [shape_of(state_dict, "image_encoder.layers.0.blocks.0.conv1.c.weight")[1]]
    heads, windows = [], []
    for s in (1, 2, 3):
        num_heads, num_offsets = shape_of(state_dict, f"image_encoder.layers.{s}.blocks.0.attn.attention_biases")
        dims.append(shape_of(state_dict, f"image_encoder.layers.{s}.blocks.0.attn.qkv.weight")[1])
        heads.append(num_heads)
        windows.append(math.isqrt(num_offsets))  # one offset per (|dy|, |dx|): window x window of them
    depths = [count(state_dict, rf"image_encoder\.layers\.{s}\.blocks\.(\d+)\..*") for s in range(4)]
    config = TinyViTConfig(
        dims=(dims[0], dims[1], dims[2], dims[3]),
        depths=(depths[0], depths[1], depths[2], depths[3]),
        heads=(heads[0], heads[1], heads[2]),
        windows=(windows[0], windows[1], windows[2]),
        mbconv_expand=shape_of(state_dict, "image_encoder.layers.0.blocks.0.conv1.c.weight")[0] / dims[0],
    )
    return config, 1024


def _conv_bn(prefix: str, layer: Conv2dBN) -> list[tuple[str, fl.Module]]:
    return [(f"{prefix}.c", layer.ensure_find(fl.Conv2d)), (f"{prefix}.bn", layer.ensure_find(BatchNorm2d))]


def modules(encoder: EncoderChain[Any]) -> list[tuple[str, fl.Module]]:
    """Stem, MBConv stage, attention stages (with their patch mergings) and neck, by the chain's structure."""
    stem = list(encoder.ensure_find(ConvStem).layers(Conv2dBN))
    pairs = _conv_bn("image_encoder.patch_embed.seq.0", stem[0]) + _conv_bn("image_encoder.patch_embed.seq.2", stem[1])
    stages = [encoder.ensure_find(MBConvStage), *(s for s, _ in encoder.walk(TinyViTStage))]
    for s, stage in enumerate(stages):
        prefix = f"image_encoder.layers.{s}"
        for i, block in enumerate(m for m in stage if isinstance(m, MBConv | TinyViTBlock)):
            if isinstance(block, MBConv):
                for j, conv in enumerate(block.layers(Conv2dBN), start=1):
                    pairs += _conv_bn(f"{prefix}.blocks.{i}.conv{j}", conv)
                continue
            norm, mlp_norm = block.layers(fl.LayerNorm)
            qkv, proj, fc1, fc2 = block.layers(fl.Linear)
            pairs += [
                (f"{prefix}.blocks.{i}.attn.norm", norm),
                (f"{prefix}.blocks.{i}.attn.qkv", qkv),
                (f"{prefix}.blocks.{i}.attn", block.ensure_find(BiasedAttention)),
                (f"{prefix}.blocks.{i}.attn.proj", proj),
                (f"{prefix}.blocks.{i}.mlp.norm", mlp_norm),
                (f"{prefix}.blocks.{i}.mlp.fc1", fc1),
                (f"{prefix}.blocks.{i}.mlp.fc2", fc2),
                *_conv_bn(f"{prefix}.blocks.{i}.local_conv", block.ensure_find(LocalConv).ensure_find(Conv2dBN)),
            ]
        if merge := stage.find(PatchMerging):
            for j, conv in enumerate(merge.layers(Conv2dBN), start=1):
                pairs += _conv_bn(f"{prefix}.downsample.conv{j}", conv)
    return pairs + neck_modules(encoder)


_HQ_REPO = "lkeab/hq-sam"

LAYOUT = CheckpointLayout(
    family="tiny_vit",
    recognises=recognises,
    infer_encoder=infer_encoder,
    modules=modules,
    unused=lambda key: UNUSED_KEY.match(key) is not None,
    checkpoints=(
        Checkpoint(
            "sam_hq_vit_tiny",
            f"https://huggingface.co/{_HQ_REPO}/resolve/main/sam_hq_vit_tiny.pth",
            None,
            None,
            "Light HQ-SAM (TinyViT)",
            _HQ_REPO,
            "vit_tiny",
        ),
        Checkpoint(
            "mobile_sam",
            "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            None,
            None,
            "MobileSAM (TinyViT)",
            preset="vit_tiny",
        ),
    ),
)
