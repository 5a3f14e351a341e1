"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Every layer here maps the pair `(tokens, image)` to an updated pair. The positional encodings that are added
to queries and keys come from the `mask_decoder` context: `query_pe` (the tokens as they entered the
decoder) and `key_pe` (the dense positional encoding, flattened to image tokens). The image tokens plus
`key_pe` are computed once per block (`ImageWithPositions`, kept as `image_with_pe`): the keys of the
token-to-image attention and the queries of the image-to-token attention after it, whose image is the same.
"""

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import LoraAdapter
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.layers import Linear, eager_inference, linear_weights

TOKENS, IMAGE = 0, 1


def with_positional_encoding(index: int, key: str) -> fl.Chain:
    """Picks the tokens or the image from the pair and adds its positional encoding."""
    return fl.Chain(fl.GetArg(index), fl.Residual(fl.UseContext("mask_decoder", key)))


class ImageWithPositions(fl.Passthrough):
    """Keeps the image tokens plus their positional encoding as `mask_decoder.image_with_pe`, for the attentions
    that follow until the image tokens change; passes the pair on unchanged."""

    def __init__(self) -> None:
        super().__init__(with_positional_encoding(IMAGE, "key_pe"), fl.SetContext("mask_decoder", "image_with_pe"))


def image_with_positions() -> fl.UseContext:
    return fl.UseContext("mask_decoder", "image_with_pe")


def _attention(
    dim: int,
    num_heads: int,
    downsample: int,
    device: Device | str | None,
    dtype: DType | None,
    image_side: tuple[int, ...] = (),
    few_keys: bool = False,
) -> fl.Attention:
    """Attention with its query, key and value projections; those at `image_side` (indices of q, k, v) read
    only the image and remember their output for it (`finesam.model.layers.Linear`). Where the image tokens
    query the few prompt tokens (`few_keys`), it is our `Attention` with `FewKeysDotProduct`."""
    kind = Attention if few_keys else fl.Attention
    attention = kind(dim, num_heads=num_heads, inner_dim=dim // downsample, device=device, dtype=dtype)
    projections = attention.ensure_find(fl.Distribute)
    for index in image_side:
        old = projections[index]
        assert isinstance(old, fl.Linear)
        projections.replace(old, Linear(old.in_features, old.out_features, device=device, dtype=dtype))
    if few_keys:
        attention.replace(attention.ensure_find(fl.ScaledDotProductAttention), FewKeysDotProduct(num_heads))
    return attention


class Attention(fl.Attention):
    """`fl.Attention` (same name and layers, so the same keys and LoRA paths) between the few prompt tokens and
    the many image tokens, that at inference never runs a projection over every image token.

    Few queries (tokens query the image): for head h with key projection (W_h, b_h),
    `q_h . (W_h x + b_h) = (W_h^T q_h) . x + q_h . b_h`: the queries are taken back to the keys' input space,
    where the scores are one product with the image tokens (the `q_h . b_h` term is the same for every key, and
    the softmax drops it). The weights sum to 1, so the values' projection commutes with the weighted sum and
    is applied to the few mixed rows instead of every image token.

    Few keys (the image queries the tokens, `FewKeysDotProduct`): the output projection is applied to each
    head's few value rows before the weighted sum instead of to every image token after it, and, unless the
    query projection remembers its output for the image (the first block), the keys are taken to the queries'
    input space as above (here the `k_h . b_h` term differs between keys and is kept).

    Heads x (queries or keys) products of the input width replace two projections of every image token: fewer
    multiply-adds while heads x tokens stays under the inner width. LoRAs on the projections are folded into
    their weights. Same formula up to float rounding; with gradients, while tracing or compiling, with more
    tokens, or when another adapter wraps a projection or replaces the attention, it runs as `fl.Attention`.
    """

    def forward(self, *args: Tensor) -> Tensor:
        query, key, value = args
        if eager_inference():
            kernel = type(self[1])  # any other (an adapter's, a variant's) runs as written
            if kernel is fl.ScaledDotProductAttention and query.shape[1] * self.num_heads < self.inner_dim:
                return self._few_queries(query, key, value)
            if kernel is FewKeysDotProduct and key.shape[1] * self.num_heads < self.inner_dim:
                return self._few_keys(query, key, value)
        return super().forward(query, key, value)

    def _few_queries(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        to_query, to_key, to_value = self.ensure_find(fl.Distribute)
        key_weights, value_weights = linear_weights(to_key), linear_weights(to_value)
        if key_weights is None or value_weights is None:
            return super().forward(query, key, value)
        (key_weight, _), (value_weight, value_bias) = key_weights, value_weights
        q = to_query(query)
        batch, tokens, inner = q.shape
        heads = self.num_heads
        head_dim = inner // heads
        q = q.reshape(batch, tokens, heads, head_dim) * head_dim**-0.5
        queries_in_input_space = torch.einsum("bthd,hdc->bhtc", q, key_weight.unflatten(0, (heads, head_dim)))
        weights = (queries_in_input_space.flatten(1, 2) @ key.transpose(1, 2)).softmax(dim=-1)  # (B, H * T, N)
        mixed = (weights @ value).unflatten(1, (heads, tokens))  # (B, H, T, input width)
        out = torch.einsum("bhtc,hdc->bthd", mixed, value_weight.unflatten(0, (heads, head_dim)))
        out = out.reshape(batch, tokens, inner)
        if value_bias is not None:
            out = out + value_bias
        return self[2](out)

    def _few_keys(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        to_query, to_key, to_value = self.ensure_find(fl.Distribute)
        out_weights = linear_weights(self[2])
        if out_weights is None:
            return super().forward(query, key, value)
        heads, keys = self.num_heads, key.shape[1]
        k = to_key(key)
        k_rows = _block_diagonal(k * (k.shape[2] // heads) ** -0.5, heads).transpose(1, 2)  # (B, H * L, inner)
        # remembered for the image (with or without a LoRA around it, so that a zero LoRA changes nothing), or
        # not a plain linear: project the queries
        remembered = type(to_query.target if isinstance(to_query, LoraAdapter) else to_query) is Linear
        query_weights = None if remembered else linear_weights(to_query)
        if query_weights is None:
            scores = k_rows @ to_query(query).transpose(1, 2)  # (B, H * L, N)
        else:
            query_weight, query_bias = query_weights
            scores = (k_rows @ query_weight) @ query.transpose(1, 2)
            if query_bias is not None:
                scores = scores + (k_rows @ query_bias).unsqueeze(2)
        weights = softmax_over_key_rows(scores, heads, keys)
        out_weight, out_bias = out_weights
        # each head's value rows through its slice of the output projection: (B, H * L, output width)
        projected_values = _block_diagonal(to_value(value), heads).transpose(1, 2) @ out_weight.T
        if out_bias is None:
            return weights.transpose(1, 2) @ projected_values  # (B, N, H * L) x (B, H * L, output width)
        return torch.baddbmm(out_bias, weights.transpose(1, 2), projected_values)  # the bias in the same pass


def _block_diagonal(x: Float[Tensor, "batch length heads*head_dim"], heads: int) -> Tensor:
    """(B, L, H * d) -> (B, H * d, H * L): head h's features feed only head h's L columns, zeros elsewhere."""
    batch, length, dim = x.shape
    one_hot = torch.eye(heads, device=x.device, dtype=x.dtype)
    split = x.reshape(batch, length, heads, dim // heads)
    return torch.einsum("blhd,hg->bhdgl", split, one_hot).reshape(batch, dim, heads * length)


def softmax_over_key_rows(scores: Float[Tensor, "batch heads*keys queries"], heads: int, keys: int) -> Tensor:
    """Softmax over each head's `keys` rows of (B, H * L, Q) scores (rows: one per head and key)."""
    grouped = scores.unflatten(1, (heads, keys))
    weights = (grouped - grouped.amax(dim=2, keepdim=True)).exp()
    return (weights / weights.sum(dim=2, keepdim=True)).flatten(1, 2)


class FewKeysDotProduct(fl.ScaledDotProductAttention):
    """Multi-head attention of many queries (the image tokens) over a few keys (the prompt tokens).

    With a handful of keys, per-head kernels spend their time on per-row overheads (a softmax over 7 values,
    4096 times per head). Here all heads are two matrix products with block-diagonal keys and values, and
    the softmax runs over the key axis laid out as rows. Same formula as `ScaledDotProductAttention` up to
    float rounding; above `max_keys` keys (many point prompts) it falls back to it, as the block-diagonal
    products grow with heads x keys.
    """

    def __init__(self, num_heads: int, max_keys: int = 16) -> None:
        super().__init__(num_heads=num_heads)
        self.max_keys = max_keys

    def _process_attention(
        self,
        query: Float[Tensor, "batch queries dim"],
        key: Float[Tensor, "batch keys dim"],
        value: Float[Tensor, "batch keys dim"],
    ) -> Float[Tensor, "batch queries dim"]:
        _, keys, dim = key.shape
        if keys > self.max_keys:
            return super()._process_attention(query, key, value)
        heads = self.num_heads
        scaled_keys = key * (dim // heads) ** -0.5
        # (B, H * L, D) x (B, D, Q): the scores of every head, one row per (head, key)
        # (transpose rather than .mT: the ONNX exporter has no .mT)
        keys_rows = _block_diagonal(scaled_keys, heads).transpose(1, 2)
        weights = softmax_over_key_rows(keys_rows @ query.transpose(1, 2), heads, keys)
        return weights.transpose(1, 2) @ _block_diagonal(value, heads).transpose(1, 2)  # (B, Q, H * L) x (B, H * L, D)


class TokenSelfAttention(fl.Chain):
    """Tokens attend to themselves; the first layer uses neither positional encoding nor a residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        first_layer: bool,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        def query() -> fl.Module:
            return fl.GetArg(TOKENS) if first_layer else with_positional_encoding(TOKENS, "query_pe")

        attention = fl.Chain(
            fl.Parallel(query(), query(), fl.GetArg(TOKENS)),
            _attention(dim, num_heads, 1, device, dtype),
        )
        updated = attention if first_layer else fl.Sum(fl.GetArg(TOKENS), attention)
        super().__init__(
            fl.Parallel(
                fl.Chain(updated, fl.LayerNorm(dim, device=device, dtype=dtype)),
                fl.GetArg(IMAGE),
            )
        )


class TokenToImageAttention(fl.Chain):
    """Tokens query the image tokens (keys: `image_with_pe`); in the first block (`first_layer`) the keys and
    values, which then depend on the image alone, are computed once per image; in the others they are never
    computed at inference (`Attention`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        downsample: int,
        first_layer: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        if first_layer:  # keys and values remembered for the image
            attention = _attention(dim, num_heads, downsample, device, dtype, image_side=(1, 2))
        else:
            attention = Attention(dim, num_heads=num_heads, inner_dim=dim // downsample, device=device, dtype=dtype)
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    fl.Sum(
                        fl.GetArg(TOKENS),
                        fl.Chain(
                            fl.Parallel(
                                with_positional_encoding(TOKENS, "query_pe"),
                                image_with_positions(),
                                fl.GetArg(IMAGE),
                            ),
                            attention,
                        ),
                    ),
                    fl.LayerNorm(dim, device=device, dtype=dtype),
                ),
                fl.GetArg(IMAGE),
            )
        )


class ImageToTokenAttention(fl.Chain):
    """Image tokens (queries: `image_with_pe`) query the prompt tokens; in the first block (`first_layer`) the
    queries, which then depend on the image alone, are computed once per image."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        downsample: int,
        first_layer: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        attention = _attention(dim, num_heads, downsample, device, dtype, (0,) if first_layer else (), few_keys=True)
        super().__init__(
            fl.Parallel(
                fl.GetArg(TOKENS),
                fl.Chain(
                    fl.Sum(
                        fl.GetArg(IMAGE),
                        fl.Chain(
                            fl.Parallel(
                                image_with_positions(),
                                with_positional_encoding(TOKENS, "query_pe"),
                                fl.GetArg(TOKENS),
                            ),
                            attention,
                        ),
                    ),
                    fl.LayerNorm(dim, device=device, dtype=dtype),
                ),
            )
        )


class TokenFeedForward(fl.Chain):
    """Residual MLP on the tokens, then a norm."""

    def __init__(self, dim: int, mlp_dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    fl.GetArg(TOKENS),
                    fl.Residual(
                        fl.Linear(dim, mlp_dim, device=device, dtype=dtype),
                        fl.ReLU(),
                        fl.Linear(mlp_dim, dim, device=device, dtype=dtype),
                    ),
                    fl.LayerNorm(dim, device=device, dtype=dtype),
                ),
                fl.GetArg(IMAGE),
            )
        )


class TwoWayAttentionBlock(fl.Chain):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        first_layer: bool,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            TokenSelfAttention(dim, num_heads, first_layer, device=device, dtype=dtype),
            ImageWithPositions(),
            TokenToImageAttention(dim, num_heads, downsample=2, first_layer=first_layer, device=device, dtype=dtype),
            TokenFeedForward(dim, mlp_dim, device=device, dtype=dtype),
            ImageToTokenAttention(dim, num_heads, downsample=2, first_layer=first_layer, device=device, dtype=dtype),
        )


class TwoWayTransformer(fl.Chain):
    """`depth` two-way blocks, then a final token-to-image attention."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            *(
                TwoWayAttentionBlock(dim, num_heads, mlp_dim, first_layer=i == 0, device=device, dtype=dtype)
                for i in range(depth)
            ),
            ImageWithPositions(),
            TokenToImageAttention(dim, num_heads, downsample=2, device=device, dtype=dtype),
        )
