"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Every layer here maps the pair `(tokens, image)` to an updated pair. The positional encodings that are added
to queries and keys come from the `mask_decoder` context: `query_pe` (the tokens as they entered the
decoder) and `key_pe` (the dense positional encoding, flattened to image tokens). The image tokens plus
`key_pe` are computed once per block (`ImageWithPositions`, kept as `image_with_pe`): the keys of the
token-to-image attention and the queries of the image-to-token attention after it, whose image is the same.
"""

from collections.abc import Callable
from typing import ClassVar

from refiners.fluxion import layers as fl
from torch import device as Device
from torch import dtype as DType

TOKENS, IMAGE = 0, 1

# the activation between the layers of an MLP (SAM: ReLU; variants: GELU)
Activation = Callable[[], fl.Module]


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
    dim: int, num_heads: int, downsample: int, device: Device | str | None, dtype: DType | None
) -> fl.Attention:
    """Attention with query, key and value projections to `dim / downsample` channels, and the output
    projection back to `dim`."""
    return fl.Attention(dim, num_heads=num_heads, inner_dim=dim // downsample, device=device, dtype=dtype)


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
    """Tokens query the image tokens (queries: tokens + `query_pe`, keys: `image_with_pe`, values: the image)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        downsample: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        attention = _attention(dim, num_heads, downsample, device, dtype)
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
    """Image tokens query the prompt tokens (queries: `image_with_pe`, keys: tokens + `query_pe`, values: the
    tokens)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        downsample: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        attention = _attention(dim, num_heads, downsample, device, dtype)
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
    """Residual MLP (`activation`: SAM's ReLU) on the tokens, then a norm."""

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
        activation: Activation = fl.ReLU,
    ) -> None:
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    fl.GetArg(TOKENS),
                    fl.Residual(
                        fl.Linear(dim, mlp_dim, device=device, dtype=dtype),
                        activation(),
                        fl.Linear(mlp_dim, dim, device=device, dtype=dtype),
                    ),
                    fl.LayerNorm(dim, device=device, dtype=dtype),
                ),
                fl.GetArg(IMAGE),
            )
        )


class TwoWayAttentionBlock(fl.Chain):
    """A two-way block: tokens' self-attention, tokens to image, tokens' MLP, image to tokens.

    Variants change the self-attention and the MLP's activation through the class attributes (a subclass keeps
    its own name, so its state_dict keys stay its own)."""

    # (dim, num_heads, first_layer, device=, dtype=) -> the self-attention layer
    self_attention_class: ClassVar[Callable[..., fl.Chain]] = TokenSelfAttention
    feed_forward_class: ClassVar[type[TokenFeedForward]] = TokenFeedForward

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
            type(self).self_attention_class(dim, num_heads, first_layer, device=device, dtype=dtype),
            ImageWithPositions(),
            TokenToImageAttention(dim, num_heads, downsample=2, device=device, dtype=dtype),
            self.feed_forward_class(dim, mlp_dim, device=device, dtype=dtype),
            ImageToTokenAttention(dim, num_heads, downsample=2, device=device, dtype=dtype),
        )


def two_way_layers(
    block: type[TwoWayAttentionBlock],
    dim: int,
    depth: int,
    num_heads: int,
    mlp_dim: int,
    device: Device | str | None = None,
    dtype: DType | None = None,
) -> list[fl.Module]:
    """`depth` blocks of `block`, then a final token-to-image attention: the layers of a two-way transformer
    (a function, not a base class, so that `isinstance(m, TwoWayTransformer)` still means SAM's own)."""
    return [
        *(block(dim, num_heads, mlp_dim, first_layer=i == 0, device=device, dtype=dtype) for i in range(depth)),
        ImageWithPositions(),
        TokenToImageAttention(dim, num_heads, downsample=2, device=device, dtype=dtype),
    ]


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
        super().__init__(*two_way_layers(TwoWayAttentionBlock, dim, depth, num_heads, mlp_dim, device, dtype))
