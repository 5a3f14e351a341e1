"""SAM 2's mask decoder: SAM's two-way transformer and heads, plus an object-score token and head, the
high-resolution image features added inside the upscaling, and the stability fallback of single-mask output.

Output tokens are `[object score, IoU, mask 0, mask 1..3]`. The decoder maps the image embedding (with the
prompt embeddings in context) to (mask logits, IoU predictions, object-score logits).
"""

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.config import SAMConfig
from finesam.model.layers import ImageFeature, LayerNorm2d
from finesam.model.mask_decoder import (
    DecoderTokens,
    ImageTokens,
    IoUHead,
    MaskHypernetworks,
    MaskProduct,
    MultiLayerPerceptron,
)
from finesam.model.sam2.config import SAM2DecoderConfig
from finesam.model.sam2.hiera import HIGH_RES_KEYS
from finesam.model.transformer import IMAGE, TOKENS, TwoWayTransformer

HIGH_RES_S0, HIGH_RES_S1 = HIGH_RES_KEYS  # written by the encoder (strides 4 and 8)


def sam2_decoder(config: SAMConfig) -> SAM2DecoderConfig:
    """The SAM 2 decoder configuration of `config`, or a `ValueError` saying it is another kind."""
    if not isinstance(config.decoder, SAM2DecoderConfig):
        raise ValueError(f"the SAM 2 decoder needs a SAM2DecoderConfig, got {config.decoder!r}")
    return config.decoder


class UpscaledWithSkips(fl.Chain):
    """Image tokens back to a grid, upscaled 4x as in SAM, with the encoder's high-resolution features added
    after each transposed convolution (stride 8 features after the first, stride 4 after the second)."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim, grid = config.decoder.prompt_dim, config.embedding_size
        super().__init__(
            fl.Reshape(grid, grid, dim),
            fl.Permute(0, 3, 1, 2),
            fl.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.Residual(ImageFeature(HIGH_RES_S1)),
            LayerNorm2d(dim // 4, device=device, dtype=dtype),
            fl.GeLU(),
            fl.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2, device=device, dtype=dtype),
            fl.Residual(ImageFeature(HIGH_RES_S0)),
            fl.GeLU(),
        )


class SAM2MaskHead(fl.Chain):
    """(tokens, image) -> low-resolution mask logits for every mask token."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Parallel(
                fl.Chain(fl.GetArg(TOKENS), MaskHypernetworks(config, device=device, dtype=dtype)),
                fl.Chain(fl.GetArg(IMAGE), UpscaledWithSkips(config, device=device, dtype=dtype)),
            ),
            MaskProduct(),
        )


class SAM2IoUHead(fl.Chain):
    """SAM's IoU head, through a sigmoid when the configuration says so."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        sigmoid = [fl.Sigmoid()] if sam2_decoder(config).iou_sigmoid else []
        super().__init__(IoUHead(config, device=device, dtype=dtype), *sigmoid)


class ObjectScoreHead(fl.Chain):
    """(tokens, image) -> the logit that the prompted object is in the image, read from the object-score token
    (B, 1)."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        dim = config.decoder.prompt_dim
        super().__init__(
            fl.GetArg(TOKENS),
            fl.Slicing(dim=1, start=0, end=1),
            fl.Squeeze(1),
            MultiLayerPerceptron(dim, dim, 1, 3, device=device, dtype=dtype),
        )


def stability_scores(logits: Float[Tensor, "batch 1 h w"], delta: float) -> Float[Tensor, "batch 1"]:
    """IoU of the mask thresholded at +delta with the mask thresholded at -delta (1 when both are empty)."""
    inner = (logits > delta).flatten(-2).sum(-1).float()
    outer = (logits > -delta).flatten(-2).sum(-1).float()
    return torch.where(outer > 0, inner / outer, 1.0)


class SAM2MultimaskSelection(fl.ContextModule):
    """Multimask output: tokens 1..3. Single-mask output: token 0, or, with `dynamic_multimask` at inference,
    the best of tokens 1..3 by predicted IoU wherever token 0's mask is unstable (SAM 2's image predictor)."""

    def __init__(self, config: SAM2DecoderConfig) -> None:
        super().__init__()
        self.dynamic = config.dynamic_multimask
        self.delta = config.stability_delta
        self.threshold = config.stability_threshold

    def forward(
        self,
        masks: Float[Tensor, "batch masks h w"],
        iou: Float[Tensor, "batch masks"],
        scores: Float[Tensor, "batch 1"],
    ) -> tuple[Float[Tensor, "batch outputs h w"], Float[Tensor, "batch outputs"], Float[Tensor, "batch 1"]]:
        if self.use_context("sam")["multimask_output"]:
            return masks[:, 1:], iou[:, 1:], scores
        single, single_iou = masks[:, :1], iou[:, :1]
        if not self.dynamic or self.training:
            return single, single_iou, scores
        best = iou[:, 1:].argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        best_masks, best_iou = masks[:, 1:][rows, best][:, None], iou[:, 1:][rows, best][:, None]
        stable = stability_scores(single, self.delta) >= self.threshold
        chosen = torch.where(stable[..., None, None], single, best_masks)
        return chosen, torch.where(stable, single_iou, best_iou), scores


class SAM2MaskDecoder(fl.Chain):
    """Image embedding (1 or B, D, E, E) + prompt embeddings from context + high-resolution features from the
    `image` context -> (mask logits, IoU predictions, object-score logits)."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        decoder = sam2_decoder(config)
        super().__init__(
            fl.Parallel(DecoderTokens(config, device=device, dtype=dtype), ImageTokens()),
            TwoWayTransformer(
                decoder.prompt_dim, decoder.depth, decoder.heads, decoder.mlp_dim, device=device, dtype=dtype
            ),
            fl.Parallel(
                SAM2MaskHead(config, device=device, dtype=dtype),
                SAM2IoUHead(config, device=device, dtype=dtype),
                ObjectScoreHead(config, device=device, dtype=dtype),
            ),
            SAM2MultimaskSelection(decoder),
        )
