"""The ViT image encoder of SAM: patches, absolute positions, windowed and global attention blocks, neck."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.config import ViTShape
from finesam.model.layers import GeLU, LayerNorm2d, eager_inference
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

    # the (tokens x tokens) bias is built for at most this many bytes of queries at a time: whole images (windows)
    # while they fit, else rows of one image. Fewer, larger chunks keep the attention kernel efficient; a bounded
    # chunk keeps memory low (a ViT-B global block's whole bias is 805 MB).
    chunk_bytes = 48 * 2**20

    def forward(self, qkv: Float[Tensor, "batch height width 3*dim"]) -> Float[Tensor, "batch height width dim"]:
        batch, height, width, _ = qkv.shape
        tokens = height * width
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        head_dim = q.shape[-1]
        if height + width <= head_dim:  # small grids (windows): the positions ride along as channels
            return self._positions_as_channels(q, k, v, height, width).reshape(batch, height, width, -1)
        grid_q = q.reshape(batch, self.num_heads, height, width, -1)
        rel_h, rel_w = relative_positions(self.rel_pos_h, height), relative_positions(self.rel_pos_w, width)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h)[..., :, None]
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w)[..., None, :]
        row_bytes = self.num_heads * width * tokens * q.element_size()  # (while tracing, sizes are tensors)
        images = max(1, min(batch, self.chunk_bytes // (row_bytes * height)))
        rows = height if images > 1 else max(1, min(height, self.chunk_bytes // row_bytes))
        if images == batch and rows == height:  # one pass (and the only one the ONNX exporter sees)
            bias = (bias_h + bias_w).reshape(batch, self.num_heads, tokens, tokens)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            out = self._chunked(q, k, v, bias_h, bias_w, images, rows)
        return out.transpose(1, 2).reshape(batch, height, width, -1)

    def _positions_as_channels(self, q: Tensor, k: Tensor, v: Tensor, height: int, width: int) -> Tensor:
        """The same attention with no (tokens x tokens) bias: each query gains its `height + width` position
        terms as channels and each key the one-hot code of its row and column, so that the kernel's own
        product adds `q . rel_h[i - k] + q . rel_w[j - l]` to every logit. Returns (B, tokens, heads, head_dim).
        """
        batch, heads, tokens, head_dim = q.shape
        scale = head_dim**-0.5  # the kernel scales every channel's product: the position terms are pre-divided
        # attention kernels are fastest at multiples of 16 (no negative operands: see WindowPartition)
        channels = (head_dim + height + width + 15) // 16 * 16
        offsets_h = self.rel_pos_h.shape[0]
        # every query's product with every relative offset of each axis, and a zero column for the padding
        table = torch.cat([self.rel_pos_h, self.rel_pos_w, self.rel_pos_h.new_zeros(1, head_dim)]) / scale
        products = q @ table.T
        token = torch.arange(tokens, device=q.device)
        row, column = token // width, token % width
        zero = offsets_h + self.rel_pos_w.shape[0]
        padding = channels - head_dim - height - width
        index = torch.cat(
            [
                row[:, None] - torch.arange(height, device=q.device) + height - 1,
                column[:, None] - torch.arange(width, device=q.device) + width - 1 + offsets_h,
                torch.full((tokens, padding), zero, dtype=torch.long, device=q.device),
            ],
            dim=1,
        )
        terms = products.gather(-1, index.expand(batch, heads, -1, -1))
        code = torch.cat([F.one_hot(row, height), F.one_hot(column, width), row.new_zeros(tokens, padding)], dim=1)
        queries = torch.cat([q, terms], dim=-1)
        keys = torch.cat([k, code.to(k.dtype).expand(batch, heads, -1, -1)], dim=-1)
        values = F.pad(v, (0, channels - head_dim))
        out = F.scaled_dot_product_attention(queries, keys, values, scale=scale)[..., :head_dim]
        return out.transpose(1, 2)

    def _chunked(
        self, q: Tensor, k: Tensor, v: Tensor, bias_h: Tensor, bias_w: Tensor, images: int, rows: int
    ) -> Tensor:
        """The attention `images` images and `rows` grid rows of queries at a time: identical to one pass."""
        batch, _, height, width = bias_h.shape[:4]
        # at inference every chunk's bias is written into one buffer: a fresh large tensor per chunk costs more
        # in page faults than the addition that fills it
        buffer = q.new_empty(images * self.num_heads * rows * width * k.shape[2]) if eager_inference() else None
        outputs: list[Tensor] = []
        for first_image in range(0, batch, images):
            in_images = slice(first_image, first_image + images)
            image_outputs: list[Tensor] = []
            for first_row in range(0, height, rows):
                in_rows = slice(first_row, first_row + rows)
                row_h, row_w = bias_h[in_images, :, in_rows], bias_w[in_images, :, in_rows]
                shape = torch.broadcast_shapes(row_h.shape, row_w.shape)
                if buffer is None:
                    bias = row_h + row_w
                else:
                    bias = torch.add(row_h, row_w, out=buffer[: shape.numel()].view(shape))
                queries = q[in_images, :, first_row * width : (first_row + rows) * width]
                bias = bias.reshape(shape[0], self.num_heads, queries.shape[2], -1)
                image_outputs.append(
                    F.scaled_dot_product_attention(queries, k[in_images], v[in_images], attn_mask=bias)
                )
            outputs.append(torch.cat(image_outputs, dim=2) if len(image_outputs) > 1 else image_outputs[0])
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


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
        batch, height, width, dim = x.shape
        w = self.window_size
        # (w - n % w) % w rather than -n % w: the ONNX exporter's tracer rounds divisions of negatives toward 0
        x = F.pad(x, (0, 0, 0, (w - width % w) % w, 0, (w - height % w) % w))
        rows, cols = x.shape[1] // w, x.shape[2] // w
        return x.view(batch, rows, w, cols, w, dim).transpose(2, 3).reshape(-1, w, w, dim)


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
            GeLU(in_place=True),
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
