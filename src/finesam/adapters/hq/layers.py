"""The parts HQ-SAM adds to SAM: the HQ output token, the fusion of early and final encoder features, the HQ mask head.

Contexts used: `image` (`early_embedding`, captured while the image is encoded and kept with a cached
embedding) and `hq_sam` (`hq_features`, `upscaled_embedding`, written while the decoder runs).
"""

from typing import Any

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.layers import ImageFeature, LayerNorm2d, weights_key
from finesam.model.mask_decoder import MaskProduct, MultiLayerPerceptron
from finesam.model.transformer import TOKENS

# The contexts HQ-SAM uses, declared here once.
CONTEXT = "hq_sam"  # written while the decoder runs
CONTEXT_KEYS = ("hq_features", "upscaled_embedding")
EARLY_EMBEDDING = "early_embedding"  # in the model's `image` context, captured while encoding
HQ_FEATURES, HQ_FEATURES_KEY = "hq_features", "hq_features_key"  # `image` context: the fused features, cached
IMAGE_KEYS = (EARLY_EMBEDDING, HQ_FEATURES, HQ_FEATURES_KEY)


class HQToken(fl.Parameter):
    """The learned HQ output token, appended after SAM's IoU and mask tokens."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(1, dim, device=device, dtype=dtype)


class HQTokenMLP(MultiLayerPerceptron):
    """Maps the HQ token, after the two-way transformer, to the weights of the HQ mask."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(dim, dim, dim // 8, 3, device=device, dtype=dtype)


class UpscalingStack(fl.Chain):
    """Two 2x upsamplings (transposed convolutions) with a LayerNorm2d and GELU between them."""

    def __init__(
        self, in_dim: int, mid_dim: int, out_dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.ConvTranspose2d(in_dim, mid_dim, kernel_size=2, stride=2, device=device, dtype=dtype),
            LayerNorm2d(mid_dim, device=device, dtype=dtype),
            fl.GeLU(),
            fl.ConvTranspose2d(mid_dim, out_dim, kernel_size=2, stride=2, device=device, dtype=dtype),
        )


class EmbeddingEncoder(UpscalingStack):
    """The final image embedding (D channels) upscaled 4x to the mask features (D / 8 channels)."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(dim, dim // 4, dim // 8, device=device, dtype=dtype)


class CompressEarlyFeatures(UpscalingStack):
    """The early encoder embedding (`early_dim` channels: the ViT width, or TinyViT's stage-1 width) upscaled 4x to
    the mask features (D / 8 channels). Official key: `compress_vit_feat`; finesam files before 0.2 named it
    `CompressViTFeatures` (read by `weights.hq`)."""

    def __init__(
        self, early_dim: int, dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(early_dim, dim, dim // 8, device=device, dtype=dtype)


class HQFeatureFusion(fl.Sum):
    """Image embedding (B, D, E, E) -> HQ features (B, D / 8, 4E, 4E): final plus early encoder features."""

    def __init__(
        self, early_dim: int, dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            EmbeddingEncoder(dim, device=device, dtype=dtype),
            fl.Chain(
                ImageFeature(EARLY_EMBEDDING),
                fl.Permute(0, 3, 1, 2),
                CompressEarlyFeatures(early_dim, dim, device=device, dtype=dtype),
            ),
        )


class CachedHQFeatures(fl.Chain):
    """The HQ features of the image: computed by `HQFeatureFusion`, and at inference kept in the `image` context
    (so in the `ImageEmbedding`) and reused by every later prompt of that image.

    With gradients enabled (training) they are always recomputed, so the fusion layers train. The cache is
    keyed on the fusion's parameters (`weights_key`), so new weights never reuse old features.
    """

    def __init__(self, fusion: HQFeatureFusion) -> None:
        super().__init__(fusion)

    def _key(self) -> tuple[tuple[Any, ...], ...]:
        return weights_key(tuple(self.parameters()))

    def forward(self, *inputs: Tensor) -> Float[Tensor, "batch dim/8 4*grid 4*grid"]:
        embedding = inputs[0]  # (B, D, E, E)
        image = self.use_context("image")
        inference = not torch.is_grad_enabled()
        cached = image.get(HQ_FEATURES)
        if inference and cached is not None and image.get(HQ_FEATURES_KEY) == self._key():
            return cached
        features = self.ensure_find(HQFeatureFusion)(embedding)
        if inference:
            self.keep(features)
        return features

    def keep(self, features: Float[Tensor, "batch dim/8 4*grid 4*grid"]) -> None:
        """Takes `features` as the HQ features of the current image, for every prompt until the next image
        (at inference); also features computed elsewhere, e.g. by an exported encoder."""
        self.use_context("image").update({HQ_FEATURES: features, HQ_FEATURES_KEY: self._key()})


class HQMaskFeatures(fl.Chain):
    """Refines SAM's upscaled mask features before the HQ features are added (`embedding_maskfeature`)."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Conv2d(dim // 8, dim // 4, kernel_size=3, padding=1, device=device, dtype=dtype),
            LayerNorm2d(dim // 4, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Conv2d(dim // 4, dim // 8, kernel_size=3, padding=1, device=device, dtype=dtype),
        )


class HQMaskPrediction(fl.Chain):
    """(tokens, image) -> the HQ mask logits (B, 1, 4E, 4E): the HQ token's MLP output dotted, at every pixel,
    with the decoder's upscaled mask features refined by `HQMaskFeatures`, plus the fused HQ features where
    there are some (`fused`: HQ-SAM; HQ-SAM 2 fuses no encoder feature)."""

    def __init__(
        self, hq_token_mlp: HQTokenMLP, mask_features: HQMaskFeatures, hq_token_index: int, fused: bool = True
    ) -> None:
        refined = fl.Chain(fl.UseContext(CONTEXT, "upscaled_embedding"), mask_features)
        super().__init__(
            fl.Parallel(
                fl.Chain(
                    fl.GetArg(TOKENS),
                    fl.Slicing(dim=1, start=hq_token_index, end=hq_token_index + 1),
                    hq_token_mlp,
                ),
                fl.Sum(refined, fl.UseContext(CONTEXT, "hq_features")) if fused else refined,
            ),
            MaskProduct(),
        )
        self.fused = fused


class HQRule(fl.ContextModule):
    """What the output rules of both HQ-SAM generations share: the switch between SAM's mask plus the HQ mask,
    and the HQ mask alone (`hq_mask_only`, official `hq_token_only`). Finding one in a model tells that an HQ-SAM
    adapter is injected there."""

    def __init__(self, hq_mask_only: bool = False) -> None:
        super().__init__()
        self.hq_mask_only = hq_mask_only


class HQOutputRule(HQRule):
    """The official HQ-SAM output: one SAM mask (the single-mask output, or with `multimask_output` the best
    of the three by predicted IoU) plus the HQ mask, or the HQ mask alone with `hq_mask_only`.

    Receives the logits of SAM's mask tokens followed by the HQ mask, and the IoU of SAM's mask tokens.
    """

    def forward(
        self, masks: Float[Tensor, "batch tokens height width"], iou: Float[Tensor, "batch sam_tokens"]
    ) -> tuple[Float[Tensor, "batch 1 height width"], Float[Tensor, "batch 1"]]:
        sam_masks, hq_mask = masks[:, :-1], masks[:, -1:]
        if self.use_context("sam")["multimask_output"]:
            best_iou, best = iou[:, 1:].max(dim=1, keepdim=True)
            candidates = sam_masks[:, 1:]
            # gather rather than take_along_dim: the ONNX exporter has no take_along_dim
            sam_mask = candidates.gather(1, best[..., None, None].expand(-1, -1, *candidates.shape[2:]))
        else:
            best_iou, sam_mask = iou[:, :1], sam_masks[:, :1]
        return (hq_mask if self.hq_mask_only else sam_mask + hq_mask), best_iou
