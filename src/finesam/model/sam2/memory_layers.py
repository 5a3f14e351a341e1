"""Leaf layers of SAM 2's memory path: the sine position encodings (2-D for feature maps, 1-D for the object
pointers' temporal distances), the axial rotary encoding of the memory attention, dropout and layer scale."""

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

SINE_TEMPERATURE = 10000.0


def _sine_frequencies(half: int, device: Device | None) -> Tensor:
    """`half` frequencies, each used twice in a row (for a sine and a cosine)."""
    steps = torch.arange(half, dtype=torch.float32, device=device)
    return SINE_TEMPERATURE ** (2 * (steps // 2) / half)


class SinePositionEncoding2d(fl.Module):
    """The DETR sine encoding of a (B, C, H, W) map's grid (normalised positions 1..H, 1..W times 2 pi): `dim / 2`
    channels of the row, then `dim / 2` of the column, sine and cosine interleaved (official
    `PositionEmbeddingSine`, the encoding of the neck's levels and of the memories). The input gives the shape."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"the sine position encoding needs a width divisible by 4, got {dim}")
        self.dim = dim

    def forward(self, x: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch dim height width"]:
        height, width = x.shape[-2], x.shape[-1]
        half, eps, scale = self.dim // 2, 1e-6, 2 * math.pi
        rows = torch.arange(1, height + 1, dtype=torch.float32, device=x.device) / (height + eps) * scale
        cols = torch.arange(1, width + 1, dtype=torch.float32, device=x.device) / (width + eps) * scale
        frequencies = _sine_frequencies(half, x.device)

        def encode(positions: Tensor) -> Tensor:
            angles = positions[:, None] / frequencies
            return torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)

        by_row = encode(rows)[:, None, :].expand(height, width, half)
        by_col = encode(cols)[None, :, :].expand(height, width, half)
        grid = torch.cat((by_row, by_col), dim=2).permute(2, 0, 1)
        return grid[None].expand(x.shape[0], -1, -1, -1).to(x.dtype)


class SinePositions1d(fl.Module):
    """The transformer's 1-D sine encoding of (N,) positions: (N, dim), the `dim / 2` sines then the cosines
    (official `get_1d_sine_pe`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, positions: Float[Tensor, " n"]) -> Float[Tensor, "n dim"]:
        angles = positions.float()[:, None] / _sine_frequencies(self.dim // 2, positions.device)
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


def axial_rotary_angles(
    head_dim: int, width: int, height: int, theta: float, device: Device | None = None
) -> Float[Tensor, "tokens half"]:
    """The rotation angle of each channel pair of each token of a `width` x `height` grid (row-major tokens): the
    first `head_dim / 4` pairs turn with the column, the next `head_dim / 4` with the row (official
    `compute_axial_cis`)."""
    quarter = head_dim // 4
    frequencies = 1.0 / (theta ** (torch.arange(0, head_dim, 4, device=device)[:quarter].float() / head_dim))
    tokens = torch.arange(width * height, dtype=torch.float32, device=device)
    cols, rows = tokens % width, torch.div(tokens, width, rounding_mode="floor")
    return torch.cat((torch.outer(cols, frequencies), torch.outer(rows, frequencies)), dim=-1)


def rotate_pairs(x: Float[Tensor, "batch heads tokens head_dim"], angles: Float[Tensor, "tokens half"]) -> Tensor:
    """Rotates the channel pairs (2i, 2i + 1) of every token by its angles (a complex product, in reals)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


class RotaryPositions(fl.ContextModule):
    """Axial 2-D rotary encoding (RoPE) of projected (queries, keys, values) (B, N, C): the queries are a square
    grid of tokens; the keys are `repeat` such grids (the memories, each frame at the same grid positions), then
    the object pointer tokens, which are not rotated (their count is the `memory_attention` context's
    `pointer_tokens` when `excludes_pointers`). Values pass unchanged."""

    def __init__(
        self, num_heads: int, theta: float, grid: tuple[int, int], repeat_keys: bool, excludes_pointers: bool
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.theta = theta
        self.grid = grid
        self.repeat_keys = repeat_keys
        self.excludes_pointers = excludes_pointers

    def _heads(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def _merged(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    def forward(
        self, q: Float[Tensor, "batch nq dim"], k: Float[Tensor, "batch nk dim"], v: Float[Tensor, "batch nk dim"]
    ) -> tuple[Float[Tensor, "batch nq dim"], Float[Tensor, "batch nk dim"], Float[Tensor, "batch nk dim"]]:
        queries, keys = self._heads(q), self._heads(k)
        side = math.isqrt(queries.shape[-2])
        if side * side != queries.shape[-2]:
            raise ValueError(f"the rotary encoding needs a square grid of query tokens, got {queries.shape[-2]}")
        width, height = self.grid if self.grid[0] * self.grid[1] == side * side else (side, side)
        angles = axial_rotary_angles(queries.shape[-1], width, height, self.theta, q.device)
        excluded = self.use_context("memory_attention").get("pointer_tokens", 0) if self.excludes_pointers else 0
        rotated = keys.shape[-2] - excluded
        if rotated != queries.shape[-2] and not (self.repeat_keys and rotated % queries.shape[-2] == 0):
            raise ValueError(
                f"{rotated} keys to rotate for {queries.shape[-2]} queries: the memories must be whole frames of the "
                "query grid"
            )
        key_angles = angles.repeat(rotated // queries.shape[-2], 1) if rotated else angles[:0]
        keys = torch.cat((rotate_pairs(keys[:, :, :rotated], key_angles), keys[:, :, rotated:]), dim=2)
        return self._merged(rotate_pairs(queries, angles)), self._merged(keys), v


class HeadsAttention(fl.Module):
    """Multi-head scaled dot-product attention of projected (queries, keys, values) (B, N, C), with attention
    dropout in training."""

    def __init__(self, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout

    def forward(
        self, q: Float[Tensor, "batch nq dim"], k: Float[Tensor, "batch nk dim"], v: Float[Tensor, "batch nk dim"]
    ) -> Float[Tensor, "batch nq dim"]:
        def heads(x: Tensor) -> Tensor:
            return x.reshape(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(q), heads(k), heads(v), dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


class Dropout(fl.Module):
    """Dropout in training, the identity in evaluation."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)


class LayerScale(fl.WeightedModule):
    """A learned per-channel scale of channels-last features (ConvNeXt's `gamma`)."""

    def __init__(
        self, dim: int, init: float = 1e-6, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((dim,), init, device=device, dtype=dtype))

    def forward(self, x: Float[Tensor, "... dim"]) -> Float[Tensor, "... dim"]:
        return self.weight * x
