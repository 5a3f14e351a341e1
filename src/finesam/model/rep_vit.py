"""RepViT with EdgeSAM's stage fusion: the image encoder of EdgeSAM (Zhou et al., 2023, github.com/chongzhou96/EdgeSAM).

RepViT (Wang et al., 2023) is a MobileNet-style network: a convolutional stem to S/4, then four stages of
blocks, each a *token mixer* (a re-parameterisable depthwise 3x3 + 1x1 convolution plus the input, sometimes with
squeeze-and-excitation) and a *channel mixer* (a residual pointwise MLP with GELU). The first block of stages
1-3 halves the grid (depthwise stride-2 convolution, then a pointwise one to the new width). EdgeSAM fuses the
S/16 map of stage 2 with the S/32 map of stage 3 (each projected by a 1x1 convolution, stage 3 upsampled 2x
bicubically) and ends with SAM's neck.

Every convolution + BatchNorm unit is kept unfused here (`Conv2dBN`, the formula of the official code in eval
mode); the fast paths fold them at inference. Convolutional parts run on (B, C, H, W) maps with channels-last
strides; stage 2's output, the fusion and the neck work on channels-last grids (B, H, W, C), so the pointwise
projections of the fusion and of squeeze-and-excitation are linear layers (which LoRA can adapt).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.config import check_config
from finesam.model.image_encoder import Neck
from finesam.model.registry import EncoderChain
from finesam.model.tiny_vit import Conv2dBN, ConvStem

MLP_RATIO = 2  # the channel mixer's hidden width, per input channel (the official code asserts it)
SE_RATIO = 0.25  # squeeze-and-excitation's reduction, rounded as timm's `make_divisible` does
SE_DIVISOR = 8


def squeeze_channels(channels: int) -> int:
    """The hidden width of squeeze-and-excitation on `channels` channels: a quarter, to the nearest multiple of 8
    (at least 8): timm's `make_divisible(channels * 0.25, 8, round_limit=0)`."""
    value = channels * SE_RATIO
    return max(SE_DIVISOR, int(value + SE_DIVISOR / 2) // SE_DIVISOR * SE_DIVISOR)


@dataclass(frozen=True)
class RepViTConfig:
    """RepViT with EdgeSAM's stage fusion. Defaults: RepViT-m1, EdgeSAM's encoder.

    Attributes:
        widths: channels of the four stages (stage 0 at S/4 ... stage 3 at S/32).
        depths: blocks per stage; the first block of stages 1-3 is the downsampling one.
        se_blocks: the blocks (numbered 0.. across all stages) with squeeze-and-excitation.
        fusion_dim: channels of the fused stage-2 + stage-3 map (the neck's input).
    """

    family: ClassVar[str] = "edge_sam"
    widths: tuple[int, ...] = (48, 96, 192, 384)
    depths: tuple[int, ...] = (3, 4, 16, 3)
    se_blocks: tuple[int, ...] = (0, 4, 8, 10, 12, 14, 16, 18, 20, 24)
    fusion_dim: int = 256

    def __post_init__(self) -> None:
        check_config(
            self,
            lambda: [
                (len(self.widths) == len(self.depths) == 4, "widths and depths need 4 entries (one per stage)"),
                (self.widths[0] % 2 == 0, f"widths[0] {self.widths[0]} must be even (the stem halves it)"),
                (
                    all(0 <= b < sum(self.depths) for b in self.se_blocks),
                    f"se_blocks {self.se_blocks} must be in 0..{sum(self.depths) - 1}",
                ),
                (list(self.se_blocks) == sorted(set(self.se_blocks)), "se_blocks must be increasing"),
            ],
            {"widths": (2, 8192), "depths": (1, 256), "se_blocks": (0, 1024), "fusion_dim": (1, 8192)},
        )

    @property
    def patch_size(self) -> int:
        """16: the stem divides the input by 4, three stages by 2 each, and the fusion upsamples stage 3 by 2."""
        return 16

    @property
    def early_embedding_dim(self) -> int:
        """HQ-SAM fuses the output of stage 2, the stage at the embedding grid: `widths[2]` channels."""
        return self.widths[2]

    def describe(self) -> str:
        return f"RepViT {'/'.join(map(str, self.widths))}"


class RepVGGDW(fl.Sum):
    """Depthwise 3x3 convolution + depthwise 1x1 convolution + the input (RepVGG's re-parameterisable form)."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            Conv2dBN(dim, dim, 3, groups=dim, device=device, dtype=dtype),
            Conv2dBN(dim, dim, 1, groups=dim, device=device, dtype=dtype),
            fl.Identity(),
        )


class GlobalAveragePool(fl.Module):
    """(B, C, H, W) -> (B, C): the mean of each channel."""

    def forward(self, x: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch channels"]:
        return x.mean(dim=(2, 3))


class ChannelGate(fl.Module):
    """Scales each channel of a map by its weight: (map (B, C, H, W), weights (B, C)) -> (B, C, H, W)."""

    def forward(
        self, x: Float[Tensor, "batch channels height width"], weights: Float[Tensor, "batch channels"]
    ) -> Float[Tensor, "batch channels height width"]:
        return x * weights[:, :, None, None]


class SqueezeExcite(fl.Chain):
    """Channel attention: pool, squeeze to a quarter of the channels (ReLU), expand, sigmoid, scale the map."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        hidden = squeeze_channels(dim)
        super().__init__(
            fl.Parallel(
                fl.Identity(),
                fl.Chain(
                    GlobalAveragePool(),
                    fl.Linear(dim, hidden, device=device, dtype=dtype),
                    fl.ReLU(),
                    fl.Linear(hidden, dim, device=device, dtype=dtype),
                    fl.Sigmoid(),
                ),
            ),
            ChannelGate(),
        )


class TokenMixer(fl.Chain):
    """Spatial mixing of a stride-1 block: `RepVGGDW`, then squeeze-and-excitation in some blocks."""

    def __init__(self, dim: int, se: bool, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            RepVGGDW(dim, device=device, dtype=dtype),
            *([SqueezeExcite(dim, device=device, dtype=dtype)] if se else []),
        )


class DownsamplingTokenMixer(fl.Chain):
    """Spatial mixing of a stage's first block: depthwise 3x3 stride-2 convolution, squeeze-and-excitation in
    some blocks, pointwise convolution to the stage's width."""

    def __init__(
        self, dim: int, out_dim: int, se: bool, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            Conv2dBN(dim, dim, 3, stride=2, groups=dim, device=device, dtype=dtype),
            *([SqueezeExcite(dim, device=device, dtype=dtype)] if se else []),
            Conv2dBN(dim, out_dim, 1, device=device, dtype=dtype),
        )


class ChannelMixer(fl.Residual):
    """The pointwise MLP of a block, with the input added: 1x1 convolution to 2x the width, GELU, 1x1 back."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            Conv2dBN(dim, MLP_RATIO * dim, 1, device=device, dtype=dtype),
            fl.GeLU(),
            Conv2dBN(MLP_RATIO * dim, dim, 1, device=device, dtype=dtype),
        )


class RepViTBlock(fl.Chain):
    """A token mixer (stride 1, or the downsampling one), then the channel mixer."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        se: bool,
        downsample: bool,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        if not downsample and dim != out_dim:
            raise ValueError(f"a stride-1 RepViT block keeps its width ({dim} != {out_dim})")
        mixer = (
            DownsamplingTokenMixer(dim, out_dim, se, device=device, dtype=dtype)
            if downsample
            else TokenMixer(dim, se, device=device, dtype=dtype)
        )
        super().__init__(mixer, ChannelMixer(out_dim, device=device, dtype=dtype))


class RepViTStage(fl.Chain):
    """The blocks at one grid size (the first of stages 1-3 halves it)."""


class Upsample2x(fl.Module):
    """Bicubic 2x upsampling (align_corners=False, as EdgeSAM's fusion) of a channels-last grid."""

    def forward(
        self, x: Float[Tensor, "batch height width channels"]
    ) -> Float[Tensor, "batch 2*height 2*width channels"]:
        up = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2, mode="bicubic", align_corners=False)
        return up.permute(0, 2, 3, 1)


class LowResolutionPath(fl.Chain):
    """Stage 3 (S/32) from stage 2's grid, projected to the fusion width and upsampled to S/16."""


class StageFusion(fl.Sum):
    """EdgeSAM's fusion: stage 2 (S/16) projected + stage 3 (S/32) projected and upsampled 2x, channels-last."""


class RepViTEncoder(EncoderChain[RepViTConfig]):
    """RepViT image encoder with EdgeSAM's stage fusion: (B, 3, S, S) normalised, padded image ->
    (B, out_dim, S/16, S/16).

    The output of stage 2 (`widths[2]` channels at S/16, channels-last) is HQ-SAM's early embedding.
    """

    def __init__(
        self,
        config: RepViTConfig,
        image_size: int,
        out_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        del image_size  # no RepViT layer depends on the input size
        widths, se = config.widths, set(config.se_blocks)
        blocks: list[list[fl.Module]] = []
        index, width = 0, widths[0]
        for s, (out_width, depth) in enumerate(zip(widths, config.depths, strict=True)):
            blocks.append([])
            for b in range(depth):
                downsample = s > 0 and b == 0
                blocks[s].append(RepViTBlock(width, out_width, index in se, downsample, device=device, dtype=dtype))
                index, width = index + 1, out_width
        fusion = config.fusion_dim
        super().__init__(
            ConvStem(widths[0], device=device, dtype=dtype),
            RepViTStage(*blocks[0]),
            RepViTStage(*blocks[1]),
            RepViTStage(*blocks[2], fl.Permute(0, 2, 3, 1)),  # channels-last: the map HQ-SAM fuses
            StageFusion(
                fl.Linear(widths[2], fusion, bias=False, device=device, dtype=dtype),
                LowResolutionPath(
                    fl.Permute(0, 3, 1, 2),
                    RepViTStage(*blocks[3]),
                    fl.Permute(0, 2, 3, 1),
                    fl.Linear(widths[3], fusion, bias=False, device=device, dtype=dtype),
                    Upsample2x(),
                ),
            ),
            Neck(fusion, out_dim, device=device, dtype=dtype),
        )
        self.config = config

    @property
    def early_embedding_layer(self) -> fl.Module:
        return self.stages()[2]

    def stages(self) -> list[RepViTStage]:
        """The four stages, in order (stage 3 sits in the fusion's low-resolution path)."""
        top = [m for m in self if isinstance(m, RepViTStage)]
        return [*top, self.ensure_find(StageFusion).ensure_find(LowResolutionPath).ensure_find(RepViTStage)]
