"""The `slimsam` family: SlimSAM's uniformly pruned ViT-B (Chen et al., 2023, github.com/czg1225/SlimSAM).

SlimSAM prunes SAM ViT-B's embedding and MLP widths, keeping its depth, 12 heads, windows and global blocks;
the prompt encoder and mask decoder are SAM's. The `-uniform` releases prune every block alike, so the model is
the ViT chain (`ImageEncoder`) with other widths. The MLP width is a field of its own (the official code has
`mlp_dim`): a ratio to the embedding width may not round back to it (696 / 168).
"""

from dataclasses import dataclass
from typing import ClassVar

from finesam.model.config import VIT_LIMITS, SAMConfig, check_config, vit_shape_checks
from finesam.model.image_encoder import ImageEncoder
from finesam.model.registry import EncoderFamily, register_family


@dataclass(frozen=True)
class SlimSAMConfig:
    """A pruned SAM ViT: `dim` channels, `mlp_dim` MLP channels. Defaults: SlimSAM-50."""

    family: ClassVar[str] = "slimsam"
    dim: int = 384
    mlp_dim: int = 1536
    depth: int = 12
    heads: int = 12
    global_attention_blocks: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16

    def __post_init__(self) -> None:
        check_config(
            self,
            lambda: [
                *vit_shape_checks(self),
                (len(self.global_attention_blocks) > 0, "HQ-SAM and the layout need one global attention block"),
            ],
            {**VIT_LIMITS, "mlp_dim": (1, 65536)},
        )

    @property
    def early_embedding_block(self) -> int:
        """The first global-attention block, whose output HQ-SAM fuses (as for SAM's ViT)."""
        return min(self.global_attention_blocks)

    @property
    def early_embedding_dim(self) -> int:
        return self.dim

    def describe(self) -> str:
        return f"SlimSAM ViT {self.dim}x{self.depth}, MLP {self.mlp_dim}"


# SlimSAM's own names for them (`sam_model_registry` of its repository)
SAM_SLIMSAM_50 = SAMConfig(SlimSAMConfig(dim=384, mlp_dim=1536), name="vit_p50")
SAM_SLIMSAM_77 = SAMConfig(SlimSAMConfig(dim=168, mlp_dim=696), name="vit_p77")

FAMILY = register_family(
    EncoderFamily(
        name="slimsam",
        title="SlimSAM (uniformly pruned SAM ViT-B)",
        config=SlimSAMConfig,
        encoder=ImageEncoder,
        presets=(SAM_SLIMSAM_50, SAM_SLIMSAM_77),
        lora_targets={"encoder_attention": ("GridAttention",), "encoder": ("ImageEncoder",)},
    )
)
