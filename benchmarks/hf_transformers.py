"""HF transformers' `SamModel` / `SamHQModel` with the weights of an official model: the third column of bench.py.

The key renames are facts of the two layouts (the names transformers' own conversion scripts produce from the
official checkpoints), kept once in `finesam.weights.hf`, which also reads HF's files. This module imports
`transformers` (when installed), which must happen before `reference/official` is imported: its torchvision
stand-in confuses transformers' torchvision check.
"""

from typing import Any

from finesam.weights.hf import to_hf_state_dict

try:  # optional: bench.py leaves the HF column empty without it
    import transformers  # pyright: ignore[reportMissingImports]
except ImportError:
    transformers = None


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
    missing, unexpected = model.load_state_dict(to_hf_state_dict(official.state_dict()), strict=False)
    if missing or unexpected:
        raise KeyError(f"HF renames incomplete: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
