"""The fast versions of the ViT encoder's layers: attention with windows' positions as channels, global attention
in bounded chunks, written out as products and a softmax in 16-bit floats; windows cut after the qkv projection;
linear layers and GELU through oneDNN in bfloat16. Same formulas as the reference chains up to float rounding
(tests/test_encoder_attention.py)."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.fast.layers import linear, one_dnn_applies, writes_attention_out
from finesam.fast.swap import fast_version_of, reference_class, swapped_by_type
from finesam.model.image_encoder import FeedForward as ReferenceFeedForward
from finesam.model.image_encoder import GridAttention as ReferenceGridAttention
from finesam.model.image_encoder import RelativePositionAttention as ReferenceRelativePositionAttention
from finesam.model.image_encoder import WindowedAttention as ReferenceWindowedAttention
from finesam.model.image_encoder import WindowMerge, WindowPartition

# the (tokens x tokens) bias of a global block is built for at most this many bytes of queries at a time:
# whole images (windows) while they fit, else rows of one image. Fewer, larger chunks keep the attention kernel
# efficient; a bounded chunk keeps memory low (a ViT-B global block's whole bias is 805 MB).
CHUNK_BYTES = 48 * 2**20
# in 16-bit floats, a global block's scores are written out this many bytes of queries at a time: a chunk stays
# in the last-level cache between the product, the bias, the softmax and the second product (ViT-B: 256 queries)
SCORES_BYTES = 24 * 2**20


@swapped_by_type(chunk_bytes=CHUNK_BYTES, scores_bytes=SCORES_BYTES)
@fast_version_of(ReferenceRelativePositionAttention)
class RelativePositionAttention(ReferenceRelativePositionAttention):
    """Small grids (windows, `height + width <= head_dim`): the position terms ride along as query and key
    channels, so no (tokens x tokens) bias exists. Larger grids (global blocks): the bias is built
    `chunk_bytes` at a time into one reused buffer (a fresh large tensor per chunk costs more in page faults
    than the addition that fills it); in 16-bit floats, written out `scores_bytes` at a time (`_written_out`).
    At inference; with gradients, the reference formula.

    Set by the swap: `chunk_bytes`, `scores_bytes`.
    """

    chunk_bytes: int
    scores_bytes: int

    def forward(self, qkv: Float[Tensor, "batch height width 3*dim"]) -> Float[Tensor, "batch height width dim"]:
        if torch.is_grad_enabled():
            return super().forward(qkv)
        batch, height, width, _ = qkv.shape
        tokens = height * width
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if height + width <= q.shape[-1]:
            return self._positions_as_channels(q, k, v, height, width).reshape(batch, height, width, -1)
        if writes_attention_out(q):
            out = self._written_out(q, k, v, *self.position_terms(q, height, width))
            return out.transpose(1, 2).reshape(batch, height, width, -1)
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
        `q . rel_h[i - k] + q . rel_w[j - l]` to every logit; in 16-bit floats on the CPU, the product and the
        softmax written out (as `_written_out` says why). Returns (B, tokens, heads, head_dim)."""
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
        if writes_attention_out(q):
            scores = torch.matmul(queries, keys.transpose(-1, -2).contiguous()).mul_(scale)
            return torch.matmul(torch.softmax(scores, -1, out=scores), v.contiguous()).transpose(1, 2)
        values = F.pad(v, (0, channels - head_dim))
        out = F.scaled_dot_product_attention(queries, keys, values, scale=scale)[..., :head_dim]
        return out.transpose(1, 2)

    def _written_out(self, q: Tensor, k: Tensor, v: Tensor, bias_h: Tensor, bias_w: Tensor) -> Tensor:
        """The attention as two products, the bias and a softmax, for grid rows of queries of one image at a
        time, each chunk's scores in one reused buffer, so that the products run in 16-bit floats: on a CPU
        without AMX, torch's attention kernel computes 16-bit floats at float32 speed while its 16-bit products
        run 3-4x faster (docs/performance.md). The scores are rounded to the 16-bit type before the softmax, as
        in OpenVINO's bf16 mode. Returns (B, heads, tokens, head_dim)."""
        batch, heads, tokens, head_dim = q.shape
        height, width = bias_h.shape[2:4]
        rows = max(1, min(height, self.scores_bytes // (heads * width * tokens * q.element_size())))
        scale = head_dim**-0.5
        keys = k.transpose(-1, -2).contiguous()
        out = q.new_empty(batch, heads, tokens, v.shape[-1])
        buffer = q.new_empty(heads * rows * width * tokens)
        for image in range(batch):
            values = v[image].contiguous()  # (the product would copy a strided view for every chunk)
            for first_row in range(0, height, rows):
                in_rows = slice(first_row, first_row + rows)
                queries = slice(first_row * width, (first_row + rows) * width)
                chunk = q[image, :, queries]
                scores = buffer[: heads * chunk.shape[1] * tokens].view(heads, -1, tokens)
                grid = scores.view(heads, -1, width, height, width)
                torch.add(bias_h[image, :, in_rows], bias_w[image, :, in_rows], out=grid)
                torch.baddbmm(scores, chunk, keys[image], alpha=scale, out=scores)  # + scale q.k
                torch.softmax(scores, -1, out=scores)
                torch.matmul(scores, values, out=out[image, :, queries])
        return out

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


def _is_reference(module: torch.nn.Module | None, reference: type) -> bool:
    """`module` is of class `reference` or of its fast version (not an adapter or another class)."""
    return module is not None and (reference_class(type(module)) or type(module)) is reference


@swapped_by_type()
@fast_version_of(ReferenceFeedForward)
class FeedForward(ReferenceFeedForward):
    """In bfloat16 on the CPU at inference, the first linear layer and its GELU in one oneDNN call
    (`finesam.fast.layers.linear`); with anything else in the chain (an adapter), the reference."""

    def forward(self, *inputs: Tensor) -> Float[Tensor, "... dim"]:
        if len(inputs) == 1 and one_dnn_applies(inputs[0]) and self._exact_gelu():
            return linear(self[2], linear(self[0], inputs[0], gelu=True))
        return super().forward(*inputs)  # (in float32, with its GELU in place)

    def _exact_gelu(self) -> bool:
        """The chain is linear, GELU (erf form), linear (whatever wraps the linear layers)."""
        gelu = self[1] if len(self) == 3 else None
        exact = isinstance(gelu, fl.GeLU) and gelu.approximation == fl.GeLUApproximation.NONE
        return exact and _is_reference(gelu, fl.GeLU)


@swapped_by_type()
@fast_version_of(ReferenceGridAttention)
class GridAttention(ReferenceGridAttention):
    """The qkv and output projections through `finesam.fast.layers.linear` (oneDNN in bfloat16)."""

    def forward(self, *inputs: Tensor) -> Float[Tensor, "batch height width dim"]:
        if len(self) != 3 or len(inputs) != 1 or not one_dnn_applies(inputs[0]):
            return super().forward(*inputs)
        qkv, attention, projection = self
        return linear(projection, attention(linear(qkv, inputs[0])))


@swapped_by_type()
@fast_version_of(ReferenceWindowedAttention)
class WindowedAttention(ReferenceWindowedAttention):
    """The grid cut into windows after the qkv projection rather than before, and the windows merged before the
    output projection: both act on each token alone, so only the padding tokens change place, and a padding
    token's projection is the projection of zeros. That spares the projections of the padding (ViT-B: 4900
    tokens for 4096). At inference; with gradients or another structure (an adapter around the attention), the
    reference."""

    def forward(self, *inputs: Tensor) -> Float[Tensor, "batch height width dim"]:
        layers = self._layers()
        if layers is None or len(inputs) != 1 or torch.is_grad_enabled():
            return super().forward(*inputs)
        (x,) = inputs
        partition, merge, (qkv, attention, projection) = layers
        batch, height, width, _ = x.shape
        w = partition.window_size
        projected = linear(qkv, x)
        if height % w or width % w:
            padding = linear(qkv, x.new_zeros(1, 1, 1, x.shape[-1]))  # what the reference projects for each
            full = projected.new_empty(batch, -(-height // w) * w, -(-width // w) * w, projected.shape[-1])
            full[:, :height, :width] = projected
            full[:, height:] = padding
            full[:, :height, width:] = padding
            projected = full
        return linear(projection, merge(attention(partition.cut(projected)), x))

    def _layers(self) -> tuple[WindowPartition, WindowMerge, tuple[torch.nn.Module, ...]] | None:
        """The partition, the merge and the grid attention's layers, where the chain is the reference's."""
        if len(self) != 2:
            return None
        parallel, merge = self
        if not (type(parallel) is fl.Parallel and type(merge) is WindowMerge and len(parallel) == 2):
            return None
        windows, identity = parallel
        if not (type(identity) is fl.Identity and type(windows) is fl.Chain and len(windows) == 2):
            return None
        partition, grid = windows
        if not (isinstance(partition, WindowPartition) and isinstance(grid, fl.Chain) and len(grid) == 3):
            return None
        return (partition, merge, tuple(grid)) if _is_reference(grid, ReferenceGridAttention) else None
