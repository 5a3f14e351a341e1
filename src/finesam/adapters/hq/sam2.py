"""`HQSAM2Adapter`: HQ-SAM 2 (SysCV's sam-hq2) injected into a frozen `SegmentAnything2` (SAM 2 / SAM 2.1), and
ejected again, without editing it.

What differs from HQ-SAM 1 (`HQSAMAdapter`): no early encoder feature is fused (SAM 2's upscaled embedding
already holds the Hiera high-resolution skips), so the HQ mask is the HQ token's MLP output dotted with
`HQMaskFeatures(upscaled)` alone (`HQMaskPrediction(fused=False)`); the HQ token comes after the object-score,
IoU and mask tokens; the SAM masks are chosen by SAM 2's rule (multimask, token 0, or the stability fallback,
decided on the SAM logits alone) and the HQ mask is added to each of them (multimask output gives three masks,
not one).
"""

from typing import ClassVar

from jaxtyping import Float
from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import Adapter
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.adapters.hq.adapter import (
    HQAdapter,
    HQMaskHead,
    HQOutputToken,
    UpscaledEmbeddingCapture,
)
from finesam.adapters.hq.layers import CONTEXT_KEYS, HQMaskFeatures, HQMaskPrediction, HQRule
from finesam.model.mask_decoder import OutputTokens
from finesam.model.sam import SegmentAnything
from finesam.model.sam2.mask_decoder import SAM2MaskDecoder, SAM2MaskHead, SAM2MultimaskSelection, UpscaledWithSkips

UPSCALED_EMBEDDING = CONTEXT_KEYS[1]  # the `hq_sam` context key HQ-SAM 2 writes (HQ-SAM's upscaled embedding)


class SAMMasksOfHQ(fl.Module):
    """(SAM masks then the HQ mask, IoU, object scores) -> (SAM masks, IoU, object scores): what SAM 2's own
    selection reads."""

    def forward(
        self,
        masks: Float[Tensor, "batch tokens h w"],
        iou: Float[Tensor, "batch masks"],
        scores: Float[Tensor, "batch 1"],
    ) -> tuple[Float[Tensor, "batch masks h w"], Float[Tensor, "batch masks"], Float[Tensor, "batch 1"]]:
        return masks[:, :-1], iou, scores


class HQMaskOfHQ(fl.Module):
    """(SAM masks then the HQ mask, IoU, object scores) -> the HQ mask (B, 1, h, w)."""

    def forward(self, masks: Float[Tensor, "batch tokens h w"], *_: Tensor) -> Float[Tensor, "batch 1 h w"]:
        return masks[:, -1:]


class HQ2OutputRule(HQRule):
    """The official HQ-SAM 2 output: each mask chosen by SAM 2's selection plus the HQ mask, or the HQ mask alone
    with `hq_mask_only` (one mask, with the IoU of the SAM path; with multimask output, the best of its three: the
    official code returns all three with the one mask, which no caller can pair)."""

    def forward(
        self,
        selected: tuple[Float[Tensor, "batch outputs h w"], Float[Tensor, "batch outputs"], Float[Tensor, "batch 1"]],
        hq_mask: Float[Tensor, "batch 1 h w"],
    ) -> tuple[Float[Tensor, "batch outputs h w"], Float[Tensor, "batch outputs"], Float[Tensor, "batch 1"]]:
        sam_masks, iou, scores = selected
        if self.hq_mask_only:
            return hq_mask, iou.amax(dim=1, keepdim=True), scores
        return sam_masks + hq_mask, iou, scores


class HQ2MaskSelection(fl.Chain, Adapter[SAM2MultimaskSelection]):
    """SAM 2's selection on the SAM masks alone (the HQ mask takes no part in the stability fallback), then the
    HQ-SAM 2 output rule."""

    def __init__(self, target: SAM2MultimaskSelection, rule: HQ2OutputRule) -> None:
        with self.setup_adapter(target):
            super().__init__(fl.Parallel(fl.Chain(SAMMasksOfHQ(), target), HQMaskOfHQ()), rule)


class HQSAM2Adapter(HQAdapter):
    """HQ-SAM 2 as an adapter of a `SegmentAnything2` of any size (the official release is SAM 2.1 large).

    Its children are the HQ parts (token, token MLP, mask features: 13 tensors, the official `hf_token`, `hf_mlp`
    and `embedding_maskfeature`). `inject()` appends the HQ token after SAM 2's output tokens (it takes part in
    the two-way attention, so SAM's own masks change too), keeps the upscaled embedding, adds the HQ mask head
    and the output rule; `eject()` restores the base exactly.

    Output: single-mask, the SAM mask chosen by SAM 2's rule (token 0, or the stability fallback where
    `SAM2DecoderConfig.dynamic_multimask` says so) plus the HQ mask; multimask, each of the three SAM masks plus
    the HQ mask; with `hq_mask_only` (official `hq_token_only`), the HQ mask alone (one mask, with the IoU of the
    SAM path; for multimask output the best of its three, where the official code returns all three unpaired).
    """

    context_keys: ClassVar[tuple[str, ...]] = (UPSCALED_EMBEDDING,)
    declared_image_keys: ClassVar[tuple[str, ...]] = ()
    image_keys: ClassVar[tuple[str, ...]] = ()
    official_prefix: ClassVar[str] = "sam_mask_decoder"

    def __init__(
        self,
        target: SegmentAnything,
        hq_mask_only: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        refusal = ("HQ-SAM 2 adapts SAM 2's mask decoder", "HQ-SAM 1 is HQSAMAdapter; hq_adapter_for picks")
        shared = self._shared_parts(target, SAM2MaskDecoder, refusal, device, dtype)
        token, token_mlp = shared.token, shared.token_mlp
        dim = target.config.decoder.prompt_dim
        mask_features = HQMaskFeatures(dim, device=shared.device, dtype=shared.dtype)
        rule = HQ2OutputRule(hq_mask_only)
        self._rule = [rule]
        self._adapters = [
            HQOutputToken(target.ensure_find(OutputTokens), token),
            UpscaledEmbeddingCapture(target.ensure_find(UpscaledWithSkips)),
            HQMaskHead(
                target.ensure_find(SAM2MaskHead),
                HQMaskPrediction(token_mlp, mask_features, target.config.decoder.num_output_tokens, fused=False),
            ),
            HQ2MaskSelection(target.ensure_find(SAM2MultimaskSelection), rule),
        ]
        self._hold(target, [token, token_mlp, mask_features])
