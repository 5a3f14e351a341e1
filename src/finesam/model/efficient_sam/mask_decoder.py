"""EfficientSAM's mask decoder: a variant of SAM's, built from SAM's parts where they are the same.

Shared with SAM (`finesam.model.mask_decoder`, `finesam.model.transformer`): the output tokens before the prompt
tokens, the token-to-image and image-to-token attentions with their positional encodings, the final
token-to-image attention, the mask product and the multimask selection. Its own:

- the image tokens are the embedding alone (no dense prompt: there is no mask input);
- GELU wherever SAM has ReLU (the tokens' MLP, the hypernetworks, the IoU head);
- the tokens' self-attention keeps its residual in the first block too, and in later blocks the positional
  encoding is added to the tokens themselves (queries, keys, values and the residual all carry it);
- the upscaling normalises with GroupNorm(1, C) (over channels and pixels) where SAM has LayerNorm2d.
"""

from refiners.fluxion import layers as fl
from torch import device as Device
from torch import dtype as DType

from finesam.model.config import SAMConfig
from finesam.model.mask_decoder import (
    DecoderTokens,
    GridToTokens,
    IoUHead,
    MaskHypernetworks,
    MaskProduct,
    MultimaskSelection,
)
from finesam.model.transformer import (
    IMAGE,
    TOKENS,
    ImageToTokenAttention,
    ImageWithPositions,
    TokenToImageAttention,
    with_positional_encoding,
)


class ImageOnlyTokens(fl.Chain):
    """The image embedding as tokens (no dense prompt is added); stores the key positional encoding."""

    def __init__(self) -> None:
        super().__init__(
            fl.Passthrough(
                fl.UseContext("mask_decoder", "dense_positional_encoding"),
                GridToTokens(),
                fl.SetContext("mask_decoder", "key_pe"),
            ),
            GridToTokens(),
        )


class ResidualTokenSelfAttention(fl.Chain):
    """x + attention(x, x, x), then a norm, with x the tokens (first block) or the tokens plus `query_pe`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        first_layer: bool,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        tokens = fl.GetArg(TOKENS) if first_layer else with_positional_encoding(TOKENS, "query_pe")
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    tokens,
                    fl.Residual(
                        fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity()),
                        fl.Attention(dim, num_heads=num_heads, device=device, dtype=dtype),
                    ),
                    fl.LayerNorm(dim, device=device, dtype=dtype),
                ),
                fl.GetArg(IMAGE),
            )
        )


class GeLUTokenFeedForward(fl.Chain):
    """Residual MLP (GELU) on the tokens, then a norm."""

    def __init__(self, dim: int, mlp_dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    fl.GetArg(TOKENS),
                    fl.Residual(
                        fl.Linear(dim, mlp_dim, device=device, dtype=dtype),
                        fl.GeLU(),
                        fl.Linear(mlp_dim, dim, device=device, dtype=dtype),
                    ),
                    fl.LayerNorm(dim, device=device, dtype=dtype),
                ),
                fl.GetArg(IMAGE),
            )
        )


class EfficientSAMAttentionBlock(fl.Chain):
    """A two-way block: tokens' self-attention (its own), tokens to image (SAM's), tokens' MLP (GELU), image to
    tokens (SAM's)."""

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
            ResidualTokenSelfAttention(dim, num_heads, first_layer, device=device, dtype=dtype),
            ImageWithPositions(),
            TokenToImageAttention(dim, num_heads, downsample=2, device=device, dtype=dtype),
            GeLUTokenFeedForward(dim, mlp_dim, device=device, dtype=dtype),
            ImageToTokenAttention(dim, num_heads, downsample=2, device=device, dtype=dtype),
        )


class EfficientSAMTransformer(fl.Chain):
    """`depth` two-way blocks, then SAM's final token-to-image attention."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        decoder = config.decoder
        dim, heads = decoder.prompt_dim, decoder.heads
        super().__init__(
            *(
                EfficientSAMAttentionBlock(dim, heads, decoder.mlp_dim, i == 0, device=device, dtype=dtype)
                for i in range(decoder.depth)
            ),
            ImageWithPositions(),
            TokenToImageAttention(dim, heads, downsample=2, device=device, dtype=dtype),
        )


class GroupNormUpscaling(fl.Chain):
    """Image tokens back to a grid, upscaled 4x to `prompt_dim / 8` channels: transposed convolution, GroupNorm
    with one group, GELU, transposed convolution, GELU (official `final_output_upscaling_layers`)."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim, grid = config.decoder.prompt_dim, config.embedding_size
        super().__init__(
            fl.Reshape(grid, grid, dim),
            fl.Permute(0, 3, 1, 2),
            fl.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.GroupNorm(dim // 4, num_groups=1, device=device, dtype=dtype),
            fl.GeLU(),
            fl.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.GeLU(),
        )


class EfficientSAMMaskHead(fl.Chain):
    """(tokens, image) -> low-resolution mask logits for every mask token: GELU hypernetworks, GroupNorm upscaling,
    SAM's mask product."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Parallel(
                fl.Chain(fl.GetArg(TOKENS), MaskHypernetworks(config, fl.GeLU, device=device, dtype=dtype)),
                fl.Chain(fl.GetArg(IMAGE), GroupNormUpscaling(config, device=device, dtype=dtype)),
            ),
            MaskProduct(),
        )


class EfficientSAMMaskDecoder(fl.Chain):
    """Image embedding (1 or B, D, E, E) + prompt embeddings from context -> (mask logits, IoU predictions)."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Parallel(DecoderTokens(config, device=device, dtype=dtype), ImageOnlyTokens()),
            EfficientSAMTransformer(config, device=device, dtype=dtype),
            fl.Parallel(
                EfficientSAMMaskHead(config, device=device, dtype=dtype),
                IoUHead(config, fl.GeLU, device=device, dtype=dtype),
            ),
            MultimaskSelection(),
        )
