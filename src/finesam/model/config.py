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
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.encoder_dim % self.encoder_heads:
            problems.append(f"encoder_dim {self.encoder_dim} is not divisible by encoder_heads {self.encoder_heads}")
        if any(not 0 <= i < self.encoder_depth for i in self.global_attention_blocks):
            problems.append(
                f"global_attention_blocks {self.global_attention_blocks} out of range 0..{self.encoder_depth - 1}"
            )
        if self.prompt_dim % 8:
            problems.append(f"prompt_dim {self.prompt_dim} must be a multiple of 8 (mask features are prompt_dim / 8)")
        if self.mask_in_channels % 4:
            problems.append(f"mask_in_channels {self.mask_in_channels} must be a multiple of 4")
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SAMConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown SAMConfig fields: {unknown}")
        values = dict(values)
        if "global_attention_blocks" in values:
            values["global_attention_blocks"] = tuple(values["global_attention_blocks"])
        return cls(**values)


SAM_VIT_B = SAMConfig(name="vit_b")
SAM_VIT_L = SAMConfig(
    encoder_dim=1024, encoder_depth=24, encoder_heads=16, global_attention_blocks=(5, 11, 17, 23), name="vit_l"
)
SAM_VIT_H = SAMConfig(
    encoder_dim=1280, encoder_depth=32, encoder_heads=16, global_attention_blocks=(7, 15, 23, 31), name="vit_h"
)
PRESETS: dict[str, SAMConfig] = {c.name: c for c in (SAM_VIT_B, SAM_VIT_L, SAM_VIT_H)}


def preset_name(config: SAMConfig) -> str:
    """The official name (`vit_b`, `vit_l`, `vit_h`) of a configuration, or `custom`."""
    return next((name for name, preset in PRESETS.items() if preset == config), "custom")
