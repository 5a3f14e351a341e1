"""The official checkpoint layout of the `efficient_sam` family: EfficientSAM's `efficient_sam_vitt.pt` and
`efficient_sam_vits.pt` (`{"model": state_dict}`).

The image encoder is a ViT under SAM's prefixes (`image_encoder.blocks.*`, `image_encoder.neck.*`) with another
MLP naming (`mlp.fc1` / `fc2`), no relative positions and a (1, 1 + 14 * 14, C) `pos_embed`. The prompt encoder
has one embedding per labelled kind (`invalid_points`, `point_embeddings`, `bbox_top_left_embeddings`,
`bbox_bottom_right_embeddings`) and no mask keys; the decoder's MLPs are `layers.{j}.0` then `fc`, and its
upscaling is `final_output_upscaling_layers`. The layout gives the whole key map (`model_rules`).
"""

import math
from collections.abc import Mapping
from typing import Any

import torch
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import SAMConfig
from finesam.model.efficient_sam.config import EFFICIENT_SAM_PRESETS, EfficientSAMConfig, EfficientSAMDecoderConfig
from finesam.model.efficient_sam.encoder import GlobalAttention, PretrainPositionTable, ViTBlock
from finesam.model.efficient_sam.mask_decoder import (
    EfficientSAMTransformer,
    GroupNormUpscaling,
)
from finesam.model.efficient_sam.prompt_encoder import PointLabelEmbedding
from finesam.model.image_encoder import FeedForward
from finesam.model.mask_decoder import IoUHead, MaskHypernetworks, OutputTokens
from finesam.model.prompt_encoder import FourierPositionalEncoding
from finesam.model.registry import EncoderChain
from finesam.weights.key_map import Rule, rules_for
from finesam.weights.layouts import Checkpoint, CheckpointLayout, KeyOf, count, neck_modules, shape_of
from finesam.weights.layouts import vit as vit_layout
from finesam.weights.sam_keys import two_way_modules

ENCODER, PROMPT, DECODER = "image_encoder", "prompt_encoder", "mask_decoder"
# the head width of both releases (192 / 3, 384 / 6): the weights do not show the number of heads
HEAD_DIM = 64
POINT_KINDS = ("invalid_points", "point_embeddings", "bbox_top_left_embeddings", "bbox_bottom_right_embeddings")


def recognises(state_dict: Mapping[str, Tensor]) -> bool:
    """EfficientSAM's prompt encoder (`prompt_encoder.invalid_points`)."""
    return f"{PROMPT}.invalid_points.weight" in state_dict


def infer_encoder(state_dict: Mapping[str, Tensor]) -> tuple[EfficientSAMConfig, int]:
    """The ViT's width, depth, MLP ratio and pretraining grid from the shapes; heads at 64 channels each (both
    releases); input size 1024 (the position table is resized to any grid)."""
    dim, _, patch, _ = shape_of(state_dict, f"{ENCODER}.patch_embed.proj.weight")
    positions = shape_of(state_dict, f"{ENCODER}.pos_embed")[1] - 1
    config = EfficientSAMConfig(
        dim=dim,
        depth=count(state_dict, r"image_encoder\.blocks\.(\d+)\.norm1\.weight"),
        heads=max(1, dim // HEAD_DIM),
        mlp_ratio=shape_of(state_dict, f"{ENCODER}.blocks.0.mlp.fc1.weight")[0] / dim,
        patch_size=patch,
        pretrain_grid=math.isqrt(positions),
    )
    return config, 1024


def infer_config(state_dict: Mapping[str, Tensor]) -> SAMConfig:
    """The configuration of an official EfficientSAM `state_dict`; the release's name when it is one."""
    encoder, image_size = infer_encoder(state_dict)
    config = SAMConfig(
        encoder,
        EfficientSAMDecoderConfig(
            prompt_dim=shape_of(state_dict, f"{ENCODER}.neck.0.weight")[0],
            depth=count(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight"),
            mlp_dim=shape_of(state_dict, f"{DECODER}.transformer.layers.0.mlp.layers.0.0.weight")[0],
            num_multimask_outputs=shape_of(state_dict, f"{DECODER}.mask_tokens.weight")[0] - 1,
            # its hidden layers, then `fc`
            iou_head_depth=count(state_dict, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.0\.weight") + 1,
            iou_head_hidden_dim=shape_of(state_dict, f"{DECODER}.iou_prediction_head.layers.0.0.weight")[0],
        ),
        image_size=image_size,
    )
    name = next((p.name for p in EFFICIENT_SAM_PRESETS if p == config), "custom")
    return SAMConfig(config.encoder, config.decoder, config.image_size, name=name)


def encoder_modules(encoder: EncoderChain[Any]) -> list[tuple[str, fl.Module]]:
    """Patch embedding, blocks and neck, by the structure of the chain."""
    pairs: list[tuple[str, fl.Module]] = [
        (f"{ENCODER}.patch_embed.proj", encoder.layer(("PatchEmbedding", "Conv2d"), fl.Conv2d))
    ]
    for i, (block, _) in enumerate(encoder.walk(ViTBlock)):
        norm1, norm2 = block.layers(fl.LayerNorm)
        qkv, proj = block.ensure_find(GlobalAttention).layers(fl.Linear)
        fc1, fc2 = block.ensure_find(FeedForward).layers(fl.Linear)
        prefix = f"{ENCODER}.blocks.{i}"
        pairs += [
            (f"{prefix}.norm1", norm1),
            (f"{prefix}.attn.qkv", qkv),
            (f"{prefix}.attn.proj", proj),
            (f"{prefix}.norm2", norm2),
            (f"{prefix}.mlp.fc1", fc1),
            (f"{prefix}.mlp.fc2", fc2),
        ]
    return pairs + neck_modules(encoder)


def encoder_rules(encoder: EncoderChain[Any], key: KeyOf) -> dict[str, Rule]:
    """The position table keeps the official shape: a one-to-one rule under another name."""
    return {key(encoder.ensure_find(PretrainPositionTable), "weight"): Rule((f"{ENCODER}.pos_embed",))}


def _mlp_block(prefix: str, mlp: fl.Chain) -> list[tuple[str, fl.Module]]:
    """An official `MLPBlock`: `layers.{j}.0` (each a linear with its activation), then `fc`."""
    *hidden, last = mlp.layers(fl.Linear)
    pairs: list[tuple[str, fl.Module]] = [(f"{prefix}.layers.{j}.0", linear) for j, linear in enumerate(hidden)]
    return [*pairs, (f"{prefix}.fc", last)]


def decoder_modules(model: Any) -> list[tuple[str, fl.Module]]:
    """The mask decoder's one-to-one pairs: the two-way blocks, the final attention, the upscaling, the
    hypernetworks and the IoU head."""
    transformer = model.ensure_find(EfficientSAMTransformer)
    # the official `mlp` of a block is an `MLPBlock` (`layers.0.0`, then `fc`)
    pairs = two_way_modules(transformer, f"{DECODER}.transformer", ("mlp.layers.0.0", "mlp.fc"))
    upscaling = model.ensure_find(GroupNormUpscaling)
    first, norm, second = [m for m in upscaling if isinstance(m, fl.WeightedModule)]
    up = f"{DECODER}.final_output_upscaling_layers"
    pairs += [(f"{up}.0.0", first), (f"{up}.0.1", norm), (f"{up}.1.0", second)]
    for i, hypernetwork in enumerate(model.ensure_find(MaskHypernetworks)):
        assert isinstance(hypernetwork, fl.Chain)
        pairs += _mlp_block(f"{DECODER}.output_hypernetworks_mlps.{i}", hypernetwork)
    return pairs + _mlp_block(f"{DECODER}.iou_prediction_head", model.ensure_find(IoUHead))


def model_rules(model: Any, key: KeyOf) -> dict[str, Rule]:
    """Every tensor of an `EfficientSAM`: the encoder's, the prompt encoder's (the four label embeddings as one
    table) and the decoder's (the IoU and mask tokens as one)."""
    encoder = model.image_encoder
    rules = rules_for(model, encoder_modules(encoder) + decoder_modules(model)) | encoder_rules(encoder, key)
    kinds = tuple(f"{PROMPT}.{kind}.weight" for kind in POINT_KINDS)
    tokens = (f"{DECODER}.iou_token.weight", f"{DECODER}.mask_tokens.weight")
    return rules | {
        key(model.ensure_find(FourierPositionalEncoding), "gaussian_matrix"): Rule(
            (f"{PROMPT}.pe_layer.positional_encoding_gaussian_matrix",)
        ),
        key(model.ensure_find(PointLabelEmbedding), "weight"): Rule(kinds, lambda *ts: torch.cat(ts)),
        key(model.ensure_find(OutputTokens), "weight"): Rule(tokens, lambda *ts: torch.cat(ts)),
    }


_REPOSITORY = "https://github.com/yformer/EfficientSAM"

LAYOUT = CheckpointLayout(
    family="efficient_sam",
    recognises=recognises,
    infer_encoder=infer_encoder,
    modules=encoder_modules,
    rules=encoder_rules,
    # the ViT layout claims every `image_encoder.blocks.*` checkpoint (and SlimSAM's refines it): asked before both
    priority=vit_layout.LAYOUT.priority + 2,
    # ViT-S is published as a zip of its .pt (`weights/efficient_sam_vits.pt.zip`): unzip it, then convert
    checkpoints=(
        Checkpoint(
            "efficient_sam_vitt",
            f"{_REPOSITORY}/raw/main/weights/efficient_sam_vitt.pt",
            None,
            None,
            "EfficientSAM ViT-Ti",
            preset="efficient_sam_vitt",
            licence="Apache-2.0",
        ),
    ),
    infer_config=infer_config,
    model_rules=model_rules,
)
