"""Official SAM `state_dict` -> finesam `state_dict`, with an explicit key map and no forward pass.

The map pairs each official module prefix with the finesam module that holds the same weights; the finesam
module is found by the structure of the chains (not by generated names), so the map reads like the
official model. The configuration (ViT-B/L/H or any other size) is read off the tensor shapes.
"""

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import SAMConfig
from finesam.model.image_encoder import ImageEncoder, RelativePositionAttention, TransformerBlock
from finesam.model.mask_decoder import IoUHead, MaskHypernetworks, OutputTokens, UpscaledImageEmbedding
from finesam.model.prompt_encoder import FourierPositionalEncoding, MaskEncoder, NoMaskEmbedding, PointTypeEmbedding
from finesam.model.sam import SegmentAnything
from finesam.model.transformer import (
    ImageToTokenAttention,
    TokenFeedForward,
    TokenSelfAttention,
    TokenToImageAttention,
    TwoWayAttentionBlock,
    TwoWayTransformer,
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not have the expected layout."""


@dataclass(frozen=True)
class Rule:
    """One finesam tensor made from one or more official tensors."""

    sources: tuple[str, ...]
    combine: Callable[..., Tensor] = lambda t: t


def _count(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := re.fullmatch(pattern, key))}
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: Mapping[str, Tensor], decoder_heads: int = 8) -> SAMConfig:
    """The `SAMConfig` of an official SAM `state_dict`, from its tensor shapes.

    Only the number of decoder attention heads cannot be seen in the shapes (8 in every official release).
    """

    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            if any(k.startswith("image_encoder.layers.") for k in state_dict):
                raise CheckpointError("this is a TinyViT checkpoint (MobileSAM / Light HQ-SAM), not supported yet")
            raise CheckpointError(f"not a SAM checkpoint: key {key!r} is missing")
        return tuple(state_dict[key].shape)

    encoder_dim, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    depth = _count(state_dict, r"image_encoder\.blocks\.(\d+)\.norm1\.weight")
    rel_pos = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    global_blocks = tuple(i for i, (length, _) in enumerate(rel_pos) if length == 2 * grid - 1)
    windows = {(length + 1) // 2 for length, _ in rel_pos if length != 2 * grid - 1}
    if len(windows) > 1:
        raise CheckpointError(f"blocks use different window sizes {sorted(windows)}; finesam supports one")
    head_dim = rel_pos[0][1] if rel_pos else encoder_dim
    return SAMConfig(
        image_size=grid * patch,
        patch_size=patch,
        encoder_dim=encoder_dim,
        encoder_depth=depth,
        encoder_heads=encoder_dim // head_dim,
        global_attention_blocks=global_blocks,
        window_size=windows.pop() if windows else 14,
        mlp_ratio=shape("image_encoder.blocks.0.mlp.lin1.weight")[0] / encoder_dim,
        prompt_dim=shape("image_encoder.neck.0.weight")[0],
        mask_in_channels=shape("prompt_encoder.mask_downscaling.3.weight")[0],
        decoder_depth=_count(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight"),
        decoder_heads=decoder_heads,
        decoder_mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=_count(state_dict, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
    )


def _modules(model: SegmentAnything) -> list[tuple[str, fl.Module]]:
    """(official module prefix, finesam module) pairs whose parameters have the same names and shapes."""
    pairs: list[tuple[str, fl.Module]] = []
    encoder = model.ensure_find(ImageEncoder)
    pairs.append(("image_encoder.patch_embed.proj", encoder.layer(("PatchEmbedding", "Conv2d"), fl.Conv2d)))
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
    neck = encoder.layer("Neck", fl.Chain)
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


def rules_for(root: torch.nn.Module, pairs: list[tuple[str, fl.Module]]) -> dict[str, Rule]:
    """One-to-one rules for (official prefix, module of `root`) pairs: every parameter keeps its name."""
    names = {id(module): name for name, module in root.named_modules()}
    return {
        f"{names[id(module)]}.{tensor}": Rule((f"{prefix}.{tensor}",))
        for prefix, module in pairs
        for tensor, _ in module.named_parameters(recurse=False)
    }


def sam_key_map(model: SegmentAnything) -> dict[str, Rule]:
    """For every key of `model.state_dict()`, the official key(s) it is made from."""
    names = {id(module): name for name, module in model.named_modules()}

    def key(module: torch.nn.Module, tensor: str) -> str:
        return f"{names[id(module)]}.{tensor}"

    rules = rules_for(model, _modules(model))
    position = model.ensure_find(ImageEncoder).layer(("PositionEmbedding", "Parameter"), fl.Parameter)
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


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def apply_rules(
    official: Mapping[str, Tensor],
    rules: Mapping[str, Rule],
    expected: Mapping[str, Tensor],
    ignore: Callable[[str], bool] = lambda _: False,
) -> dict[str, Tensor]:
    """Builds the `expected` tensors from an official `state_dict`, checking every key and shape.

    Raises `CheckpointError` naming the missing, unexpected (not `ignore`d) and mis-shaped keys.
    """
    missing = sorted({s for rule in rules.values() for s in rule.sources if s not in official})
    used = {s for rule in rules.values() for s in rule.sources}
    unexpected = sorted(k for k in official if k not in used and not ignore(k))
    converted: dict[str, Tensor] = {}
    misshaped: list[str] = []
    if not missing:
        for target, rule in rules.items():
            try:
                tensor = rule.combine(*(official[s] for s in rule.sources))
            except RuntimeError as e:
                misshaped.append(f"{'+'.join(rule.sources)} ({e})")
                continue
            if tensor.shape != expected[target].shape:
                sources = " + ".join(f"{s} {tuple(official[s].shape)}" for s in rule.sources)
                misshaped.append(f"{sources} -> expected {tuple(expected[target].shape)}")
                continue
            converted[target] = tensor.to(expected[target].dtype).contiguous()
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {_listing(misshaped)}")
    if problems:
        raise CheckpointError("checkpoint does not match the expected layout; " + "; ".join(problems))
    assert converted.keys() == expected.keys()
    return converted


def convert_state_dict(
    official: Mapping[str, Tensor], model: SegmentAnything, ignore: Callable[[str], bool] = lambda _: False
) -> dict[str, Tensor]:
    """Maps an official SAM `state_dict` onto `model`'s keys (see `apply_rules`)."""
    return apply_rules(official, sam_key_map(model), model.state_dict(), ignore)
