"""Official SAM `state_dict` -> finesam `state_dict`, with an explicit key map and no forward pass.

The map pairs each official module prefix with the finesam module that holds the same weights; the finesam
module is found by the structure of the chains (not by generated names), so the map reads like the
official model. The configuration (ViT-B/L/H or any other size) is read off the tensor shapes.
"""

import math
import re
from collections.abc import Callable, Mapping

import torch
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import DecoderConfig, SAMConfig, TinyViTConfig, ViTConfig
from finesam.model.image_encoder import ImageEncoder, Neck, RelativePositionAttention, TransformerBlock
from finesam.model.mask_decoder import IoUHead, MaskHypernetworks, OutputTokens, UpscaledImageEmbedding
from finesam.model.prompt_encoder import FourierPositionalEncoding, MaskEncoder, NoMaskEmbedding, PointTypeEmbedding
from finesam.model.sam import SegmentAnything
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
    TinyViTEncoder,
    TinyViTStage,
)
from finesam.model.transformer import (
    ImageToTokenAttention,
    TokenFeedForward,
    TokenSelfAttention,
    TokenToImageAttention,
    TwoWayAttentionBlock,
    TwoWayTransformer,
)
from finesam.weights.io import CheckpointError
from finesam.weights.key_map import Rule, apply_rules, rules_for

UNUSED_KEY = re.compile(r"image_encoder\.(norm_head|head)\.")


def is_unused_key(key: str) -> bool:
    """Keys SAM never uses: the ImageNet classifier head TinyViT checkpoints carry (`norm_head`, `head`)."""
    return UNUSED_KEY.match(key) is not None


def _count(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.fullmatch(pattern, key))}
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: Mapping[str, Tensor], decoder_heads: int = 8) -> SAMConfig:
    """The `SAMConfig` of an official SAM, MobileSAM or HQ-SAM `state_dict`, from its tensor shapes.

    Only the number of decoder attention heads cannot be seen in the shapes (8 in every official release).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise CheckpointError(f"not a SAM checkpoint: key {key!r} is missing")
        return tuple(state_dict[key].shape)

    decoder = DecoderConfig(
        prompt_dim=shape("image_encoder.neck.0.weight")[0],
        mask_in_channels=shape("prompt_encoder.mask_downscaling.3.weight")[0],
        depth=_count(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight"),
        heads=decoder_heads,
        mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=_count(state_dict, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
    )
    if "image_encoder.patch_embed.seq.0.c.weight" in state_dict:
        return SAMConfig(_tiny_vit_config(state_dict, shape), decoder)  # input size not in the weights: 1024
    dim, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    depth = _count(state_dict, r"image_encoder\.blocks\.(\d+)\.norm1\.weight")
    rel_pos = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    global_blocks = tuple(i for i, (length, _) in enumerate(rel_pos) if length == 2 * grid - 1)
    windows = {(length + 1) // 2 for length, _ in rel_pos if length != 2 * grid - 1}
    if len(windows) > 1:
        raise CheckpointError(f"blocks use different window sizes {sorted(windows)}; finesam supports one")
    head_dim = rel_pos[0][1] if rel_pos else dim
    encoder = ViTConfig(
        dim=dim,
        depth=depth,
        heads=dim // head_dim,
        global_attention_blocks=global_blocks,
        window_size=windows.pop() if windows else ViTConfig.window_size,
        mlp_ratio=shape("image_encoder.blocks.0.mlp.lin1.weight")[0] / dim,
        patch_size=patch,
    )
    return SAMConfig(encoder, decoder, image_size=grid * patch)


def _tiny_vit_config(state_dict: Mapping[str, Tensor], shape: Callable[[str], tuple[int, ...]]) -> TinyViTConfig:
    """TinyViT stage widths, depths, and the heads and windows of its attention stages."""
    dims = [shape("image_encoder.layers.0.blocks.0.conv1.c.weight")[1]]
    heads, windows = [], []
    for s in (1, 2, 3):
        num_heads, num_offsets = shape(f"image_encoder.layers.{s}.blocks.0.attn.attention_biases")
        dims.append(shape(f"image_encoder.layers.{s}.blocks.0.attn.qkv.weight")[1])
        heads.append(num_heads)
        windows.append(math.isqrt(num_offsets))  # one offset per (|dy|, |dx|): window x window of them
    depths = [_count(state_dict, rf"image_encoder\.layers\.{s}\.blocks\.(\d+)\..*") for s in range(4)]
    return TinyViTConfig(
        dims=(dims[0], dims[1], dims[2], dims[3]),
        depths=(depths[0], depths[1], depths[2], depths[3]),
        heads=(heads[0], heads[1], heads[2]),
        windows=(windows[0], windows[1], windows[2]),
        mbconv_expand=shape("image_encoder.layers.0.blocks.0.conv1.c.weight")[0] / dims[0],
    )


def _vit_modules(encoder: ImageEncoder) -> list[tuple[str, fl.Module]]:
    pairs: list[tuple[str, fl.Module]] = [
        ("image_encoder.patch_embed.proj", encoder.layer(("PatchEmbedding", "Conv2d"), fl.Conv2d))
    ]
    for i, (block, _) in enumerate(encoder.walk(TransformerBlock)):
        norm1, norm2 = block.layers(fl.LayerNorm)
        qkv, proj, lin1, lin2 = block.layers(fl.Linear)
        prefix = f"image_encoder.blocks.{i}"
        pairs += [
            (f"{prefix}.norm1", norm1),
            (f"{prefix}.attn.qkv", qkv),
            (f"{prefix}.attn", block.ensure_find(RelativePositionAttention)),
            (f"{prefix}.attn.proj", proj),
            (f"{prefix}.norm2", norm2),
            (f"{prefix}.mlp.lin1", lin1),
            (f"{prefix}.mlp.lin2", lin2),
        ]
    return pairs


def _conv_bn(prefix: str, layer: Conv2dBN) -> list[tuple[str, fl.Module]]:
    return [(f"{prefix}.c", layer.ensure_find(fl.Conv2d)), (f"{prefix}.bn", layer.ensure_find(BatchNorm2d))]


def _tiny_vit_modules(encoder: TinyViTEncoder) -> list[tuple[str, fl.Module]]:
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
    return pairs


def _modules(model: SegmentAnything) -> list[tuple[str, fl.Module]]:
    """(official module prefix, finesam module) pairs whose parameters have the same names and shapes."""
    encoder = model.image_encoder
    pairs = _tiny_vit_modules(encoder) if isinstance(encoder, TinyViTEncoder) else _vit_modules(encoder)
    neck = encoder.ensure_find(Neck)
    pairs += [(f"image_encoder.neck.{i}", layer) for i, layer in enumerate(list(neck)[1:])]  # after the Permute
    mask_encoder = model.ensure_find(MaskEncoder)
    pairs += [
        (f"prompt_encoder.mask_downscaling.{i}", layer)
        for i, layer in zip((0, 1, 3, 4, 6), [m for m in mask_encoder if not isinstance(m, fl.GeLU)], strict=True)
    ]
    pairs.append(("prompt_encoder.no_mask_embed", model.ensure_find(NoMaskEmbedding)))

    def attention(prefix: str, layer: fl.Attention) -> list[tuple[str, fl.Module]]:
        q, k, v, out = layer.layers(fl.Linear)
        return [(f"{prefix}.q_proj", q), (f"{prefix}.k_proj", k), (f"{prefix}.v_proj", v), (f"{prefix}.out_proj", out)]

    transformer = model.ensure_find(TwoWayTransformer)
    for i, (block, _) in enumerate(transformer.walk(TwoWayAttentionBlock)):
        prefix = f"mask_decoder.transformer.layers.{i}"
        self_attn, to_image = block.ensure_find(TokenSelfAttention), block.ensure_find(TokenToImageAttention)
        feed_forward, to_tokens = block.ensure_find(TokenFeedForward), block.ensure_find(ImageToTokenAttention)
        lin1, lin2 = feed_forward.layers(fl.Linear)
        pairs += attention(f"{prefix}.self_attn", self_attn.ensure_find(fl.Attention))
        pairs += attention(f"{prefix}.cross_attn_token_to_image", to_image.ensure_find(fl.Attention))
        pairs += attention(f"{prefix}.cross_attn_image_to_token", to_tokens.ensure_find(fl.Attention))
        pairs += [
            (f"{prefix}.norm1", self_attn.ensure_find(fl.LayerNorm)),
            (f"{prefix}.norm2", to_image.ensure_find(fl.LayerNorm)),
            (f"{prefix}.mlp.lin1", lin1),
            (f"{prefix}.mlp.lin2", lin2),
            (f"{prefix}.norm3", feed_forward.ensure_find(fl.LayerNorm)),
            (f"{prefix}.norm4", to_tokens.ensure_find(fl.LayerNorm)),
        ]
    final = transformer.layer(-1, TokenToImageAttention)
    pairs += attention("mask_decoder.transformer.final_attn_token_to_image", final.ensure_find(fl.Attention))
    pairs.append(("mask_decoder.transformer.norm_final_attn", final.ensure_find(fl.LayerNorm)))
    upscaling = model.ensure_find(UpscaledImageEmbedding)
    pairs += [
        (f"mask_decoder.output_upscaling.{i}", layer)
        for i, layer in zip((0, 1, 3), [m for m in upscaling if isinstance(m, fl.WeightedModule)], strict=True)
    ]
    for i, hypernetwork in enumerate(model.ensure_find(MaskHypernetworks)):
        assert isinstance(hypernetwork, fl.Chain)
        pairs += [
            (f"mask_decoder.output_hypernetworks_mlps.{i}.layers.{j}", linear)
            for j, linear in enumerate(hypernetwork.layers(fl.Linear))
        ]
    pairs += [
        (f"mask_decoder.iou_prediction_head.layers.{j}", linear)
        for j, linear in enumerate(model.ensure_find(IoUHead).layers(fl.Linear))
    ]
    return pairs


def sam_key_map(model: SegmentAnything) -> dict[str, Rule]:
    """For every key of `model.state_dict()`, the official key(s) it is made from."""
    names = {id(module): name for name, module in model.named_modules()}

    def key(module: torch.nn.Module, tensor: str) -> str:
        return f"{names[id(module)]}.{tensor}"

    rules = rules_for(model, _modules(model))
    if isinstance(encoder := model.image_encoder, ImageEncoder):
        position = encoder.layer(("PositionEmbedding", "Parameter"), fl.Parameter)
        rules[key(position, "weight")] = Rule(("image_encoder.pos_embed",), lambda t: t[0])
    fourier = model.ensure_find(FourierPositionalEncoding)
    rules[key(fourier, "gaussian_matrix")] = Rule(("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",))
    point_types = (
        "prompt_encoder.not_a_point_embed.weight",
        *(f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4)),
    )
    rules[key(model.ensure_find(PointTypeEmbedding), "weight")] = Rule(point_types, lambda *ts: torch.cat(ts))
    rules[key(model.ensure_find(OutputTokens), "weight")] = Rule(
        ("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"), lambda *ts: torch.cat(ts)
    )
    return rules


def convert_state_dict(
    official: Mapping[str, Tensor], model: SegmentAnything, ignore: Callable[[str], bool] = lambda _: False
) -> dict[str, Tensor]:
    """Maps an official SAM `state_dict` onto `model`'s keys (see `apply_rules`)."""
    return apply_rules(official, sam_key_map(model), model.state_dict(), ignore)
