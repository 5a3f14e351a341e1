"""The fast version of the ViT encoder's attention: windows with their positions as channels, global
attention in bounded chunks. Same formula as `RelativePositionAttention` up to float rounding
(tests/test_encoder_attention.py)."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from finesam.fast.swap import fast_version_of, swapped_by_type
from finesam.model.image_encoder import RelativePositionAttention as ReferenceRelativePositionAttention

# the (tokens x tokens) bias of a global block is built for at most this many bytes of queries at a time:
# whole images (windows) while they fit, else rows of one image. Fewer, larger chunks keep the attention kernel
# efficient; a bounded chunk keeps memory low (a ViT-B global block's whole bias is 805 MB).
CHUNK_BYTES = 48 * 2**20


@swapped_by_type(chunk_bytes=CHUNK_BYTES)
@fast_version_of(ReferenceRelativePositionAttention)
class RelativePositionAttention(ReferenceRelativePositionAttention):
    """Small grids (windows, `height + width <= head_dim`): the position terms ride along as query and key
    channels, so no (tokens x tokens) bias exists. Larger grids (global blocks): the bias is built
    `chunk_bytes` at a time into one reused buffer (a fresh large tensor per chunk costs more in page faults
    than the addition that fills it). At inference; with gradients, the reference formula.

    Set by the swap: `chunk_bytes`.
    """

    chunk_bytes: int

    def forward(self, qkv: Float[Tensor, "batch height width 3*dim"]) -> Float[Tensor, "batch height width dim"]:
        if torch.is_grad_enabled():
            return super().forward(qkv)
        batch, height, width, _ = qkv.shape
        tokens = height * width
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if height + width <= q.shape[-1]:
            return self._positions_as_channels(q, k, v, height, width).reshape(batch, height, width, -1)
        row_bytes = self.num_heads * width * tokens * q.element_size()
        images = max(1, min(batch, self.chunk_bytes // (row_bytes * height)))
        rows = height if images > 1 else max(1, min(height, self.chunk_bytes // row_bytes))
        if images == batch and rows == height:
            return super().forward(qkv)
        bias_h, bias_w = self.position_terms(q, height, width)
        out = self._chunked(q, k, v, bias_h, bias_w, images, rows)
        return out.transpose(1, 2).reshape(batch, height, width, -1)

    def _positions_as_channels(self, q: Tensor, k: Tensor, v: Tensor, height: int, width: int) -> Tensor:
        """The attention with no (tokens x tokens) bias: each query gains its `height + width` position terms as
        channels and each key the one-hot code of its row and column, so that the kernel's own product adds
        `q . rel_h[i - k] + q . rel_w[j - l]` to every logit. Returns (B, tokens, heads, head_dim)."""
        batch, heads, tokens, head_dim = q.shape
        scale = head_dim**-0.5  # the kernel scales every channel's product: the position terms are pre-divided
        # attention kernels are fastest at multiples of 16
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
        # while compiling, the chunks' biases are separate tensors (nothing written in place)
        reuse = not torch.compiler.is_compiling()
        buffer = q.new_empty(images * self.num_heads * rows * width * k.shape[2]) if reuse else None
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
