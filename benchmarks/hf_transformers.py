"""HF transformers' `SamModel` / `SamHQModel` with the weights of an official model: the third column of bench.py.

The key renames are facts of the two layouts (the names transformers' own conversion scripts produce from the
official checkpoints), written here as rules. This module imports `transformers` (when installed), which must
happen before `reference/official` is imported: its torchvision stand-in confuses transformers' torchvision check.
"""

import re
from typing import Any

import torch

try:  # optional: bench.py leaves the HF column empty without it
    import transformers  # pyright: ignore[reportMissingImports]
except ImportError:
    transformers = None

# official name -> HF name, applied in order
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.blocks\.", ".layers."),
    (r"\.patch_embed\.proj\.", ".patch_embed.projection."),
    (r"\.norm([1-4])\.", r".layer_norm\1."),
    (r"\.norm_final_attn\.", ".layer_norm_final_attn."),
    (r"\.neck\.0\.", ".neck.conv1."),
    (r"\.neck\.1\.", ".neck.layer_norm1."),
    (r"\.neck\.2\.", ".neck.conv2."),
    (r"\.neck\.3\.", ".neck.layer_norm2."),
    (r"\.pe_layer\.positional_encoding_gaussian_matrix$", ".shared_embedding.positional_embedding"),
    (r"\.point_embeddings\.", ".point_embed."),
    (r"\.mask_downscaling\.0\.", ".mask_embed.conv1."),
    (r"\.mask_downscaling\.1\.", ".mask_embed.layer_norm1."),
    (r"\.mask_downscaling\.3\.", ".mask_embed.conv2."),
    (r"\.mask_downscaling\.4\.", ".mask_embed.layer_norm2."),
    (r"\.mask_downscaling\.6\.", ".mask_embed.conv3."),
    (r"\.output_upscaling\.0\.", ".upscale_conv1."),
    (r"\.output_upscaling\.1\.", ".upscale_layer_norm."),
    (r"\.output_upscaling\.3\.", ".upscale_conv2."),
    # HQ-SAM's parts
    (r"\.hf_token\.", ".hq_token."),
    (r"\.hf_mlp\.", ".hq_mask_mlp."),
    (r"\.compress_vit_feat\.0\.", ".compress_vit_conv1."),
    (r"\.compress_vit_feat\.1\.", ".compress_vit_norm."),
    (r"\.compress_vit_feat\.3\.", ".compress_vit_conv2."),
    (r"\.embedding_encoder\.0\.", ".encoder_conv1."),
    (r"\.embedding_encoder\.1\.", ".encoder_norm."),
    (r"\.embedding_encoder\.3\.", ".encoder_conv2."),
    (r"\.embedding_maskfeature\.0\.", ".mask_conv1."),
    (r"\.embedding_maskfeature\.1\.", ".mask_norm."),
    (r"\.embedding_maskfeature\.3\.", ".mask_conv2."),
    # the decoder's three-layer MLPs: layers.0/1/2 -> proj_in / layers.0 / proj_out
    (r"(mlps\.\d+|prediction_head|mask_mlp)\.layers\.0\.", r"\1.proj_in."),
    (r"(mlps\.\d+|prediction_head|mask_mlp)\.layers\.1\.", r"\1.layers.0."),
    (r"(mlps\.\d+|prediction_head|mask_mlp)\.layers\.2\.", r"\1.proj_out."),
)


def hf_state_dict(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official state dict under HF's names (plus the positional matrix HF keeps twice)."""
    renamed = {}
    for key, value in official.items():
        for pattern, replacement in RENAMES:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    positional = renamed["prompt_encoder.shared_embedding.positional_embedding"]
    renamed["shared_image_embedding.positional_embedding"] = positional
    return renamed


def hf_sam(official: Any, hq: bool = False) -> Any:
    """An HF `SamModel` (or `SamHQModel`) with SDPA attention and the official model's weights, in eval mode."""
    if transformers is None:
        raise ImportError("the HF column needs `pip install transformers`")
    from transformers import SamConfig, SamHQConfig, SamHQModel, SamModel  # pyright: ignore[reportMissingImports]

    encoder = official.image_encoder
    blocks = encoder.blocks
    vision = {
        "hidden_size": encoder.patch_embed.proj.out_channels,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": blocks[0].attn.num_heads,
        "mlp_dim": blocks[0].mlp.lin1.out_features,
        "window_size": max(block.window_size for block in blocks),
        "global_attn_indexes": [i for i, block in enumerate(blocks) if block.window_size == 0],
    }
    if hq:
        config = SamHQConfig(vision_config=vision, mask_decoder_config={"vit_dim": vision["hidden_size"]})
        model_class: Any = SamHQModel
    else:
        config = SamConfig(vision_config=vision)
        model_class = SamModel
    model = model_class._from_config(config, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(hf_state_dict(official.state_dict()), strict=False)
    if missing or unexpected:
        raise KeyError(f"HF renames incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
