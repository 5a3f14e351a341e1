"""The ViT image encoder of SAM: patches, absolute positions, windowed and global attention blocks, neck."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.config import ViTShape
from finesam.model.layers import LayerNorm2d
from finesam.model.registry import EncoderChain


class PatchEmbedding(fl.Chain):
    """Cuts the image into `patch_size` squares and projects each to `dim` channels (channels-last output)."""

    def __init__(self, patch_size: int, dim: int, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(
            fl.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, device=device, dtype=dtype),
            fl.Permute(0, 2, 3, 1),
        )


class PositionEmbedding(fl.Residual):
    """Adds a learned absolute position embedding to every patch."""

    def __init__(self, grid_size: int, dim: int, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(fl.Parameter(grid_size, grid_size, dim, device=device, dtype=dtype))


def relative_positions(rel_pos: Float[Tensor, "2*size-1 head_dim"], size: int) -> Float[Tensor, "size size head_dim"]:
    """Embedding of the offset `q - k` for every query/key index pair along one axis."""
    offsets = torch.arange(size, device=rel_pos.device)
    return rel_pos[offsets[:, None] - offsets[None, :] + size - 1]


class RelativePositionAttention(fl.Module):
    """Multi-head attention over a square grid with decomposed relative position biases (MViTv2).

    Receives the fused `qkv` projection (B, H, W, 3C) and returns the attended values (B, H, W, C).
    The bias added to the logits of query (i, j) and key (k, l) is `q . rel_h[i - k] + q . rel_w[j - l]`.
    """

    def __init__(
        self, dim: int, num_heads: int, grid_size: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.grid_size = grid_size
        head_dim = dim // num_heads
        self.rel_pos_h = torch.nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim, device=device, dtype=dtype))
        self.rel_pos_w = torch.nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim, device=device, dtype=dtype))

    def forward(self, qkv: Float[Tensor, "batch height width 3*dim"]) -> Float[Tensor, "batch height width dim"]:
        batch, height, width, _ = qkv.shape
        tokens = height * width
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias_h, bias_w = self.position_terms(q, height, width)
        bias = (bias_h + bias_w).reshape(batch, self.num_heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).reshape(batch, height, width, -1)

    def position_terms(
        self, q: Float[Tensor, "batch heads tokens head_dim"], height: int, width: int
    ) -> tuple[Float[Tensor, "batch heads height width height 1"], Float[Tensor, "batch heads height width 1 width"]]:
        """The two terms of the bias, `q . rel_h[i - k]` and `q . rel_w[j - l]` for query (i, j) and key (k, l),
        shaped to broadcast to (B, heads, H, W, H, W) when added."""
        batch, heads, _, _ = q.shape
        grid_q = q.reshape(batch, heads, height, width, -1)
        rel_h, rel_w = relative_positions(self.rel_pos_h, height), relative_positions(self.rel_pos_w, width)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h)[..., :, None]
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w)[..., None, :]
        return bias_h, bias_w


class GridAttention(fl.Chain):
    """qkv projection, relative-position attention, output projection."""

    def __init__(
        self, dim: int, num_heads: int, grid_size: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Linear(dim, 3 * dim, device=device, dtype=dtype),
            RelativePositionAttention(dim, num_heads, grid_size, device=device, dtype=dtype),
            fl.Linear(dim, dim, device=device, dtype=dtype),
        )


class WindowPartition(fl.Module):
    """Pads a (B, H, W, C) grid to a multiple of the window and returns the windows (B * n, w, w, C)."""

    def __init__(self, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size

    def forward(self, x: Float[Tensor, "batch height width dim"]) -> Float[Tensor, "windows size size dim"]:
        _, height, width, _ = x.shape
        w = self.window_size
        # (w - n % w) % w rather than -n % w: the ONNX exporter's tracer rounds divisions of negatives toward 0
        return self.cut(F.pad(x, (0, 0, 0, (w - width % w) % w, 0, (w - height % w) % w)))

    def cut(self, x: Float[Tensor, "batch height width dim"]) -> Float[Tensor, "windows size size dim"]:
        """The windows of a grid whose sides are multiples of the window, row by row."""
        batch, height, width, dim = x.shape
        w = self.window_size
        return x.view(batch, height // w, w, width // w, w, dim).transpose(2, 3).reshape(-1, w, w, dim)


class WindowMerge(fl.Module):
    """Inverse of `WindowPartition`: reassembles windows into the layout (and size) of the reference grid."""

    def __init__(self, window_size: int) -> None:
        super().__init__()
        self.window_size = window_size

    def forward(
        self, windows: Float[Tensor, "windows size size dim"], reference: Float[Tensor, "batch height width dim"]
    ) -> Float[Tensor, "batch height width dim"]:
        batch, height, width, _ = reference.shape
        w = self.window_size
        rows, cols = (height + w - 1) // w, (width + w - 1) // w  # no negative operands (see WindowPartition)
        x = windows.view(batch, rows, cols, w, w, -1).transpose(2, 3).reshape(batch, rows * w, cols * w, -1)
        return x[:, :height, :width].contiguous()


class WindowedAttention(fl.Chain):
    """Attention restricted to non-overlapping `window_size` squares of the grid."""

    def __init__(
        self, dim: int, num_heads: int, window_size: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    WindowPartition(window_size),
                    GridAttention(dim, num_heads, window_size, device=device, dtype=dtype),
                ),
                fl.Identity(),
            ),
            WindowMerge(window_size),
        )


class FeedForward(fl.Chain):
    def __init__(self, dim: int, hidden_dim: int, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(
            fl.Linear(dim, hidden_dim, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Linear(hidden_dim, dim, device=device, dtype=dtype),
        )


class TransformerBlock(fl.Chain):
    """Pre-norm ViT block; `window_size=None` makes its attention global over the whole `grid_size` grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        grid_size: int,
        window_size: int | None,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        attention = (
            GridAttention(dim, num_heads, grid_size, device=device, dtype=dtype)
            if window_size is None
            else WindowedAttention(dim, num_heads, window_size, device=device, dtype=dtype)
        )
        super().__init__(
            fl.Residual(fl.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype), attention),
            fl.Residual(
                fl.LayerNorm(dim, eps=1e-6, device=device, dtype=dtype),
                FeedForward(dim, mlp_dim, device=device, dtype=dtype),
            ),
        )
        self.is_global = window_size is None


class TransformerBlocks(fl.Chain):
    pass


class Neck(fl.Chain):
    """Projects the ViT output to the `out_dim`-channel image embedding (channels-first)."""

    def __init__(self, dim: int, out_dim: int, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(
            fl.Permute(0, 3, 1, 2),
            fl.Conv2d(dim, out_dim, kernel_size=1, use_bias=False, device=device, dtype=dtype),
            LayerNorm2d(out_dim, device=device, dtype=dtype),
            fl.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, use_bias=False, device=device, dtype=dtype),
            LayerNorm2d(out_dim, device=device, dtype=dtype),
        )


class ImageEncoder(EncoderChain[ViTShape]):
    """ViT image encoder: (B, 3, S, S) normalised, padded image -> (B, prompt_dim, S/16, S/16) image embedding."""

    def __init__(
        self,
        config: ViTShape,
        image_size: int,
        out_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        grid = image_size // config.patch_size
        dim = config.dim
        super().__init__(
            PatchEmbedding(config.patch_size, dim, device=device, dtype=dtype),
            PositionEmbedding(grid, dim, device=device, dtype=dtype),
            TransformerBlocks(
                TransformerBlock(
                    dim,
                    config.heads,
                    config.mlp_dim,
                    grid,
                    window_size=None if i in config.global_attention_blocks else config.window_size,
                    device=device,
                    dtype=dtype,
                )
                for i in range(config.depth)
            ),
            Neck(dim, out_dim, device=device, dtype=dtype),
        )
        self.config = config

    @property
    def early_embedding_layer(self) -> fl.Module:
        """The first global-attention block: HQ-SAM's early embedding is its output."""
        blocks = [block for block, _ in self.walk(TransformerBlock)]
        return blocks[self.config.early_embedding_block]
