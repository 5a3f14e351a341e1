"""The `edge_sam` family: EdgeSAM (Zhou et al., 2023, github.com/chongzhou96/EdgeSAM), SAM distilled into a
RepViT-m1 encoder with a stage-fusion neck (`finesam.model.rep_vit`); the prompt encoder and mask decoder are
SAM's, and so are its pre- and postprocessing.

EdgeSAM's code and weights are under the S-Lab License 1.0 (non-commercial use): finesam implements the
architecture from its description and the official outputs; the user brings the weights (docs/edge_sam.md).
"""

from finesam.model.config import SAMConfig
from finesam.model.registry import EncoderFamily, register_family
from finesam.model.rep_vit import RepViTConfig, RepViTEncoder

# the two releases have the same architecture: `edge_sam.pth` and `edge_sam_3x.pth` (trained 3x longer)
SAM_EDGE_SAM = SAMConfig(RepViTConfig(), name="edge_sam")
SAM_EDGE_SAM_3X = SAMConfig(RepViTConfig(), name="edge_sam_3x")

FAMILY = register_family(
    EncoderFamily(
        name="edge_sam",
        title="EdgeSAM (RepViT-m1, stage fusion)",
        config=RepViTConfig,
        encoder=RepViTEncoder,
        presets=(SAM_EDGE_SAM, SAM_EDGE_SAM_3X),
        lora_targets={
            # RepViT has no attention: its channel attention (squeeze-and-excitation, two linear layers)
            "encoder_attention": ("SqueezeExcite",),
            # every linear layer: squeeze-and-excitation and the two projections of the stage fusion (the
            # convolutions are not linear layers: LoRA does not adapt them)
            "encoder": ("RepViTEncoder",),
        },
    )
)
