"""The `efficientvit` family: EfficientViT-SAM L0, L1, L2 (512-pixel input) and XL0, XL1 (1024) by mit-han-lab.

Its own model (`EfficientViTSAM`) only for the preprocessing: the encoder's input size and normalisation; the
prompt encoder, the decoder and the postprocessing are SAM's, in SAM's 1024 frame.
"""

from finesam.model.efficientvit.config import EFFICIENTVIT_PRESETS, EfficientViTConfig
from finesam.model.efficientvit.encoder import EfficientViTEncoder
from finesam.model.efficientvit.sam import EfficientViTSAM
from finesam.model.registry import EncoderFamily, register_family

FAMILY = register_family(
    EncoderFamily(
        name="efficientvit",
        title="EfficientViT-SAM (ReLU linear attention, MBConv)",
        config=EfficientViTConfig,
        encoder=EfficientViTEncoder,
        presets=EFFICIENTVIT_PRESETS,
        lora_targets={
            "encoder_attention": ("LiteMLA",),  # the q/k/v and output projections of every linear attention
            "encoder": ("EfficientViTEncoder",),  # those and the neck's output projection (the rest is convolutions)
        },
        model=EfficientViTSAM,
    )
)
