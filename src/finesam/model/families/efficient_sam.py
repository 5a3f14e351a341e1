"""The `efficient_sam` family: EfficientSAM ViT-Ti and ViT-S (Xiong et al., 2023, github.com/yformer/EfficientSAM).

Like SAM 2 it brings its own model chain (`EfficientSAM`: its prompt encoder and mask decoder, and the official
processing) and decoder config (`EfficientSAMDecoderConfig`).
"""

from finesam.model.efficient_sam.config import EFFICIENT_SAM_PRESETS, EfficientSAMConfig, EfficientSAMDecoderConfig
from finesam.model.efficient_sam.efficient_sam import EfficientSAM
from finesam.model.efficient_sam.encoder import EfficientSAMEncoder
from finesam.model.registry import EncoderFamily, register_family

FAMILY = register_family(
    EncoderFamily(
        name="efficient_sam",
        title="EfficientSAM (ViT-Ti / ViT-S, its own decoder)",
        config=EfficientSAMConfig,
        encoder=EfficientSAMEncoder,
        presets=EFFICIENT_SAM_PRESETS,
        lora_targets={
            "encoder_attention": ("GlobalAttention",),  # qkv and output projections of every block
            "encoder": ("EfficientSAMEncoder",),  # every linear layer: attention and MLP
        },
        model=EfficientSAM,
        decoder_config=EfficientSAMDecoderConfig,
    )
)
