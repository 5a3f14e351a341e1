"""Hyper-parameters of SAM 2 / SAM 2.1: the Hiera trunk with its FPN neck (the `hiera` family's encoder config),
the SAM 2 decoder's additions, and the official presets (values of the official YAML configs)."""

from dataclasses import dataclass
from typing import ClassVar

from finesam.model.config import DecoderConfig, SAMConfig, check_config

# Hiera doubles the width and the heads at every stage and pools the queries 2 x 2 at the first block of stages
# 2, 3 and 4 in every release; the FPN neck adds the upsampled level 3 to level 2 and drops level 3 ("scalp")
STAGES = 4
DIM_MULTIPLIER = 2
POOL_STRIDE = 2


@dataclass(frozen=True)
class HieraConfig:
    """Hiera (Ryali et al., 2023) as SAM 2 uses it: four stages, windowed attention with a few global blocks, a
    windowed absolute position embedding. Defaults: SAM 2.1 Hiera-T.

    Attributes:
        embed_dim: width of stage 1 (doubled at each later stage).
        heads: heads of stage 1 (doubled at each later stage).
        stages: blocks per stage.
        global_attention_blocks: indices (over all blocks) of the blocks that attend globally.
        window_spec: the attention window of each stage (the first block of a stage keeps the previous stage's
            window, pooled with its queries).
        position_embedding_size: (height, width) of the background position embedding, bicubically resized to
            the grid of stage 1 (`window_pos_embed_bkg_spatial_size`).
        mlp_ratio: MLP width over block width.
    """

    family: ClassVar[str] = "hiera"
    embed_dim: int = 96
    heads: int = 1
    stages: tuple[int, ...] = (1, 2, 7, 2)
    global_attention_blocks: tuple[int, ...] = (5, 7, 9)
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    position_embedding_size: tuple[int, ...] = (7, 7)
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        depth = sum(self.stages) if isinstance(self.stages, tuple) else 0
        check_config(
            self,
            lambda: [
                (len(self.stages) == STAGES, f"stages needs {STAGES} entries (blocks per stage)"),
                (len(self.window_spec) == STAGES, f"window_spec needs {STAGES} entries (one window per stage)"),
                (len(self.position_embedding_size) == 2, "position_embedding_size is (height, width)"),
                (
                    all(0 <= i < depth for i in self.global_attention_blocks),
                    f"global_attention_blocks {self.global_attention_blocks} must be in 0..{depth - 1}",
                ),
            ],
            {
                "embed_dim": (1, 8192),
                "heads": (1, 256),
                "stages": (1, 128),
                "window_spec": (1, 256),
                "position_embedding_size": (1, 256),
                "mlp_ratio": (0.01, 64),
            },
        )

    @property
    def depth(self) -> int:
        """Blocks over all stages."""
        return sum(self.stages)

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Index of the last block of each stage."""
        return tuple(sum(self.stages[: i + 1]) - 1 for i in range(STAGES))

    @property
    def dims(self) -> tuple[int, ...]:
        """Width of each stage."""
        return tuple(self.embed_dim * DIM_MULTIPLIER**i for i in range(STAGES))

    @property
    def patch_size(self) -> int:
        """16: the image embedding is the neck's level 2 (the stem divides by 4, two poolings by 2 each)."""
        return 4 * POOL_STRIDE**2

    @property
    def early_embedding_dim(self) -> int:
        """HQ-SAM 2 fuses no early feature; the width of stage 1 is what a fusion would read."""
        return self.embed_dim

    def describe(self) -> str:
        return f"Hiera {self.embed_dim}/{'-'.join(map(str, self.stages))}"


@dataclass(frozen=True)
class SAM2DecoderConfig(DecoderConfig):
    """SAM 2's prompt encoder and mask decoder: SAM's, plus an object-score token and its MLP head, the
    high-resolution skips of the upscaling, a sigmoid on the IoU head, and the single-mask output that falls
    back to the best of the three multimask outputs when it is unstable (what the image predictor builds).

    Attributes:
        iou_sigmoid: the IoU head ends with a sigmoid (`iou_prediction_use_sigmoid`).
        dynamic_multimask: single-mask output falls back to the best multimask output when the single mask's
            stability score is below `stability_threshold` (`dynamic_multimask_via_stability`).
        stability_delta: the logit offset of that stability score.
        stability_threshold: the stability under which it falls back.
    """

    iou_sigmoid: bool = True
    dynamic_multimask: bool = True
    stability_delta: float = 0.05
    stability_threshold: float = 0.98

    @property
    def iou_token(self) -> int:
        """After the object-score token."""
        return 1


def _sam2(name: str, encoder: HieraConfig) -> SAMConfig:
    return SAMConfig(encoder, SAM2DecoderConfig(), image_size=1024, name=name)


_TINY = HieraConfig()
_SMALL = HieraConfig(stages=(1, 2, 11, 2), global_attention_blocks=(7, 10, 13))
_BASE_PLUS = HieraConfig(
    embed_dim=112, heads=2, stages=(2, 3, 16, 3), global_attention_blocks=(12, 16, 20), position_embedding_size=(14, 14)
)
_LARGE = HieraConfig(
    embed_dim=144,
    heads=2,
    stages=(2, 6, 36, 4),
    global_attention_blocks=(23, 33, 43),
    window_spec=(8, 4, 16, 8),
)

# SAM 2.1 and SAM 2.0 have the same image model (2.1 changed the training and the video memory's inputs)
SAM2_1_HIERA_TINY = _sam2("sam2.1_hiera_tiny", _TINY)
SAM2_1_HIERA_SMALL = _sam2("sam2.1_hiera_small", _SMALL)
SAM2_1_HIERA_BASE_PLUS = _sam2("sam2.1_hiera_base_plus", _BASE_PLUS)
SAM2_1_HIERA_LARGE = _sam2("sam2.1_hiera_large", _LARGE)
SAM2_HIERA_TINY = _sam2("sam2_hiera_tiny", _TINY)
SAM2_HIERA_SMALL = _sam2("sam2_hiera_small", _SMALL)
SAM2_HIERA_BASE_PLUS = _sam2("sam2_hiera_base_plus", _BASE_PLUS)
SAM2_HIERA_LARGE = _sam2("sam2_hiera_large", _LARGE)

SAM2_PRESETS = (
    SAM2_1_HIERA_TINY,
    SAM2_1_HIERA_SMALL,
    SAM2_1_HIERA_BASE_PLUS,
    SAM2_1_HIERA_LARGE,
    SAM2_HIERA_TINY,
    SAM2_HIERA_SMALL,
    SAM2_HIERA_BASE_PLUS,
    SAM2_HIERA_LARGE,
)
