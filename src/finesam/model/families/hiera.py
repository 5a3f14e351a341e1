"""The `hiera` family: SAM 2 and SAM 2.1 (Ravi et al., 2024) on images, in four sizes.

Unlike the SAM 1 families it brings its own model chain (`SegmentAnything2`: the SAM 2 decoder and the official
image predictor's processing) and decoder config (`SAM2DecoderConfig`).
"""

from finesam.model.registry import EncoderFamily, register_family
from finesam.model.sam2.config import SAM2_PRESETS, HieraConfig, SAM2DecoderConfig
from finesam.model.sam2.hiera import HieraEncoder
from finesam.model.sam2.sam2 import SegmentAnything2

FAMILY = register_family(
    EncoderFamily(
        name="hiera",
        title="SAM 2 / SAM 2.1 (Hiera)",
        config=HieraConfig,
        encoder=HieraEncoder,
        presets=SAM2_PRESETS,
        lora_targets={
            "encoder_attention": ("MultiScaleAttention",),  # qkv and output projections of every block
            "encoder": ("HieraEncoder",),  # every linear layer: attention, MLP, the stage changes' projections
        },
        model=SegmentAnything2,
        decoder_config=SAM2DecoderConfig,
    )
)
