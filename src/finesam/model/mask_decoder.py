"""SAM's mask decoder: output tokens + prompt tokens, two-way transformer, hypernetwork masks and IoU head."""

from itertools import pairwise
from typing import ClassVar

from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.config import SAMConfig
from finesam.model.layers import LayerNorm2d
from finesam.model.transformer import IMAGE, TOKENS, Activation, TwoWayTransformer

__all__ = ["Activation"]  # re-exported: the variants' decoders name it from here


class MultiLayerPerceptron(fl.Chain):
    """`num_layers` linears with `activation` (ReLU) in between (none after the last)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
        activation: Activation = fl.ReLU,
    ) -> None:
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[fl.Module] = []
        for i, (a, b) in enumerate(pairwise(dims)):
            if i:
                layers.append(activation())
            layers.append(fl.Linear(a, b, device=device, dtype=dtype))
        super().__init__(*layers)


class OutputTokens(fl.Parameter):
    """The learned IoU token followed by the mask tokens (SAM 2: after its object-score token), expanded to the
    prompt batch."""

    def __init__(self, num_tokens: int, dim: int, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(num_tokens, dim, device=device, dtype=dtype)


class DecoderTokens(fl.Chain):
    """[output tokens, sparse prompt tokens]; also remembered as the transformer's query positional encoding."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.UseContext("mask_decoder", "sparse_prompt_embedding"),
            fl.Concatenate(
                OutputTokens(config.decoder.num_output_tokens, config.decoder.prompt_dim, device=device, dtype=dtype),
                fl.Identity(),
                dim=1,
            ),
            fl.SetContext("mask_decoder", "query_pe"),
        )


class GridToTokens(fl.Chain):
    """(B, D, E, E) -> (B, E * E, D)."""

    def __init__(self) -> None:
        super().__init__(fl.Flatten(2), fl.Transpose(1, 2))


class ImageTokens(fl.Chain):
    """Image embedding plus dense prompt embedding (when the model has one), as tokens; stores the key positional
    encoding."""

    def __init__(self, dense_prompt: bool = True) -> None:
        dense = [fl.Residual(fl.UseContext("mask_decoder", "dense_prompt_embedding"))] if dense_prompt else []
        super().__init__(
            fl.Passthrough(
                fl.UseContext("mask_decoder", "dense_positional_encoding"),
                GridToTokens(),
                fl.SetContext("mask_decoder", "key_pe"),
            ),
            *dense,
            GridToTokens(),
        )


class UpscaledImageEmbedding(fl.Chain):
    """Image tokens back to a grid, upscaled 4x to `prompt_dim / 8` channels: the per-pixel mask features.

    The norm after the first transposed convolution is `norm` (SAM: LayerNorm2d); a variant overrides it."""

    @staticmethod
    def norm(channels: int, device: Device | str | None = None, dtype: DType | None = None) -> fl.Module:
        return LayerNorm2d(channels, device=device, dtype=dtype)

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim, grid = config.decoder.prompt_dim, config.embedding_size
        super().__init__(
            fl.Reshape(grid, grid, dim),
            fl.Permute(0, 3, 1, 2),  # a channels-last view, which the transposed convolution reads without a copy
            fl.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2, device=device, dtype=dtype),
            self.norm(dim // 4, device=device, dtype=dtype),
            fl.GeLU(),
            fl.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.GeLU(),
        )


class MaskHypernetworks(fl.Concatenate):
    """One MLP per mask token, mapping it to the weights of its mask over the mask features."""

    def __init__(
        self,
        config: SAMConfig,
        activation: Activation = fl.ReLU,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        dim, first = config.decoder.prompt_dim, config.decoder.iou_token + 1
        super().__init__(
            *(
                fl.Chain(
                    fl.Slicing(dim=1, start=first + i, end=first + i + 1),
                    MultiLayerPerceptron(dim, dim, dim // 8, 3, device=device, dtype=dtype, activation=activation),
                )
                for i in range(config.decoder.num_mask_tokens)
            ),
            dim=1,
        )


class MaskProduct(fl.Module):
    """Each mask is the dot product of its hypernetwork weights with the mask features at every pixel."""

    def forward(
        self, weights: Float[Tensor, "batch masks channels"], features: Float[Tensor, "batch channels height width"]
    ) -> Float[Tensor, "batch masks height width"]:
        batch, channels, height, width = features.shape
        return (weights @ features.reshape(batch, channels, height * width)).reshape(batch, -1, height, width)


class MaskHead(fl.Chain):
    """(tokens, image) -> low-resolution mask logits for every mask token.

    A variant changes the hypernetworks' activation and the upscaling through the class attributes."""

    activation: ClassVar[type[fl.Module]] = fl.ReLU
    upscaling_class: ClassVar[type[UpscaledImageEmbedding]] = UpscaledImageEmbedding

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Parallel(
                fl.Chain(fl.GetArg(TOKENS), MaskHypernetworks(config, self.activation, device=device, dtype=dtype)),
                fl.Chain(fl.GetArg(IMAGE), self.upscaling_class(config, device=device, dtype=dtype)),
            ),
            MaskProduct(),
        )


class IoUHead(fl.Chain):
    """(tokens, image) -> predicted IoU of every mask, read from the IoU token."""

    def __init__(
        self,
        config: SAMConfig,
        activation: Activation = fl.ReLU,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.GetArg(TOKENS),
            fl.Slicing(dim=1, start=config.decoder.iou_token, end=config.decoder.iou_token + 1),
            fl.Squeeze(1),
            MultiLayerPerceptron(
                config.decoder.prompt_dim,
                config.decoder.iou_head_hidden_dim,
                config.decoder.num_mask_tokens,
                config.decoder.iou_head_depth,
                device=device,
                dtype=dtype,
                activation=activation,
            ),
        )


class MultimaskSelection(fl.ContextModule):
    """Keeps the multimask outputs (tokens 1..3) or the single-mask output (token 0), per `sam.multimask_output`."""

    def forward(
        self, masks: Float[Tensor, "batch masks height width"], iou: Float[Tensor, "batch masks"]
    ) -> tuple[Float[Tensor, "batch outputs height width"], Float[Tensor, "batch outputs"]]:
        selected = slice(1, None) if self.use_context("sam")["multimask_output"] else slice(0, 1)
        return masks[:, selected], iou[:, selected]


class MaskDecoder(fl.Chain):
    """Image embedding (1 or B, D, E, E) + prompt embeddings from context -> (mask logits, IoU predictions)."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Parallel(DecoderTokens(config, device=device, dtype=dtype), ImageTokens()),
            TwoWayTransformer(
                config.decoder.prompt_dim,
                config.decoder.depth,
                config.decoder.heads,
                config.decoder.mlp_dim,
                device=device,
                dtype=dtype,
            ),
            fl.Parallel(MaskHead(config, device=device, dtype=dtype), IoUHead(config, device=device, dtype=dtype)),
            MultimaskSelection(),
        )
