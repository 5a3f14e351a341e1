"""Hyper-parameters of EfficientSAM (Xiong et al., 2023, github.com/yformer/EfficientSAM): the plain ViT of the
`efficient_sam` family, its decoder's one addition to SAM's decoder config, and the two official presets (the
values of the official `build_efficient_sam`)."""

from dataclasses import dataclass
from typing import ClassVar

from finesam.model.config import VIT_LIMITS, DecoderConfig, SAMConfig, check_config


@dataclass(frozen=True)
class EfficientSAMConfig:
    """A plain ViT (every block attends globally, no relative positions) with SAM's neck. Defaults: ViT-Ti.

    Attributes:
        dim: the ViT width (192 for ViT-Ti, 384 for ViT-S).
        depth: blocks (12 in both releases).
        heads: attention heads (3, 6).
        mlp_ratio: MLP width over `dim`.
        patch_size: pixels per patch side.
        pretrain_grid: side of the absolute position table the checkpoints store (14: a 224-pixel pretraining
            input, plus a class-token row), bicubically resized to the patch grid at every call.
        early_embedding_block: the block whose output HQ-SAM fuses. EfficientSAM has no HQ release: block 2, the
            one HQ-SAM taps in SAM's 12-block ViT-B (its first global-attention block).
    """

    family: ClassVar[str] = "efficient_sam"
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 16
    pretrain_grid: int = 14
    early_embedding_block: int = 2

    def __post_init__(self) -> None:
        check_config(
            self,
            lambda: [
                (self.dim % self.heads == 0, f"dim {self.dim} is not divisible by heads {self.heads}"),
                (
                    0 <= self.early_embedding_block < self.depth,
                    f"early_embedding_block {self.early_embedding_block} must be in 0..{self.depth - 1}",
                ),
            ],
            {**VIT_LIMITS, "mlp_ratio": (0.01, 64), "pretrain_grid": (1, 1024)},
        )

    @property
    def mlp_dim(self) -> int:
        """Hidden width of each block's MLP."""
        return int(self.dim * self.mlp_ratio)

    @property
    def early_embedding_dim(self) -> int:
        return self.dim

    def describe(self) -> str:
        return f"EfficientSAM ViT {self.dim}x{self.depth}"


@dataclass(frozen=True)
class EfficientSAMDecoderConfig(DecoderConfig):
    """EfficientSAM's prompt encoder and mask decoder: SAM's sizes (`mask_in_channels` is unused: there is no
    mask input), and the fixed number of prompt points the official model always embeds.

    Attributes:
        max_points: every prompt is padded to this many points (label -1 at (-1, -1)); more are refused.
    """

    max_points: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(self, lambda: [], {"max_points": (2, 1024)})


def _efficient_sam(name: str, dim: int, heads: int) -> SAMConfig:
    return SAMConfig(EfficientSAMConfig(dim=dim, heads=heads), EfficientSAMDecoderConfig(), image_size=1024, name=name)


EFFICIENT_SAM_VITT = _efficient_sam("efficient_sam_vitt", 192, 3)
EFFICIENT_SAM_VITS = _efficient_sam("efficient_sam_vits", 384, 6)
EFFICIENT_SAM_PRESETS = (EFFICIENT_SAM_VITT, EFFICIENT_SAM_VITS)
