"""EfficientViT-SAM's hyper-parameters (Zhang et al., 2024, github.com/mit-han-lab/efficientvit) and its releases.

The encoder is EfficientViT's "large" backbone: a stem stage and four (L) or five (XL) stages that halve the grid,
each of local blocks (ResBlock, fused MBConv, MBConv) or of EfficientViT blocks (ReLU linear attention with
multi-scale aggregation, then an MBConv), and `SamNeck`: the outputs of the last three stages projected to the
neck width, resampled bicubically to the embedding grid and summed, a few fused MBConv blocks, a projection to
the prompt width and a LayerNorm2d.

The prompt encoder, the mask decoder and the predictor's prompt frame are SAM's at 1024 (`SAMConfig.image_size`);
only the encoder reads its own input size (`input_size`: 512 for L0-L2, 1024 for XL0-XL1).
"""

from dataclasses import dataclass, replace
from typing import ClassVar

from finesam.model.config import SAMConfig, check_config

# the block kinds of a stage, by the official names: local blocks, and attention stages (`att`: aggregation
# scale 5, `att@3`: scale 3)
LOCAL_BLOCKS = ("res", "fmb", "mb")
ATTENTION_BLOCKS = {"att": 5, "att@3": 3}
NECK_BLOCKS = LOCAL_BLOCKS
EMBEDDING_STRIDE = 16  # prompt-frame pixels per embedding cell: the neck resamples to image_size / 16


@dataclass(frozen=True)
class EfficientViTConfig:
    """EfficientViT-SAM's encoder. Defaults: EfficientViT-SAM-L0.

    Attributes:
        widths, depths, blocks, expands, fewer_norms: per stage (stage 0 is the stem): channels, blocks after
            the first, block kind (`res`, `fmb`, `mb`, `att`, `att@3`), expansion ratio, and whether the blocks'
            inner convolutions have biases instead of BatchNorm. Each stage after the stem starts with a
            stride-2 block of 4x the expansion (an MBConv in attention stages).
        head_dim: channels per head of the linear attention (the official `qkv_dim`).
        neck_stages: the stages the neck fuses, in the official order (last stage first).
        neck_width, neck_depth, neck_expand, neck_block: the neck's channels, blocks, their expansion and kind.
        input_size: the side of the encoder's input (the image resized and padded to it).
    """

    family: ClassVar[str] = "efficientvit"
    widths: tuple[int, ...] = (32, 64, 128, 256, 512)
    depths: tuple[int, ...] = (1, 1, 1, 4, 4)
    blocks: tuple[str, ...] = ("res", "fmb", "fmb", "mb", "att")
    expands: tuple[float, ...] = (1, 4, 4, 4, 6)
    fewer_norms: tuple[bool, ...] = (False, False, False, True, True)
    head_dim: int = 32
    neck_stages: tuple[int, ...] = (4, 3, 2)
    neck_width: int = 256
    neck_depth: int = 4
    neck_expand: float = 1.0
    neck_block: str = "fmb"
    input_size: int = 512

    def __post_init__(self) -> None:
        stages = len(self.widths)
        attention = [w for w, b in zip(self.widths, self.blocks, strict=False) if b in ATTENTION_BLOCKS]
        check_config(
            self,
            lambda: [
                (
                    len(self.depths) == len(self.blocks) == len(self.expands) == len(self.fewer_norms) == stages >= 2,
                    "widths, depths, blocks, expands and fewer_norms need one entry per stage (2 or more)",
                ),
                (
                    all(b in LOCAL_BLOCKS or b in ATTENTION_BLOCKS for b in self.blocks),
                    f"blocks {self.blocks} must be {', '.join((*LOCAL_BLOCKS, *ATTENTION_BLOCKS))}",
                ),
                (self.blocks[0] in LOCAL_BLOCKS, "the stem stage (0) has local blocks"),
                (all(isinstance(f, bool) for f in self.fewer_norms), "fewer_norms must be true or false"),
                (
                    all(w % self.head_dim == 0 for w in attention),
                    f"attention widths must be multiples of {self.head_dim}",
                ),
                (
                    len(self.neck_stages) > 0 and all(0 <= s < stages for s in self.neck_stages),
                    f"neck_stages {self.neck_stages} must be stages 0..{stages - 1}",
                ),
                (len(set(self.neck_stages)) == len(self.neck_stages), "neck_stages repeat a stage"),
                (self.neck_block in NECK_BLOCKS, f"neck_block must be one of {', '.join(NECK_BLOCKS)}"),
                (
                    self.input_size % 2 ** (stages) == 0,
                    f"input_size {self.input_size} must be a multiple of {2**stages} (every stage halves the grid)",
                ),
            ],
            {
                "widths": (1, 8192),
                "depths": (0, 128),
                "expands": (0.01, 64),
                "head_dim": (1, 1024),
                "neck_stages": (0, 64),
                "neck_width": (1, 8192),
                "neck_depth": (0, 128),
                "neck_expand": (0.01, 64),
                "input_size": (16, 16384),
            },
        )

    @property
    def patch_size(self) -> int:
        """Prompt-frame pixels per embedding cell (16, as SAM's): the neck resamples every stage it fuses to the
        grid of `SAMConfig.image_size` / 16, whatever the encoder's own `input_size`."""
        return EMBEDDING_STRIDE

    @property
    def early_stage(self) -> int:
        """The stage whose output HQ-SAM fuses: the finest the neck reads, at the embedding grid in the releases
        (L: stage 2 of a 512 input, XL: stage 3 of a 1024 input)."""
        return min(self.neck_stages)

    @property
    def early_embedding_dim(self) -> int:
        return self.widths[self.early_stage]

    def describe(self) -> str:
        return f"EfficientViT {'/'.join(map(str, self.widths))} (encoder input {self.input_size})"


def input_size_for(neck_stages: tuple[int, ...], grid: int = 64) -> int:
    """The input size at which the finest stage the neck reads lies on the embedding grid (stage s is at input /
    2^(s+1)): 512 for the L releases, 1024 for XL; checkpoints do not record it."""
    return grid * 2 ** (min(neck_stages) + 1)


def _release(name: str, encoder: EfficientViTConfig) -> SAMConfig:
    return SAMConfig(encoder, image_size=1024, name=name)


_L = EfficientViTConfig()  # the L structure (L0's defaults): 512 input, stages 4, 3, 2 fused by the neck
_XL = EfficientViTConfig(
    widths=(32, 64, 128, 256, 512, 1024),
    depths=(0, 1, 1, 2, 3, 3),
    blocks=("res", "fmb", "fmb", "fmb", "att@3", "att@3"),
    expands=(1, 4, 4, 4, 4, 6),
    fewer_norms=(False, False, False, False, True, True),
    neck_stages=(5, 4, 3),
    neck_depth=6,
    neck_expand=4.0,
    input_size=1024,
)

EFFICIENTVIT_SAM_L0 = _release("efficientvit_sam_l0", replace(_L, depths=(1, 1, 1, 4, 4), neck_depth=4))
EFFICIENTVIT_SAM_L1 = _release("efficientvit_sam_l1", replace(_L, depths=(1, 1, 1, 6, 6), neck_depth=8))
EFFICIENTVIT_SAM_L2 = _release("efficientvit_sam_l2", replace(_L, depths=(1, 2, 2, 8, 8), neck_depth=12))
EFFICIENTVIT_SAM_XL0 = _release("efficientvit_sam_xl0", _XL)
EFFICIENTVIT_SAM_XL1 = _release("efficientvit_sam_xl1", replace(_XL, depths=(1, 2, 2, 4, 6, 6), neck_depth=12))
EFFICIENTVIT_PRESETS = (
    EFFICIENTVIT_SAM_L0,
    EFFICIENTVIT_SAM_L1,
    EFFICIENTVIT_SAM_L2,
    EFFICIENTVIT_SAM_XL0,
    EFFICIENTVIT_SAM_XL1,
)
