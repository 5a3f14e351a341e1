"""TinyViT, the image encoder of MobileSAM and Light HQ-SAM: a convolutional stem, an MBConv stage, three stages
of windowed attention with learned attention biases, and SAM's neck.

Convolutional parts work on (B, C, H, W) maps with channels-last strides, attention stages on channels-last
grids (B, H, W, C).
"""

import itertools

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.config import TinyViTConfig
from finesam.model.image_encoder import Neck, WindowMerge, WindowPartition
from finesam.model.registry import EncoderChain


class BatchNorm2d(torch.nn.BatchNorm2d, fl.WeightedModule):
    """BatchNorm with running statistics (TinyViT runs it in eval mode: a fixed affine map)."""


class Conv2dBN(fl.Chain):
    """A bias-free convolution followed by BatchNorm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                use_bias=False,
                device=device,
                dtype=dtype,
            ),
            BatchNorm2d(out_channels, device=device, dtype=dtype),
        )


class ChannelsLast(fl.Module):
    """The same map with channels-last strides, which the convolutions that follow (and their outputs) keep:
    oneDNN runs 1x1 and depthwise convolutions faster on them than on channels-first maps (docs/tiny_vit.md)."""

    def forward(self, x: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch channels height width"]:
        return x.contiguous(memory_format=torch.channels_last)


class ConvStem(fl.Chain):
    """Two stride-2 3x3 convolutions: (B, 3, S, S) -> (B, dim, S/4, S/4), channels-last."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            ChannelsLast(),
            Conv2dBN(3, dim // 2, 3, stride=2, device=device, dtype=dtype),
            fl.GeLU(),
            Conv2dBN(dim // 2, dim, 3, stride=2, device=device, dtype=dtype),
        )


class MBConv(fl.Chain):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, plus the input, then GELU."""

    def __init__(self, dim: int, expand: float, device: Device | str | None = None, dtype: DType | None = None):
        hidden = int(dim * expand)
        super().__init__(
            fl.Residual(
                Conv2dBN(dim, hidden, device=device, dtype=dtype),
                fl.GeLU(),
                Conv2dBN(hidden, hidden, 3, groups=hidden, device=device, dtype=dtype),
                fl.GeLU(),
                Conv2dBN(hidden, dim, device=device, dtype=dtype),
            ),
            fl.GeLU(),
        )


class PatchMerging(fl.Chain):
    """Channels-first map -> channels-last grid with `out_dim` channels, halved in size except for the widths
    320, 448 and 576 (the official rule, which keeps the last merge of every TinyViT size at S/16)."""

    def __init__(self, dim: int, out_dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        stride = 1 if out_dim in (320, 448, 576) else 2
        super().__init__(
            Conv2dBN(dim, out_dim, device=device, dtype=dtype),
            fl.GeLU(),
            Conv2dBN(out_dim, out_dim, 3, stride=stride, groups=out_dim, device=device, dtype=dtype),
            fl.GeLU(),
            Conv2dBN(out_dim, out_dim, device=device, dtype=dtype),
            fl.Permute(0, 2, 3, 1),
        )


def attention_bias_indices(window: int) -> Tensor:
    """For every (query, key) pair of a window, the index of their offset (|dy|, |dx|) in order of appearance."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    indices = [
        offsets.setdefault((abs(y1 - y2), abs(x1 - x2)), len(offsets)) for (y1, x1) in points for (y2, x2) in points
    ]
    return torch.tensor(indices).view(len(points), len(points))


class BiasedAttention(fl.Module):
    """Multi-head attention within a window with a learned bias per head and (|dy|, |dx|) offset.

    Receives the fused projection (B, N, heads * (2 * key_dim + key_dim)), laid out head by head as [q, k, v].
    """

    def __init__(
        self, num_heads: int, key_dim: int, window: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.num_heads, self.key_dim, self.window = num_heads, key_dim, window
        self.rebuild_buffers(device)
        num_offsets = int(self.get_buffer("attention_bias_idxs").max()) + 1
        self.attention_biases = torch.nn.Parameter(torch.zeros(num_heads, num_offsets, device=device, dtype=dtype))

    def rebuild_buffers(self, device: Device | str | None = None) -> None:
        """(Re)computes the index table, which checkpoints do not store (models built on `meta` need it)."""
        indices = attention_bias_indices(self.window).to(device="cpu" if device in (None, "meta") else device)
        self.register_buffer("attention_bias_idxs", indices, persistent=False)

    def forward(self, qkv: Float[Tensor, "batch tokens 3*inner"]) -> Float[Tensor, "batch tokens inner"]:
        batch, tokens, _ = qkv.shape
        q, k, v = qkv.view(batch, tokens, self.num_heads, -1).transpose(1, 2).split(self.key_dim, dim=3)
        bias = self.attention_biases[:, self.get_buffer("attention_bias_idxs")]  # (heads, tokens, tokens)
        # a 4-D mask: with a 3-D one torch's CPU attention takes its unfused (slow) math path
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)[None])
        return out.transpose(1, 2).reshape(batch, tokens, -1)


class WindowTokens(fl.Chain):
    """(windows, w, w, C) <-> (windows, w * w, C) around a token-sequence layer."""

    def __init__(self, window: int, *layers: fl.Module) -> None:
        super().__init__(fl.Flatten(1, 2), *layers, fl.Reshape(window, window, -1))


class TinyViTAttention(fl.Chain):
    """Window partition (zero padding), LayerNorm, qkv, biased attention, projection, window merge."""

    def __init__(
        self, dim: int, num_heads: int, window: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        key_dim = dim // num_heads
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    WindowPartition(window),
                    WindowTokens(
                        window,
                        fl.LayerNorm(dim, device=device, dtype=dtype),
                        fl.Linear(dim, 3 * dim, device=device, dtype=dtype),
                        BiasedAttention(num_heads, key_dim, window, device=device, dtype=dtype),
                        fl.Linear(dim, dim, device=device, dtype=dtype),
                    ),
                ),
                fl.Identity(),
            ),
            WindowMerge(window),
        )


class LocalConv(fl.Chain):
    """Depthwise 3x3 convolution (with BatchNorm) on a channels-last grid."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Permute(0, 3, 1, 2),
            Conv2dBN(dim, dim, 3, groups=dim, device=device, dtype=dtype),
            fl.Permute(0, 2, 3, 1),
        )


class TinyViTBlock(fl.Chain):
    """Attention (residual), local convolution, MLP (residual) on a channels-last grid."""

    def __init__(
        self, dim: int, num_heads: int, window: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Residual(TinyViTAttention(dim, num_heads, window, device=device, dtype=dtype)),
            LocalConv(dim, device=device, dtype=dtype),
            fl.Residual(
                fl.LayerNorm(dim, device=device, dtype=dtype),
                fl.Linear(dim, 4 * dim, device=device, dtype=dtype),
                fl.GeLU(),
                fl.Linear(4 * dim, dim, device=device, dtype=dtype),
            ),
        )


class MBConvStage(fl.Chain):
    pass


class TinyViTStage(fl.Chain):
    pass


class TinyViTEncoder(EncoderChain[TinyViTConfig]):
    """TinyViT image encoder: (B, 3, S, S) normalised, padded image -> (B, prompt_dim, S/16, S/16).

    The output of stage 1 (after its patch merging, `dims[2]` channels at S/16) is HQ-SAM's early embedding.
    """

    def __init__(
        self,
        config: TinyViTConfig,
        image_size: int,
        out_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        del image_size  # no TinyViT layer depends on the input size (same signature as `ImageEncoder`)
        dims, depths = config.dims, config.depths
        stages: list[fl.Module] = [
            MBConvStage(
                *(MBConv(dims[0], config.mbconv_expand, device=device, dtype=dtype) for _ in range(depths[0])),
                PatchMerging(dims[0], dims[1], device=device, dtype=dtype),
            )
        ]
        for i in (1, 2, 3):
            blocks = [
                TinyViTBlock(dims[i], config.heads[i - 1], config.windows[i - 1], device=device, dtype=dtype)
                for _ in range(depths[i])
            ]
            if i < 3:
                blocks += [fl.Permute(0, 3, 1, 2), PatchMerging(dims[i], dims[i + 1], device=device, dtype=dtype)]
            stages.append(TinyViTStage(*blocks))
        super().__init__(
            ConvStem(dims[0], device=device, dtype=dtype),
            *stages,
            Neck(dims[3], out_dim, device=device, dtype=dtype),
        )
        self.config = config

    @property
    def early_embedding_layer(self) -> fl.Module:
        return self.layer("TinyViTStage_1", TinyViTStage)

    def rebuild_buffers(self, device: Device | str | None = None) -> None:
        """The attention-bias index tables, which checkpoints do not store."""
        for attention, _ in self.walk(BiasedAttention):
            attention.rebuild_buffers(device)
