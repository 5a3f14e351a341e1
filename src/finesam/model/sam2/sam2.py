"""`SegmentAnything2`: SAM 2 / SAM 2.1 on images, as one fluxion chain with `SegmentAnything`'s interface.

The chain is the Hiera encoder (which also leaves the high-resolution features in the `image` context), SAM's
prompt encoder and the SAM 2 mask decoder. What differs for a user is here: the square input, the prompt
order (box corners first, a padding point always), the object score, the single upscaling of the masks, the
clamped low-resolution logits and the optional hole / sprinkle filling.
"""

from typing import ClassVar

import torch
from jaxtyping import Float, Int
from PIL import Image
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.inputs import (
    BOX_BOTTOM_RIGHT_LABEL,
    BOX_TOP_LEFT_LABEL,
    BOXES_FIRST_PADDED,
    PADDING_LABEL,
    PADDING_POINT,
    RESIZE,
    SQUARE,
)
from finesam.model.config import SAMConfig
from finesam.model.prompts import Prompts
from finesam.model.sam import SegmentAnything
from finesam.model.sam2.config import SAM2_1_HIERA_TINY
from finesam.model.sam2.mask_decoder import HIGH_RES_S0, HIGH_RES_S1, SAM2MaskDecoder
from finesam.model.sam2.processing import fill_holes_and_sprinkles, square_input, upscale_masks

# the official predictor returns its low-resolution logits clamped to this range (to feed back as a mask input)
LOW_RES_LIMIT = 32.0


def sam2_labelled_points(prompts: Prompts) -> tuple[Float[Tensor, "batch n 2"], Int[Tensor, "batch n"]]:
    """SAM 2's sparse sequence: the box corners, then the points, then one padding point whenever there is
    anything (the official predictor passes boxes as points, so its encoder always pads); empty for mask-only
    prompts."""
    points, labels, boxes = prompts.points, prompts.labels, prompts.boxes
    coords: list[Tensor] = []
    kinds: list[Tensor] = []
    if boxes is not None:
        coords.append(boxes.reshape(-1, 2, 2))
        corners = torch.tensor([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], device=boxes.device)
        kinds.append(corners.expand(boxes.shape[0], 2))
    if points is not None and labels is not None:
        coords.append(points)
        kinds.append(labels.long())
    if not coords:
        return torch.zeros(prompts.batch_size, 0, 2), torch.zeros(prompts.batch_size, 0, dtype=torch.long)
    batch = max(len(c) for c in coords)
    coords = [c.expand(batch, *c.shape[1:]) for c in coords]
    kinds = [k.expand(batch, *k.shape[1:]) for k in kinds]
    coords.append(coords[0].new_tensor(PADDING_POINT).expand(batch, 1, 2))
    kinds.append(torch.full((batch, 1), PADDING_LABEL, dtype=torch.long, device=kinds[0].device))
    return torch.cat(coords, dim=1), torch.cat(kinds, dim=1)


class SegmentAnything2(SegmentAnything):
    """SAM 2 / SAM 2.1 for images: `SegmentAnything`'s API (`encode_image`, `decode`, `predict`, ...) on the
    Hiera encoder and the SAM 2 decoder, with the official image predictor's pre- and postprocessing.

    `predict` also returns the object-score logits (`Prediction.object_score_logits`). Single-mask output
    falls back to the best multimask output where the single mask is unstable (`SAM2DecoderConfig`).

    Attributes:
        max_hole_area: background regions of the low-resolution mask up to this many pixels are filled before
            upscaling (the official predictor's `max_hole_area`; 0: off).
        max_sprinkle_area: foreground regions up to this many pixels are removed (`max_sprinkle_area`; 0: off).
    """

    decoder_class: ClassVar[type[fl.Chain]] = SAM2MaskDecoder
    processing_names: ClassVar[dict[str, str]] = {
        "preprocessing": SQUARE,
        "prompt_order": BOXES_FIRST_PADDED,
        "postprocessing": RESIZE,
    }
    extra_decoder_outputs: ClassVar[tuple[str, ...]] = ("object_score_logits",)
    generator_preset: ClassVar[str] = "sam2"  # SAM2AutomaticMaskGenerator's defaults

    def __init__(
        self, config: SAMConfig = SAM2_1_HIERA_TINY, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(config, device=device, dtype=dtype)
        self.max_hole_area = 0.0
        self.max_sprinkle_area = 0.0

    def decoder_image_features(self) -> dict[str, tuple[int, ...]]:
        """The high-resolution features of the decoder's upscaling skips (strides 4 and 8)."""
        dim, low = self.config.decoder.prompt_dim, self.config.mask_input_size
        return {HIGH_RES_S0: (1, dim // 8, low, low), HIGH_RES_S1: (1, dim // 4, low // 2, low // 2)}

    @staticmethod
    def input_frame(image: Image.Image, side: int) -> Float[Tensor, "3 side side"]:
        """The square, antialiased input at `side` (see `SegmentAnything.input_frame`)."""
        return square_input(image, side)[0]

    def preprocess(self, image: Image.Image) -> tuple[Float[Tensor, "1 3 size size"], tuple[int, int]]:
        """The square, antialiased input; the whole model input is the image."""
        return self.square_frame_input(image)

    def sparse_points(self, prompts: Prompts) -> tuple[Float[Tensor, "batch n 2"], Int[Tensor, "batch n"]]:
        return sam2_labelled_points(prompts)

    def postprocess(
        self,
        low_res: Float[Tensor, "batch masks low low"],
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> Float[Tensor, "batch masks height width"]:
        """Hole and sprinkle filling (when set), then one bilinear resize to the original size."""
        del input_size  # the whole input is the image
        filled = fill_holes_and_sprinkles(low_res, self.max_hole_area, self.max_sprinkle_area)
        return upscale_masks(filled, original_size)

    def returned_low_res(self, low_res: Float[Tensor, "batch masks low low"]) -> Float[Tensor, "batch masks low low"]:
        return low_res.clamp(-LOW_RES_LIMIT, LOW_RES_LIMIT)
