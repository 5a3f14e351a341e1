"""The `tiny_vit` family: TinyViT-5M of MobileSAM and Light HQ-SAM (`finesam.model.tiny_vit`)."""

from typing import Any

from finesam.model.config import SAM_VIT_TINY, TinyViTConfig
from finesam.model.registry import EncoderFamily, register_family
from finesam.model.tiny_vit import TinyViTEncoder

_FLAT = {"tiny_dims": "dims", "tiny_depths": "depths", "tiny_mbconv_expand": "mbconv_expand"}
_FLAT_PER_STAGE = {"tiny_heads": "heads", "tiny_windows": "windows"}  # 0.1 had an unused entry for stage 0


def _from_flat(flat: dict[str, Any]) -> dict[str, Any]:
    encoder = {new: flat[old] for old, new in _FLAT.items() if old in flat}
    return encoder | {new: list(flat[old])[1:] for old, new in _FLAT_PER_STAGE.items() if old in flat}


FAMILY = register_family(
    EncoderFamily(
        name="tiny_vit",
        title="TinyViT (MobileSAM, Light HQ-SAM)",
        config=TinyViTConfig,
        encoder=TinyViTEncoder,
        presets=(SAM_VIT_TINY,),
        lora_targets={
            # the attention chain, not `BiasedAttention` (a leaf that holds no linear layer)
            "encoder_attention": ("TinyViTAttention",),
            "encoder": ("TinyViTEncoder",),
        },
        from_flat=_from_flat,
        legacy_keys=frozenset({*_FLAT, *_FLAT_PER_STAGE}),
    )
)
