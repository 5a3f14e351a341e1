"""Hyper-parameters of a Segment Anything model, and the official presets."""

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class SAMConfig:
    """Everything needed to build a `SegmentAnything` of any size.

    The defaults are the official ViT-B values; `SAM_VIT_B`, `SAM_VIT_L` and `SAM_VIT_H` are the three releases.
    Smaller configurations (for tests or experiments) change the fields freely.
    """

    image_size: int = 1024
    patch_size: int = 16
    encoder_dim: int = 768
    encoder_depth: int = 12
    encoder_heads: int = 12
    global_attention_blocks: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_dim: int = 256
    mask_in_channels: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # "vit" (SAM ViT-B/L/H) or "tiny_vit" (MobileSAM / Light HQ-SAM); the tiny_* fields describe the latter's
    # four stages (the first is convolutional, so its head count is unused)
    encoder_type: str = "vit"
    tiny_dims: tuple[int, ...] = (64, 128, 160, 320)
    tiny_depths: tuple[int, ...] = (2, 2, 6, 2)
    tiny_heads: tuple[int, ...] = (2, 4, 5, 10)
    tiny_windows: tuple[int, ...] = (7, 7, 14, 7)
    tiny_mbconv_expand: float = 4.0
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.encoder_type == "vit" and self.encoder_dim % self.encoder_heads:
            problems.append(f"encoder_dim {self.encoder_dim} is not divisible by encoder_heads {self.encoder_heads}")
        if self.encoder_type == "vit" and any(not 0 <= i < self.encoder_depth for i in self.global_attention_blocks):
            problems.append(
                f"global_attention_blocks {self.global_attention_blocks} out of range 0..{self.encoder_depth - 1}"
            )
        if self.prompt_dim % 8:
            problems.append(f"prompt_dim {self.prompt_dim} must be a multiple of 8 (mask features are prompt_dim / 8)")
        if self.mask_in_channels % 4:
            problems.append(f"mask_in_channels {self.mask_in_channels} must be a multiple of 4")
        if self.encoder_type not in ("vit", "tiny_vit"):
            problems.append(f"encoder_type {self.encoder_type!r} is not 'vit' or 'tiny_vit'")
        if len({len(self.tiny_dims), len(self.tiny_depths), len(self.tiny_heads), len(self.tiny_windows), 4}) != 1:
            problems.append("tiny_dims, tiny_depths, tiny_heads and tiny_windows must have 4 entries")
        if problems:
            raise ValueError("invalid SAMConfig: " + "; ".join(problems))

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official models)."""
        return self.image_size // self.patch_size

    @property
    def mask_input_size(self) -> int:
        """Side of the low-resolution masks (256 for the official models)."""
        return 4 * self.embedding_size

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    @property
    def encoder_block_with_early_embedding(self) -> int:
        """Index of the first global-attention block, whose output HQ-SAM fuses with the final embedding."""
        return min(self.global_attention_blocks)

    @property
    def early_embedding_dim(self) -> int:
        """Channels of the early embedding HQ-SAM uses: the ViT width, or TinyViT's stage-1 output (160)."""
        return self.tiny_dims[2] if self.encoder_type == "tiny_vit" else self.encoder_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SAMConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SAMConfig fields: {unknown}")
        values = dict(values)
        for key in ("global_attention_blocks", "tiny_dims", "tiny_depths", "tiny_heads", "tiny_windows"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


SAM_VIT_B = SAMConfig(name="vit_b")
SAM_VIT_L = SAMConfig(
    encoder_dim=1024, encoder_depth=24, encoder_heads=16, global_attention_blocks=(5, 11, 17, 23), name="vit_l"
)
SAM_VIT_H = SAMConfig(
    encoder_dim=1280, encoder_depth=32, encoder_heads=16, global_attention_blocks=(7, 15, 23, 31), name="vit_h"
)
# MobileSAM and Light HQ-SAM (`vit_t` / `vit_tiny`): TinyViT-5M at 1024, the same prompt encoder and decoder
SAM_VIT_TINY = SAMConfig(encoder_type="tiny_vit", encoder_dim=320, name="vit_tiny")
PRESETS: dict[str, SAMConfig] = {c.name: c for c in (SAM_VIT_B, SAM_VIT_L, SAM_VIT_H, SAM_VIT_TINY)}


def preset_name(config: SAMConfig) -> str:
    """The official name (`vit_b`, `vit_l`, `vit_h`) of a configuration, or `custom`."""
    return next((name for name, preset in PRESETS.items() if preset == config), "custom")
