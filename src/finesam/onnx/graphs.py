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

from finesam.adapters.hq.layers import EARLY_EMBEDDING, CachedHQFeatures, HQFeatureFusion
from finesam.adapters.lora import merged_weight
from finesam.inputs import BICUBIC_RESIZE, CROP_THEN_RESIZE, PIXEL_MEAN, PIXEL_STD, RESIZE
from finesam.model.image_encoder import ImageEncoder, TransformerBlock
from finesam.model.prompt_encoder import MaskEncoder
from finesam.model.sam import SegmentAnything


class PixelsInput(torch.nn.Module):
    """The resized RGB pixels (H, W, 3), float32 0-255 with the longest side `size` (the caller resizes, as the
    model's preprocessing says) -> the model input (1, 3, size, size): normalised with SAM's mean and std, then
    padded bottom and right with zeros. H and W stay dynamic in the graph."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32)  # constants of the graph
        self.std = torch.tensor(PIXEL_STD, dtype=torch.float32)

    def forward(self, pixels: Float[Tensor, "height width 3"]) -> Float[Tensor, "1 3 size size"]:
        normalised = ((pixels - self.mean) / self.std).permute(2, 0, 1)[None]
        height, width = normalised.shape[-2:]
        return F.pad(normalised, (0, self.size - width, 0, self.size - height))


def interm_layers(model: SegmentAnything) -> list[torch.nn.Module]:
    """The layers whose outputs the official HQ-SAM interface passes as `interm_embeddings`: a ViT's
    global-attention blocks (the first is HQ-SAM's early embedding), else the early-embedding layer alone
    (TinyViT's stage 1, as the official Light HQ-SAM returns it)."""
    encoder = model.image_encoder
    if isinstance(encoder, ImageEncoder):
        blocks = [block for block, _ in encoder.walk(TransformerBlock)]
        return [blocks[i] for i in sorted(encoder.config.global_attention_blocks)]
    return [encoder.early_embedding_layer]


class EncoderGraph(torch.nn.Module):
    """Model input (1, 3, S, S) -> image embedding; with HQ-SAM the fused HQ features (in the decoder stage at
    inference they are computed once per image anyway, so the export computes them here); then the features
    the encoder itself writes for the decoder (`SegmentAnything.decoder_image_features`: SAM 2's
    high-resolution features), in the model's order.

    With `pixels_input` the graph takes the resized pixels instead (`PixelsInput`); with `official_hq` HQ-SAM's
    output is the official interface's `interm_embeddings` (K, 1, E, E, C), not the fused features."""

    def __init__(self, model: SegmentAnything, pixels_input: bool = False, official_hq: bool = False) -> None:
        super().__init__()
        self.model = model
        self.fusion = model.find(HQFeatureFusion)
        self.features = tuple(model.decoder_image_features())
        self.pixels = PixelsInput(model.encoder_input_size) if pixels_input else None
        self.interm = interm_layers(model) if official_hq and self.fusion is not None else None

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, ...]:
        pixels = image if self.pixels is None else self.pixels(image)
        captured: list[Tensor] = []
        hooks = [
            layer.register_forward_hook(lambda _module, _inputs, output: captured.append(output))  # type: ignore[arg-type]
            for layer in self.interm or []
        ]
        try:
            embedding = self.model.encode(pixels)
        finally:
            for hook in hooks:
                hook.remove()
        outputs = [embedding]
        if self.interm is not None:
            outputs.append(torch.stack(captured))  # (K, 1, E, E, C): channels last, as the official encoder's
        elif self.fusion is not None:
            outputs.append(self.fusion(embedding))
        context = self.model.use_context("image")
        outputs += [context[key] for key in self.features]
        return embedding if len(outputs) == 1 else tuple(outputs)


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


def masks_resized(
    low_res: Float[Tensor, "1 masks low low"], model_size: int, orig_im_size: Float[Tensor, "2"]
) -> Float[Tensor, "1 masks height width"]:
    """SAM 2's postprocessing (`finesam.model.sam2.processing.upscale_masks`) with the original (height, width)
    as a tensor: one bilinear resize of the low-resolution logits."""
    del model_size  # the whole model input is the image
    size = orig_im_size.to(torch.int64)
    return F.interpolate(low_res, size=(size[0], size[1]), mode="bilinear", align_corners=False)  # type: ignore[arg-type]


def masks_bicubic(
    low_res: Float[Tensor, "1 masks low low"], model_size: int, orig_im_size: Float[Tensor, "2"]
) -> Float[Tensor, "1 masks height width"]:
    """EfficientSAM's postprocessing (`finesam.model.efficient_sam.efficient_sam.bicubic_masks`) with the original
    (height, width) as a tensor: one bicubic resize of the low-resolution logits."""
    del model_size  # the whole model input is the image
    size = orig_im_size.to(torch.int64)
    return F.interpolate(low_res, size=(size[0], size[1]), mode="bicubic", align_corners=False)  # type: ignore[arg-type]


# the traced postprocessing of each `processing_names["postprocessing"]`
POSTPROCESSING = {CROP_THEN_RESIZE: masks_at_original_size, RESIZE: masks_resized, BICUBIC_RESIZE: masks_bicubic}


class DecoderGraph(torch.nn.Module):
    """The prompt encoder and mask decoder (with whatever adapts them) behind the official ONNX interface.

    Inputs: the embedding, the encoder's extra features (SAM 2), the official prompt inputs, HQ-SAM's
    features. Point labels are -1 padding, 0 background, 1 foreground, 2 / 3 box corners (the model's own
    labels, as floats); the caller orders the points and adds the padding point as the model's `sparse_points`
    does (declared in model.json). The mask input enters as `has_mask_input * MaskEncoder(mask_input) +
    (1 - has_mask_input) * no-mask embedding`; a model without mask input (`takes_mask_input`: EfficientSAM)
    has neither input. Outputs: masks at the original size (the model's
    postprocessing), IoUs, the low-resolution logits as `predict` returns them, and the decoder's extra
    outputs (SAM 2's object-score logits).
    """

    def __init__(self, model: SegmentAnything, multimask_output: bool, official_hq: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multimask_output = multimask_output
        self.hq_features = model.find(CachedHQFeatures)
        # the official HQ-SAM interface: `interm_embeddings` after the embedding, the fusion computed here
        self.fusion = model.find(HQFeatureFusion) if official_hq else None
        self.features = tuple(model.decoder_image_features())
        self.postprocess = POSTPROCESSING[model.processing_names["postprocessing"]]

    def forward(self, image_embeddings: Float[Tensor, "1 dim grid grid"], *inputs: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        interm = None
        if self.fusion is not None:
            interm, inputs = inputs[0], inputs[1:]
        features, inputs = inputs[: len(self.features)], inputs[len(self.features) :]
        if model.takes_mask_input:
            point_coords, point_labels, mask_input, has_mask_input, orig_im_size, *rest = inputs
        else:
            (point_coords, point_labels, orig_im_size, *rest), mask_input, has_mask_input = inputs, None, None
        prompt = {"point_coords": point_coords, "point_labels": point_labels.long(), "mask_prompt": None}
        model.set_context("sam", {**prompt, "multimask_output": self.multimask_output})
        model.use_context("image").update(zip(self.features, features, strict=True))
        if self.fusion is not None and self.hq_features is not None and interm is not None:
            model.use_context("image")[EARLY_EMBEDDING] = interm[0]  # the first global block's output
            self.hq_features.keep(self.fusion(image_embeddings))
        elif self.hq_features is not None:
            self.hq_features.keep(rest[0])
        prompt_encoder, mask_decoder = list(model)[1:]
        prompt_encoder(image_embeddings)  # the dense embedding it writes is the no-mask one: blended below
        if mask_input is not None and has_mask_input is not None:
            context = model.use_context("mask_decoder")
            with_mask = model.prompt_encoder.ensure_find(MaskEncoder)(mask_input)
            context["dense_prompt_embedding"] = (
                has_mask_input * with_mask + (1 - has_mask_input) * context["dense_prompt_embedding"]
            )
        low_res, iou, *extra = mask_decoder(image_embeddings)
        model._reset_context()
        masks = self.postprocess(low_res, model.config.image_size, orig_im_size)
        return masks, iou, model.returned_low_res(low_res), *extra


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
