"""The `vit` family: the plain ViT of SAM ViT-B/L/H (`finesam.model.image_encoder`)."""

from typing import Any

from finesam.model.config import SAM_VIT_B, SAM_VIT_H, SAM_VIT_L, ViTConfig
from finesam.model.image_encoder import ImageEncoder
from finesam.model.registry import EncoderFamily, register_family

# the keys of finesam 0.1's flat configuration that were ViT fields
_FLAT = {
    "encoder_dim": "dim",
    "encoder_depth": "depth",
    "encoder_heads": "heads",
    "global_attention_blocks": "global_attention_blocks",
    "window_size": "window_size",
    "mlp_ratio": "mlp_ratio",
    "patch_size": "patch_size",
}


def _from_flat(flat: dict[str, Any]) -> dict[str, Any]:
    return {new: flat[old] for old, new in _FLAT.items() if old in flat}


FAMILY = register_family(
    EncoderFamily(
        name="vit",
        title="SAM ViT (windowed + global attention)",
        config=ViTConfig,
        encoder=ImageEncoder,
        presets=(SAM_VIT_B, SAM_VIT_L, SAM_VIT_H),
        lora_targets={
            "encoder_attention": ("GridAttention",),  # qkv and output projections of every block
            "encoder": ("ImageEncoder",),  # every linear layer: attention and MLP
        },
        from_flat=_from_flat,
        legacy_keys=frozenset(_FLAT),
    )
)
