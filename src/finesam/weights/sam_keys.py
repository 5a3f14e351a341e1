"""Official SAM `state_dict` -> finesam `state_dict`, with an explicit key map and no forward pass.

The map pairs each official module prefix with the finesam module that holds the same weights; the finesam
module is found by the structure of the chains (not by generated names), so the map reads like the
official model. The image encoder's part comes from its family's checkpoint layout
(`finesam.weights.layouts`); the prompt encoder and mask decoder are the same in every SAM-1-style checkpoint.
The configuration (ViT-B/L/H, TinyViT or any other size of a registered family) is read off the tensor shapes.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import DecoderConfig, SAMConfig
from finesam.model.mask_decoder import IoUHead, MaskHypernetworks, OutputTokens, UpscaledImageEmbedding
from finesam.model.prompt_encoder import FourierPositionalEncoding, MaskEncoder, NoMaskEmbedding, PointTypeEmbedding
from finesam.model.registry import family_of
from finesam.model.sam import SegmentAnything
from finesam.model.transformer import (
    ImageToTokenAttention,
    TokenFeedForward,
    TokenToImageAttention,
    TwoWayAttentionBlock,
    TwoWayTransformer,
)
from finesam.weights.key_map import Rule, apply_rules, rules_for
from finesam.weights.layouts import KeyOf, count, layout_for, layout_of, layouts, shape_of


def is_unused_key(key: str) -> bool:
    """Keys no registered family uses (TinyViT's ImageNet classifier head `norm_head`, `head`, ...)."""
    return any(layout.unused(key) for layout in layouts())


def infer_config(state_dict: Mapping[str, Tensor], decoder_heads: int = 8) -> SAMConfig:
    """The `SAMConfig` of an official SAM, MobileSAM, HQ-SAM (or other registered family's) `state_dict`, from its
    tensor shapes.

    Only the number of decoder attention heads cannot be seen in the shapes (8 in every official release).

    Raises:
        CheckpointError: a key the shapes are read from is missing, or no registered family recognises it.
    """

    layout = layout_for(state_dict)
    if layout.infer_config is not None:
        return layout.infer_config(state_dict)
    decoder = decoder_config(state_dict, shape_of(state_dict, "image_encoder.neck.0.weight")[0], decoder_heads)
    encoder, image_size = layout.infer_encoder(state_dict)
    return SAMConfig(encoder, decoder, image_size=image_size)


def decoder_config(state_dict: Mapping[str, Tensor], prompt_dim: int, decoder_heads: int = 8) -> DecoderConfig:
    """SAM's prompt encoder and mask decoder configuration from the shapes of SAM-1-style keys; `prompt_dim` is
    where the family's encoder says it (SAM's neck).

    Raises:
        CheckpointError: a key the shapes are read from is missing.
    """

    def shape(key: str) -> tuple[int, ...]:
        return shape_of(state_dict, key)

    return DecoderConfig(
        prompt_dim=prompt_dim,
        mask_in_channels=shape("prompt_encoder.mask_downscaling.3.weight")[0],
        depth=count(state_dict, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight"),
        heads=decoder_heads,
        mlp_dim=shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        num_multimask_outputs=shape("mask_decoder.mask_tokens.weight")[0] - 1,
        iou_head_depth=count(state_dict, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
        iou_head_hidden_dim=shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
    )


@dataclass(frozen=True)
class DecoderKeys:
    """How a checkpoint names the prompt encoder and mask decoder: SAM's names by default; SAM 2 has other
    prefixes, `mlp.layers.{0,1}` in the transformer, an object-score token first and the skip upscaling."""

    prompt_encoder: str = "prompt_encoder"
    mask_decoder: str = "mask_decoder"
    mlp: tuple[str, str] = ("mlp.lin1", "mlp.lin2")
    output_tokens: tuple[str, ...] = ("iou_token.weight", "mask_tokens.weight")
    upscaling: type[fl.Chain] = UpscaledImageEmbedding


SAM_KEYS = DecoderKeys()


def _modules(model: SegmentAnything) -> list[tuple[str, fl.Module]]:
    """(official module prefix, finesam module) pairs whose parameters have the same names and shapes."""
    return layout_of(family_of(model.config.encoder).name).modules(model.image_encoder) + decoder_modules(model)


def attention_modules(prefix: str, layer: fl.Attention) -> list[tuple[str, fl.Module]]:
    """An official `Attention`'s projections."""
    q, k, v, out = layer.layers(fl.Linear)
    return [(f"{prefix}.q_proj", q), (f"{prefix}.k_proj", k), (f"{prefix}.v_proj", v), (f"{prefix}.out_proj", out)]


def two_way_modules(transformer: fl.Chain, prefix: str, mlp: tuple[str, str]) -> list[tuple[str, fl.Module]]:
    """An official `TwoWayTransformer` at `prefix` (its blocks' MLP linears named `mlp`): SAM's, SAM 2's and the
    variants' whose blocks subclass `TwoWayAttentionBlock` (EfficientSAM's)."""
    pairs: list[tuple[str, fl.Module]] = []
    for i, (block, _) in enumerate(transformer.walk(TwoWayAttentionBlock)):
        layer = f"{prefix}.layers.{i}"
        self_attn, to_image = block.layer(0, fl.Chain), block.ensure_find(TokenToImageAttention)
        feed_forward, to_tokens = block.ensure_find(TokenFeedForward), block.ensure_find(ImageToTokenAttention)
        lin1, lin2 = feed_forward.layers(fl.Linear)
        pairs += attention_modules(f"{layer}.self_attn", self_attn.ensure_find(fl.Attention))
        pairs += attention_modules(f"{layer}.cross_attn_token_to_image", to_image.ensure_find(fl.Attention))
        pairs += attention_modules(f"{layer}.cross_attn_image_to_token", to_tokens.ensure_find(fl.Attention))
        pairs += [
            (f"{layer}.norm1", self_attn.ensure_find(fl.LayerNorm)),
            (f"{layer}.norm2", to_image.ensure_find(fl.LayerNorm)),
            (f"{layer}.{mlp[0]}", lin1),
            (f"{layer}.{mlp[1]}", lin2),
            (f"{layer}.norm3", feed_forward.ensure_find(fl.LayerNorm)),
            (f"{layer}.norm4", to_tokens.ensure_find(fl.LayerNorm)),
        ]
    final = transformer.layer(-1, TokenToImageAttention)
    pairs += attention_modules(f"{prefix}.final_attn_token_to_image", final.ensure_find(fl.Attention))
    pairs.append((f"{prefix}.norm_final_attn", final.ensure_find(fl.LayerNorm)))
    return pairs


def decoder_modules(model: SegmentAnything, keys: DecoderKeys = SAM_KEYS) -> list[tuple[str, fl.Module]]:
    """The (official prefix, module) pairs of the prompt encoder and the mask decoder, named as `keys` says."""
    prompt, decoder = keys.prompt_encoder, keys.mask_decoder
    mask_encoder = model.ensure_find(MaskEncoder)
    pairs = [
        (f"{prompt}.mask_downscaling.{i}", layer)
        for i, layer in zip((0, 1, 3, 4, 6), [m for m in mask_encoder if not isinstance(m, fl.GeLU)], strict=True)
    ]
    pairs.append((f"{prompt}.no_mask_embed", model.ensure_find(NoMaskEmbedding)))

    pairs += two_way_modules(model.ensure_find(TwoWayTransformer), f"{decoder}.transformer", keys.mlp)
    upscaling = model.ensure_find(keys.upscaling)
    pairs += [
        (f"{decoder}.output_upscaling.{i}", layer)
        for i, layer in zip((0, 1, 3), [m for m in upscaling if isinstance(m, fl.WeightedModule)], strict=True)
    ]
    for i, hypernetwork in enumerate(model.ensure_find(MaskHypernetworks)):
        assert isinstance(hypernetwork, fl.Chain)
        pairs += [
            (f"{decoder}.output_hypernetworks_mlps.{i}.layers.{j}", linear)
            for j, linear in enumerate(hypernetwork.layers(fl.Linear))
        ]
    pairs += [
        (f"{decoder}.iou_prediction_head.layers.{j}", linear)
        for j, linear in enumerate(model.ensure_find(IoUHead).layers(fl.Linear))
    ]
    return pairs


def key_of(model: torch.nn.Module) -> KeyOf:
    """The `KeyOf` of `model`: the `state_dict` key of a tensor of one of its modules."""
    names = {id(module): name for name, module in model.named_modules()}

    def key(module: torch.nn.Module, tensor: str) -> str:
        return f"{names[id(module)]}.{tensor}"

    return key


def sam_key_map(model: SegmentAnything) -> dict[str, Rule]:
    """For every key of `model.state_dict()`, the official key(s) it is made from (the family's layout gives
    the whole map when its checkpoints are not SAM-1-style)."""
    layout, key = layout_of(family_of(model.config.encoder).name), key_of(model)
    if layout.model_rules is not None:
        return layout.model_rules(model, key)
    rules = rules_for(model, _modules(model))
    return rules | layout.rules(model.image_encoder, key) | decoder_rules(model, key)


def decoder_rules(model: SegmentAnything, key: KeyOf, keys: DecoderKeys = SAM_KEYS) -> dict[str, Rule]:
    """The prompt encoder's and mask decoder's tensors that are not one-to-one, named as `keys` says."""
    prompt, decoder = keys.prompt_encoder, keys.mask_decoder
    fourier = model.ensure_find(FourierPositionalEncoding)
    point_types = (f"{prompt}.not_a_point_embed.weight", *(f"{prompt}.point_embeddings.{i}.weight" for i in range(4)))
    tokens = tuple(f"{decoder}.{name}" for name in keys.output_tokens)
    return {
        key(fourier, "gaussian_matrix"): Rule((f"{prompt}.pe_layer.positional_encoding_gaussian_matrix",)),
        key(model.ensure_find(PointTypeEmbedding), "weight"): Rule(point_types, lambda *ts: torch.cat(ts)),
        key(model.ensure_find(OutputTokens), "weight"): Rule(tokens, lambda *ts: torch.cat(ts)),
    }


def convert_state_dict(
    official: Mapping[str, Tensor], model: SegmentAnything, ignore: Callable[[str], bool] = lambda _: False
) -> dict[str, Tensor]:
    """Maps an official SAM `state_dict` onto `model`'s keys (see `apply_rules`)."""
    return apply_rules(official, sam_key_map(model), model.state_dict(), ignore)
