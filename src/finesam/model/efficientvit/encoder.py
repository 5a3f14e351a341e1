"""EfficientViT-SAM's image encoder as fluxion chains: the EfficientViT "large" backbone and `SamNeck`.

Backbone (stride 2 per stage):

    stage 0   ConvLayer 3x3 / 2, then local blocks (ResBlock)
    stage i   a stride-2 block (fused MBConv, or MBConv before attention stages), then
              local blocks (`fmb`, `mb`) or EfficientViT blocks (`att`): x + LiteMLA(x), then x + MBConv(x)

LiteMLA: 1x1 projection to q, k, v per head; multi-scale aggregation (a depthwise k x k and a grouped 1x1
convolution of the same q, k, v, as more heads); ReLU linear attention per head; 1x1 projection and BatchNorm.

SamNeck: each fused stage projected to the neck width (1x1 + BatchNorm) and resampled bicubically to the
embedding grid, summed; neck blocks with residuals; a 1x1 projection to the prompt width; LayerNorm2d.

Every activation is GELU (tanh approximation), every BatchNorm in eval mode a fixed affine map (eps 1e-6, as the
official model zoo sets it). The 1x1 projections of the attention and of the neck's output are linear layers
over channels (`Pointwise`), so LoRA adapts them.
"""

from typing import cast

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from refiners.fluxion.context import Contexts
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.efficientvit.config import ATTENTION_BLOCKS, EfficientViTConfig
from finesam.model.layers import LayerNorm2d
from finesam.model.registry import EncoderChain
from finesam.model.tiny_vit import BatchNorm2d, Conv2dBN

NORM_EPS = 1e-6  # every norm of the released models (the official `set_norm_eps(model, 1e-6)`)
ATTENTION_EPS = 1e-15  # LiteMLA's guard of the linear attention's normaliser
CONTEXT = "efficientvit"  # the stage outputs the neck reads, by `stage_key`


def stage_key(stage: int) -> str:
    return f"stage_{stage}"


def _gelu() -> fl.GeLU:
    return fl.GeLU(approximation=fl.GeLUApproximation.TANH)


class ConvLayer(fl.Chain):
    """The official ConvLayer: a convolution ("same" padding), BatchNorm (or a bias), GELU (optional)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm: bool = True,
        act: bool = True,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        conv: fl.Module
        if norm:  # BatchNorm after a bias-free convolution (folded into it by the fast path)
            conv = Conv2dBN(in_channels, out_channels, kernel_size, stride, groups, device=device, dtype=dtype)
            bn = conv.ensure_find(BatchNorm2d)
            bn.eps = NORM_EPS
        else:
            conv = fl.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                device=device,
                dtype=dtype,
            )
        super().__init__(conv, *([_gelu()] if act else []))


class Pointwise(fl.Chain):
    """A 1x1 convolution written as a linear layer over the channels (what LoRA adapts)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bias: bool = True,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Permute(0, 2, 3, 1),
            fl.Linear(in_channels, out_channels, bias=bias, device=device, dtype=dtype),
            fl.Permute(0, 3, 1, 2),
        )


def _mid(channels: int, expand: float) -> int:
    return round(channels * expand)


class ResBlock(fl.Chain):
    """Two 3x3 convolutions (the first strided, with GELU)."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand: float, fewer_norm: bool, **kw: object
    ) -> None:
        mid = _mid(in_channels, expand)
        super().__init__(
            ConvLayer(in_channels, mid, 3, stride, norm=not fewer_norm, **kw),  # type: ignore[arg-type]
            ConvLayer(mid, out_channels, 3, 1, act=False, **kw),  # type: ignore[arg-type]
        )


class FusedMBConv(fl.Chain):
    """A full 3x3 convolution that expands (strided, GELU), a 1x1 that projects back."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand: float, fewer_norm: bool, **kw: object
    ) -> None:
        mid = _mid(in_channels, expand)
        super().__init__(
            ConvLayer(in_channels, mid, 3, stride, norm=not fewer_norm, **kw),  # type: ignore[arg-type]
            ConvLayer(mid, out_channels, 1, act=False, **kw),  # type: ignore[arg-type]
        )


class MBConv(fl.Chain):
    """Inverted residual: 1x1 expansion (GELU), depthwise 3x3 (strided, GELU), 1x1 projection."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, expand: float, fewer_norm: bool, **kw: object
    ) -> None:
        mid = _mid(in_channels, expand)
        super().__init__(
            ConvLayer(in_channels, mid, 1, norm=not fewer_norm, **kw),  # type: ignore[arg-type]
            ConvLayer(mid, mid, 3, stride, groups=mid, norm=not fewer_norm, **kw),  # type: ignore[arg-type]
            ConvLayer(mid, out_channels, 1, act=False, **kw),  # type: ignore[arg-type]
        )


LOCAL = {"res": ResBlock, "fmb": FusedMBConv, "mb": MBConv}


class LocalBlock(fl.Residual):
    """x + block(x)."""


class DownsamplingBlock(fl.Chain):
    """The first block of a stage: stride 2, no shortcut."""


class Aggregation(fl.Chain):
    """Multi-scale aggregation of q, k, v: a depthwise `scale` x `scale` convolution, then a 1x1 convolution
    grouped by head."""

    def __init__(
        self, channels: int, heads: int, scale: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Conv2d(
                channels,
                channels,
                scale,
                padding=scale // 2,
                groups=channels,
                use_bias=False,
                device=device,
                dtype=dtype,
            ),
            fl.Conv2d(channels, channels, 1, groups=3 * heads, use_bias=False, device=device, dtype=dtype),
        )


class MultiScaleQKV(fl.Concatenate):
    """q, k, v of every head, then the aggregated ones as further heads (channel axis)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        scales: tuple[int, ...],
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Identity(), *(Aggregation(channels, heads, s, device=device, dtype=dtype) for s in scales), dim=1
        )


class ReLULinearAttention(fl.Module):
    """Per head, ReLU(q) . (ReLU(k)^T v) normalised by ReLU(q) . sum(ReLU(k)): linear in the number of pixels.
    Where the map has no more pixels than `head_dim` the official code takes the quadratic form of the same
    formula; so does this one."""

    def __init__(self, head_dim: int, eps: float = ATTENTION_EPS) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.eps = eps

    def forward(self, qkv: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch out height width"]:
        batch, _, height, width = qkv.shape
        dim = self.head_dim
        qkv = qkv.reshape(batch, -1, 3 * dim, height * width)
        q, k, v = qkv[:, :, :dim], qkv[:, :, dim : 2 * dim], qkv[:, :, 2 * dim :]
        q, k = F.relu(q), F.relu(k)
        if height * width > dim:
            v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # a row of ones: the normaliser
            out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)
            out = out.float() if out.dtype == torch.bfloat16 else out
            out = (out[:, :, :-1] / (out[:, :, -1:] + self.eps)).to(qkv.dtype)
        else:
            scores = torch.matmul(k.transpose(-1, -2), q)
            dtype = scores.dtype
            scores = scores.float()
            scores = (scores / (torch.sum(scores, dim=2, keepdim=True) + self.eps)).to(dtype)
            out = torch.matmul(v, scores)
        return out.reshape(batch, -1, height, width)


class LiteMLA(fl.Chain):
    """Lightweight multi-scale linear attention: projection to q, k, v, multi-scale aggregation, ReLU linear
    attention, projection and BatchNorm."""

    def __init__(
        self,
        channels: int,
        head_dim: int,
        scales: tuple[int, ...],
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        heads = channels // head_dim
        total = heads * head_dim
        norm = BatchNorm2d(channels, eps=NORM_EPS, device=device, dtype=dtype)
        super().__init__(
            Pointwise(channels, 3 * total, bias=False, device=device, dtype=dtype),
            MultiScaleQKV(3 * total, heads, scales, device=device, dtype=dtype),
            ReLULinearAttention(head_dim),
            Pointwise(total * (1 + len(scales)), channels, bias=False, device=device, dtype=dtype),
            norm,
        )


class ContextModule(fl.Residual):
    """x + LiteMLA(x)."""


class EfficientViTBlock(fl.Chain):
    """Global context (linear attention), then local mixing (MBConv with biases), each with a residual."""

    def __init__(
        self,
        channels: int,
        head_dim: int,
        expand: float,
        scale: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            ContextModule(LiteMLA(channels, head_dim, (scale,), device=device, dtype=dtype)),
            LocalBlock(MBConv(channels, channels, 1, expand, fewer_norm=True, device=device, dtype=dtype)),
        )


class EfficientViTStage(fl.Chain):
    """One stage of the backbone (stage 0 is the stem)."""


class EarlyFeatures(fl.Chain):
    """The stage output HQ-SAM fuses, seen channels-last (B, H, W, C); the backbone turns it back."""

    def __init__(self) -> None:
        super().__init__(fl.Permute(0, 2, 3, 1))


class Backbone(fl.Chain):
    """The stages in order; those the neck reads leave their output in the `efficientvit` context."""


def _stage(config: EfficientViTConfig, i: int, device: Device | str | None, dtype: DType | None) -> EfficientViTStage:
    kw = dict(device=device, dtype=dtype)
    width, block, expand, fewer = config.widths[i], config.blocks[i], config.expands[i], config.fewer_norms[i]
    layers: list[fl.Module] = []
    if i == 0:
        layers.append(ConvLayer(3, width, 3, 2, **kw))  # type: ignore[arg-type]
        in_channels = width
    else:
        in_channels = config.widths[i - 1]
        down = LOCAL[block if block in LOCAL and block != "res" else "mb"]
        layers.append(DownsamplingBlock(down(in_channels, width, 2, expand * 4, fewer, **kw)))
    for _ in range(config.depths[i]):
        if block in ATTENTION_BLOCKS:
            layers.append(EfficientViTBlock(width, config.head_dim, expand, ATTENTION_BLOCKS[block], **kw))  # type: ignore[arg-type]
        else:
            layers.append(LocalBlock(LOCAL[block](width, width, 1, expand, fewer, **kw)))
    return EfficientViTStage(*layers)


class Upsample(fl.Module):
    """Bicubic resampling to the embedding grid (in float32, as the official layer), unless already there."""

    def __init__(self, grid: int) -> None:
        super().__init__()
        self.grid = grid

    def forward(self, x: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch channels grid grid"]:
        if x.shape[-2] == self.grid and x.shape[-1] == self.grid:
            return x
        size = (self.grid, self.grid)
        return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False).to(x.dtype)


class NeckInput(fl.Chain):
    """One fused stage: its output, projected to the neck width (1x1 + BatchNorm), at the embedding grid."""

    def __init__(
        self, stage: int, in_channels: int, width: int, grid: int, device: Device | str | None, dtype: DType | None
    ) -> None:
        super().__init__(
            fl.UseContext(CONTEXT, stage_key(stage)),
            ConvLayer(in_channels, width, 1, act=False, device=device, dtype=dtype),
            Upsample(grid),
        )
        self.stage = stage


class NeckInputs(fl.Sum):
    """The fused stages, summed."""


class NeckBlocks(fl.Chain):
    """The neck's residual blocks."""


class SamNeck(fl.Chain):
    """Fuses the last stages at the embedding grid and projects them to the prompt width."""

    def __init__(
        self, config: EfficientViTConfig, grid: int, out_dim: int, device: Device | str | None, dtype: DType | None
    ) -> None:
        width = config.neck_width
        super().__init__(
            NeckInputs(
                *(NeckInput(s, config.widths[s], width, grid, device, dtype) for s in config.neck_stages),
            ),
            NeckBlocks(
                *(
                    LocalBlock(
                        LOCAL[config.neck_block](width, width, 1, config.neck_expand, False, device=device, dtype=dtype)
                    )
                    for _ in range(config.neck_depth)
                )
            ),
            Pointwise(width, out_dim, bias=True, device=device, dtype=dtype),
        )


class EfficientViTEncoder(EncoderChain[EfficientViTConfig]):
    """EfficientViT-SAM's image encoder: (B, 3, input_size, input_size) normalised, padded image -> (B, out_dim,
    image_size / 16, image_size / 16), the embedding grid of the prompt frame (`image_size`, 1024 in the
    releases) whatever the input size.

    The output of the finest stage the neck reads (`config.early_stage`) is HQ-SAM's early embedding.
    """

    def __init__(
        self,
        config: EfficientViTConfig,
        image_size: int,
        out_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.config = config
        grid = image_size // config.patch_size
        backbone: list[fl.Module] = []
        for i in range(len(config.widths)):
            backbone.append(_stage(config, i, device, dtype))
            if i in config.neck_stages:
                backbone.append(fl.SetContext(CONTEXT, stage_key(i)))
            if i == config.early_stage and i < len(config.widths) - 1:
                backbone += [EarlyFeatures(), fl.Permute(0, 3, 1, 2)]
            elif i == config.early_stage:
                backbone.append(EarlyFeatures())  # the last stage: nothing reads the backbone's output
        super().__init__(
            Backbone(*backbone),
            SamNeck(config, grid, out_dim, device, dtype),
            LayerNorm2d(out_dim, eps=NORM_EPS, device=device, dtype=dtype),
        )

    def init_context(self) -> Contexts:
        # keys present from the start: refiners' SetContext writes nothing into an empty context dict
        return {CONTEXT: {stage_key(s): None for s in self.config.neck_stages}}

    @property
    def early_embedding_layer(self) -> fl.Module:
        return self.ensure_find(EarlyFeatures)

    def stages(self) -> list[EfficientViTStage]:
        """The backbone's stages, in order."""
        return [cast(EfficientViTStage, s) for s, _ in self.walk(EfficientViTStage)]
