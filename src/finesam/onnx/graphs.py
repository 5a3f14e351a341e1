"""What is traced into the two ONNX graphs: the model's own chains, called through the official SAM ONNX
interface (labels as floats, `has_mask_input`, `orig_im_size`), and LoRA folded into the weights it adapts.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import LoraAdapter
from torch import Tensor

from finesam.adapters.hq.layers import CachedHQFeatures, HQFeatureFusion
from finesam.adapters.lora import merged_weight
from finesam.model.prompt_encoder import MaskEncoder
from finesam.model.sam import SegmentAnything


class EncoderGraph(torch.nn.Module):
    """Model input (1, 3, S, S) -> image embedding, and with HQ-SAM the fused HQ features: in the decoder
    stage at inference they are computed once per image anyway, so the export computes them here."""

    def __init__(self, model: SegmentAnything) -> None:
        super().__init__()
        self.model = model
        self.fusion = model.find(HQFeatureFusion)

    def forward(self, image: Float[Tensor, "1 3 size size"]) -> Tensor | tuple[Tensor, Tensor]:
        embedding = self.model.encode(image)
        return embedding if self.fusion is None else (embedding, self.fusion(embedding))


def masks_at_original_size(
    low_res: Float[Tensor, "1 masks low low"], model_size: int, orig_im_size: Float[Tensor, "2"]
) -> Float[Tensor, "1 masks height width"]:
    """`postprocess_masks` with the original (height, width) as a tensor, so the graph takes any image size.
    The resized size is computed in float64, as `resized_shape` does in Python."""
    original = orig_im_size.to(torch.float64)
    resized = torch.floor(original * (model_size / original.max()) + 0.5).clamp(min=1).to(torch.int64)
    logits = F.interpolate(low_res, (model_size, model_size), mode="bilinear", align_corners=False)
    logits = logits[..., : resized[0], : resized[1]]
    size = original.to(torch.int64)
    return F.interpolate(logits, size=(size[0], size[1]), mode="bilinear", align_corners=False)  # type: ignore[arg-type]


class DecoderGraph(torch.nn.Module):
    """The prompt encoder and mask decoder (with whatever adapts them) behind the official ONNX interface.

    Point labels are -1 padding, 0 background, 1 foreground, 2 / 3 box corners (the model's own labels, as
    floats); the caller appends a padding point when there is no box, as for the official export. The mask
    input enters as `has_mask_input * MaskEncoder(mask_input) + (1 - has_mask_input) * no-mask embedding`.
    """

    def __init__(self, model: SegmentAnything, multimask_output: bool) -> None:
        super().__init__()
        self.model = model
        self.multimask_output = multimask_output
        self.hq_features = model.find(CachedHQFeatures)

    def forward(
        self,
        image_embeddings: Float[Tensor, "1 dim grid grid"],
        point_coords: Float[Tensor, "1 points 2"],
        point_labels: Float[Tensor, "1 points"],
        mask_input: Float[Tensor, "1 1 low low"],
        has_mask_input: Float[Tensor, "1"],
        orig_im_size: Float[Tensor, "2"],
        hq_features: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        prompt = {"point_coords": point_coords, "point_labels": point_labels.long(), "mask_prompt": None}
        model.set_context("sam", {**prompt, "multimask_output": self.multimask_output})
        if self.hq_features is not None:
            assert hq_features is not None
            self.hq_features.keep(hq_features)
        prompt_encoder, mask_decoder = list(model)[1:]
        prompt_encoder(image_embeddings)  # the dense embedding it writes is the no-mask one: blended below
        context = model.use_context("mask_decoder")
        with_mask = model.prompt_encoder.ensure_find(MaskEncoder)(mask_input)
        context["dense_prompt_embedding"] = (
            has_mask_input * with_mask + (1 - has_mask_input) * context["dense_prompt_embedding"]
        )
        low_res, iou = mask_decoder(image_embeddings)
        model._reset_context()
        return masks_at_original_size(low_res, model.config.image_size, orig_im_size), iou, low_res


@contextmanager
def loras_merged(model: SegmentAnything) -> Iterator[int]:
    """Within the block, every LoRA-adapted linear of `model` is a plain linear with the LoRAs folded into
    its weight (one matrix product instead of three); then the adapters are put back. Yields their count."""
    swaps: list[tuple[fl.Chain, LoraAdapter, fl.Linear]] = []
    try:
        for adapter, _ in list(model.walk(LoraAdapter)):
            linear, parent = adapter.target, adapter.parent
            assert isinstance(linear, fl.Linear) and parent is not None
            merged = fl.Linear(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                device=linear.weight.device,
                dtype=linear.weight.dtype,
            )
            merged.weight.data = merged_weight(adapter)
            if linear.bias is not None:
                merged.bias.data = linear.bias.detach().clone()
            parent.replace(adapter, merged)
            swaps.append((parent, adapter, merged))
        yield len(swaps)
    finally:
        for parent, adapter, merged in reversed(swaps):
            parent.replace(merged, adapter)
