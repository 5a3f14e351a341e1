"""The SAM 2 image encoder: the Hiera trunk (four stages of windowed / global attention blocks, queries pooled 2 x 2
at each stage change) with its FPN neck, the decoder's high-resolution skips and the `no_mem_embed` of images.

The neck is interleaved with the trunk: each level is taken where its stage ends. Levels 0 and 1 (strides 4, 8) go
through their lateral and the decoder's skip projection into the `image` context; level 2 (stride 16) is its
lateral plus the nearest-upsampled lateral of stage 4 (stride 32, whose own level the image model drops).
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.image_encoder import FeedForward, WindowPartition
from finesam.model.registry import EncoderChain
from finesam.model.sam2.config import POOL_STRIDE, STAGES, HieraConfig

# the `image` context keys of the decoder's high-resolution skips (levels 0 and 1 of the neck)
HIGH_RES_KEYS = ("high_res_s0", "high_res_s1")
LAYER_NORM_EPS = 1e-6  # the official blocks' norms


class PatchEmbedding(fl.Chain):
    """Overlapping 7 x 7 patches at stride 4, projected to `dim` channels (channels-last output)."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Conv2d(3, dim, kernel_size=7, stride=4, padding=3, device=device, dtype=dtype),
            fl.Permute(0, 2, 3, 1),
        )


class WindowedPositionEmbedding(fl.Module):
    """The position embedding of a (B, H, W, C) grid: a background embedding bicubically resized to the grid, plus
    a window-sized embedding tiled over it (Bolya et al., 2023). Both are stored channels-first, the layout the
    resize works in."""

    def __init__(
        self,
        dim: int,
        background_size: tuple[int, int],
        window_size: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__()
        self.background = torch.nn.Parameter(torch.zeros(dim, *background_size, device=device, dtype=dtype))
        self.window = torch.nn.Parameter(torch.zeros(dim, window_size, window_size, device=device, dtype=dtype))

    def forward(self, x: Float[Tensor, "batch height width dim"]) -> Float[Tensor, "1 height width dim"]:
        height, width = x.shape[1], x.shape[2]
        background = F.interpolate(self.background[None], size=(height, width), mode="bicubic")
        w = self.window.shape[-1]
        # whole tiles where the grid is a multiple of the window (every size the official model runs at)
        tiles = self.window.tile(1, (height + w - 1) // w, (width + w - 1) // w)[:, :height, :width]
        return (background + tiles).permute(0, 2, 3, 1)


class AbsolutePositions(fl.Residual):
    """Adds the windowed position embedding to the patch embedding."""


class QueryPoolingAttention(fl.Module):
    """Multi-head attention on a fused qkv grid (B, H, W, 3C) whose queries are max-pooled `query_stride` x
    `query_stride` first (at stage changes): the output is the pooled grid (B, H / s, W / s, C)."""

    def __init__(self, num_heads: int, query_stride: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query_stride = query_stride

    def forward(self, qkv: Float[Tensor, "batch height width 3*dim"]) -> Float[Tensor, "batch out_h out_w dim"]:
        batch, height, width, _ = qkv.shape
        q, k, v = qkv.reshape(batch, height, width, 3, -1).unbind(3)
        if self.query_stride > 1:
            s = self.query_stride
            q = F.max_pool2d(q.permute(0, 3, 1, 2), kernel_size=s, stride=s).permute(0, 2, 3, 1)
        out_h, out_w = q.shape[1], q.shape[2]

        def heads(t: Tensor) -> Tensor:
            return t.reshape(batch, -1, self.num_heads, t.shape[-1] // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return out.transpose(1, 2).reshape(batch, out_h, out_w, -1)


class MultiScaleAttention(fl.Chain):
    """qkv projection to the block's output width, attention (with pooled queries at a stage change), output
    projection."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        query_stride: int = 1,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Linear(dim, 3 * dim_out, device=device, dtype=dtype),
            QueryPoolingAttention(num_heads, query_stride),
            fl.Linear(dim_out, dim_out, device=device, dtype=dtype),
        )


class WindowUnpartition(fl.Module):
    """Reassembles windows cut by `WindowPartition(window_size)` from the reference grid, pooled `stride` x `stride`
    inside each window, into a (B, H / stride, W / stride, C) grid (the padding cropped)."""

    def __init__(self, window_size: int, stride: int = 1) -> None:
        super().__init__()
        self.window_size = window_size
        self.stride = stride

    def forward(
        self, windows: Float[Tensor, "windows size size dim"], reference: Float[Tensor, "batch height width in_dim"]
    ) -> Float[Tensor, "batch out_h out_w dim"]:
        batch, height, width, _ = reference.shape
        w, size = self.window_size, windows.shape[1]
        rows, cols = (height + w - 1) // w, (width + w - 1) // w
        x = windows.view(batch, rows, cols, size, size, -1).transpose(2, 3).reshape(batch, rows * size, cols * size, -1)
        # the official crop: the size of the max-pooled shortcut (floor)
        return x[:, : height // self.stride, : width // self.stride].contiguous()


class WindowAttention(fl.Chain):
    """Attention inside non-overlapping windows of the grid (padded to a multiple of the window)."""

    def __init__(self, attention: MultiScaleAttention, window_size: int, query_stride: int = 1) -> None:
        super().__init__(
            fl.Parallel(fl.Chain(WindowPartition(window_size), attention), fl.Identity()),
            WindowUnpartition(window_size, query_stride),
        )


def _attention(
    dim: int,
    dim_out: int,
    num_heads: int,
    window_size: int,
    query_stride: int,
    device: Device | str | None,
    dtype: DType | None,
) -> fl.Chain:
    attention = MultiScaleAttention(dim, dim_out, num_heads, query_stride, device=device, dtype=dtype)
    return attention if window_size == 0 else WindowAttention(attention, window_size, query_stride)


def _norm(dim: int, device: Device | str | None, dtype: DType | None) -> fl.LayerNorm:
    return fl.LayerNorm(dim, eps=LAYER_NORM_EPS, device=device, dtype=dtype)


def _feed_forward(dim: int, mlp_dim: int, device: Device | str | None, dtype: DType | None) -> fl.Residual:
    """The second half of every block: x + MLP(norm(x))."""
    return fl.Residual(_norm(dim, device, dtype), FeedForward(dim, mlp_dim, device=device, dtype=dtype))


class HieraBlock(fl.Chain):
    """Pre-norm block of constant width; `window_size=0` attends globally."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        window_size: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Residual(_norm(dim, device, dtype), _attention(dim, dim, num_heads, window_size, 1, device, dtype)),
            _feed_forward(dim, mlp_dim, device, dtype),
        )


class PooledShortcut(fl.Chain):
    """The shortcut of a stage change: the normalised input projected to the new width, max-pooled 2 x 2."""

    def __init__(
        self, dim: int, dim_out: int, stride: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Linear(dim, dim_out, device=device, dtype=dtype),
            fl.Permute(0, 3, 1, 2),
            fl.MaxPool2d(kernel_size=stride, stride=stride),
            fl.Permute(0, 2, 3, 1),
        )


class PoolingBlock(fl.Chain):
    """The first block of stages 2-4: widens to `dim_out` and halves the grid. Its window is the previous stage's
    (`window_size`); the queries are pooled inside each window, so the output windows are half as wide."""

    def __init__(
        self,
        dim: int,
        dim_out: int,
        num_heads: int,
        mlp_dim: int,
        window_size: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            _norm(dim, device, dtype),
            fl.Sum(
                PooledShortcut(dim, dim_out, POOL_STRIDE, device=device, dtype=dtype),
                _attention(dim, dim_out, num_heads, window_size, POOL_STRIDE, device, dtype),
            ),
            _feed_forward(dim_out, mlp_dim, device, dtype),
        )


class HieraStage(fl.Chain):
    """The blocks of one stage (channels-last in and out)."""


class FpnLateral(fl.Chain):
    """The neck's 1 x 1 lateral convolution of one stage output (channels-last in, channels-first out)."""

    def __init__(
        self, dim: int, out_dim: int, level: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Permute(0, 3, 1, 2),
            fl.Conv2d(dim, out_dim, kernel_size=1, device=device, dtype=dtype),
        )
        self.level = level


class SetImageFeature(fl.SetContext):
    """Writes its input into the `image` context under `key`, also while that context is still empty (refiners'
    `SetContext` skips an empty one)."""

    def __init__(self, key: str) -> None:
        super().__init__("image", key)

    def __call__(self, x: Tensor) -> Tensor:
        self.use_context("image")[self.key] = x
        return x


class HighResolutionFeature(fl.Passthrough):
    """Level 0 or 1 of the neck (no top-down path at these levels) through the decoder's 1 x 1 skip projection
    (`conv_s0` / `conv_s1`, computed once per image), stored as `image` context `key` (B, C, H, W)."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        skip_dim: int,
        level: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            FpnLateral(dim, out_dim, level, device=device, dtype=dtype),
            fl.Conv2d(out_dim, skip_dim, kernel_size=1, device=device, dtype=dtype),
            SetImageFeature(HIGH_RES_KEYS[level]),
        )


class NearestUpsample(fl.Module):
    """Nearest-neighbour upsampling x2 (the neck's `fpn_interp_model: nearest`)."""

    def forward(self, x: Float[Tensor, "batch dim height width"]) -> Float[Tensor, "batch dim 2*height 2*width"]:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class TopDownPath(fl.Chain):
    """Stage 4 and its lateral, upsampled to level 2 (level 3 itself is dropped by the image model)."""


class TopDownFusion(fl.Sum):
    """Level 2 of the neck: the lateral of stage 3 plus the top-down path."""


class NoMemoryEmbedding(fl.Residual):
    """The learned embedding SAM 2 adds to the image embedding of a frame without memories (every image)."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(fl.Parameter(dim, 1, 1, device=device, dtype=dtype))


class HieraEncoder(EncoderChain[HieraConfig]):
    """SAM 2's image encoder: (B, 3, S, S) normalised, padded image -> (B, out_dim, S/16, S/16) image embedding
    (the image predictor's `image_embed`, `no_mem_embed` included), S a multiple of 32.

    On the way it writes the decoder's high-resolution features into the `image` context: `high_res_s0`
    (B, out_dim/8, S/4, S/4) and `high_res_s1` (B, out_dim/4, S/8, S/8); the parent provides that context.
    """

    def __init__(
        self,
        config: HieraConfig,
        image_size: int,
        out_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        del image_size  # every weight is independent of it (the position embedding is resized)
        dims = config.dims
        stages: list[HieraStage] = []
        block = 0
        for s in range(STAGES):
            heads = config.heads * 2**s
            mlp_dim = int(dims[s] * config.mlp_ratio)
            blocks: list[fl.Module] = []
            for b in range(config.stages[s]):
                # the first block of a stage keeps the previous stage's window (the official lag by a block)
                window = config.window_spec[s - 1 if b == 0 and s > 0 else s]
                window = 0 if block in config.global_attention_blocks else window
                if b == 0 and s > 0:
                    blocks.append(PoolingBlock(dims[s - 1], dims[s], heads, mlp_dim, window, device, dtype))
                else:
                    blocks.append(HieraBlock(dims[s], heads, mlp_dim, window, device, dtype))
                block += 1
            stages.append(HieraStage(blocks))
        background = config.position_embedding_size
        super().__init__(
            PatchEmbedding(dims[0], device=device, dtype=dtype),
            AbsolutePositions(
                WindowedPositionEmbedding(
                    dims[0], (background[0], background[1]), config.window_spec[0], device=device, dtype=dtype
                )
            ),
            stages[0],
            HighResolutionFeature(dims[0], out_dim, out_dim // 8, 0, device=device, dtype=dtype),
            stages[1],
            HighResolutionFeature(dims[1], out_dim, out_dim // 4, 1, device=device, dtype=dtype),
            stages[2],
            TopDownFusion(
                FpnLateral(dims[2], out_dim, 2, device=device, dtype=dtype),
                TopDownPath(stages[3], FpnLateral(dims[3], out_dim, 3, device=device, dtype=dtype), NearestUpsample()),
            ),
            NoMemoryEmbedding(out_dim, device=device, dtype=dtype),
        )
        self.config = config

    @property
    def early_embedding_layer(self) -> fl.Module:
        """Stage 1: its output is the (B, S/4, S/4, embed_dim) channels-last map (no adapter reads it yet)."""
        return self.ensure_find(HieraStage)
