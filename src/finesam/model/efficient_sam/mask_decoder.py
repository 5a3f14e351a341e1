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
    ImageTokens,
    IoUHead,
    MaskHead,
    MultimaskSelection,
    UpscaledImageEmbedding,
)
from finesam.model.transformer import (
    IMAGE,
    TOKENS,
    TokenFeedForward,
    TwoWayAttentionBlock,
    two_way_layers,
    with_positional_encoding,
)


class ImageOnlyTokens(ImageTokens):
    """The image embedding as tokens (no dense prompt is added); stores the key positional encoding."""

    def __init__(self) -> None:
        super().__init__(dense_prompt=False)


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


class GeLUTokenFeedForward(TokenFeedForward):
    """SAM's residual MLP on the tokens with GELU, then a norm."""

    def __init__(self, dim: int, mlp_dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(dim, mlp_dim, device=device, dtype=dtype, activation=fl.GeLU)


class EfficientSAMAttentionBlock(TwoWayAttentionBlock):
    """A two-way block: tokens' self-attention (its own), tokens to image (SAM's), tokens' MLP (GELU), image to
    tokens (SAM's)."""

    self_attention_class = ResidualTokenSelfAttention
    feed_forward_class = GeLUTokenFeedForward


class EfficientSAMTransformer(fl.Chain):
    """`depth` two-way blocks, then SAM's final token-to-image attention (not a `TwoWayTransformer`: SAM's fast
    path matches that class)."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        decoder = config.decoder
        super().__init__(
            *two_way_layers(
                EfficientSAMAttentionBlock,
                decoder.prompt_dim,
                decoder.depth,
                decoder.heads,
                decoder.mlp_dim,
                device=device,
                dtype=dtype,
            )
        )


class GroupNormUpscaling(UpscaledImageEmbedding):
    """SAM's upscaling with GroupNorm(1, C) where SAM has LayerNorm2d (official `final_output_upscaling_layers`)."""

    @staticmethod
    def norm(channels: int, device: Device | str | None = None, dtype: DType | None = None) -> fl.Module:
        return fl.GroupNorm(channels, num_groups=1, device=device, dtype=dtype)


class EfficientSAMMaskHead(MaskHead):
    """(tokens, image) -> low-resolution mask logits for every mask token: GELU hypernetworks, GroupNorm upscaling,
    SAM's mask product."""

    activation = fl.GeLU
    upscaling_class = GroupNormUpscaling


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
