"""`EfficientSAM`: EfficientSAM's ViT, prompt encoder and decoder as one chain with `SegmentAnything`'s interface.

What differs for a user is here, as the official `EfficientSam` does it: the image stretched to the model size
(bilinear, no antialiasing, the aspect ratio not kept, no padding) and normalised with ImageNet's statistics;
every prompt a fixed number of points (box corners first, then the clicks, then padding); no mask input; the
low-resolution logits resized to the original size in one bicubic step.
"""

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from PIL import Image
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.inputs import BICUBIC_RESIZE, BOXES_FIRST_FIXED_COUNT, IMAGENET_MEAN, IMAGENET_STD, STRETCH
from finesam.model.config import SAMConfig
from finesam.model.efficient_sam.config import EFFICIENT_SAM_VITT, EfficientSAMDecoderConfig
from finesam.model.efficient_sam.mask_decoder import EfficientSAMMaskDecoder, EfficientSAMTransformer
from finesam.model.efficient_sam.prompt_encoder import EfficientSAMPromptEncoder, fixed_count_labelled_points
from finesam.model.prompts import Prompts
from finesam.model.sam import SegmentAnything


def stretched_input(
    image: Image.Image, size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "1 3 size size"]:
    """An RGB image as EfficientSAM's model input: [0, 1] pixels resized to size x size (bilinear, no
    antialiasing; an image of that size is kept as it is), normalised with ImageNet's mean and std."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((pixels - mean) / std).to(device=device, dtype=dtype)


def bicubic_masks(
    low_res: Float[Tensor, "batch masks low low"], original_size: tuple[int, int]
) -> Float[Tensor, "batch masks height width"]:
    """Low-resolution logits resized to the original (height, width), bicubic (align_corners=False)."""
    return F.interpolate(low_res.float(), original_size, mode="bicubic", align_corners=False)


class EfficientSAM(SegmentAnything):
    """EfficientSAM ViT-Ti / ViT-S: `SegmentAnything`'s API (`encode_image`, `decode`, `predict`, ...) on its
    ViT, its prompt encoder and its mask decoder, with the official model's processing.

    Prompts: points and boxes (at most `EfficientSAMDecoderConfig.max_points` points per prompt, a box counting as
    two); a mask input is refused (the model has none).
    """

    prompt_encoder_class: ClassVar[type[fl.Chain]] = EfficientSAMPromptEncoder
    decoder_class: ClassVar[type[fl.Chain]] = EfficientSAMMaskDecoder
    transformer_class: ClassVar[type[fl.Chain]] = EfficientSAMTransformer
    takes_mask_input: ClassVar[bool] = False
    processing_names: ClassVar[dict[str, str]] = {
        "preprocessing": STRETCH,
        "prompt_order": BOXES_FIRST_FIXED_COUNT,
        "postprocessing": BICUBIC_RESIZE,
    }

    def __init__(
        self, config: SAMConfig = EFFICIENT_SAM_VITT, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        if not isinstance(config.decoder, EfficientSAMDecoderConfig):
            raise ValueError(f"EfficientSAM's decoder needs an EfficientSAMDecoderConfig, got {config.decoder!r}")
        super().__init__(config, device=device, dtype=dtype)

    @property
    def point_count(self) -> int:
        """The number of points every prompt is padded to."""
        decoder = self.config.decoder
        assert isinstance(decoder, EfficientSAMDecoderConfig)
        return decoder.max_points

    def fixed_prompt_points(self) -> int | None:
        return self.point_count

    @staticmethod
    def input_frame(image: Image.Image, side: int) -> Float[Tensor, "3 side side"]:
        """The stretched input at `side` (see `SegmentAnything.input_frame`)."""
        return stretched_input(image, side)[0]

    def preprocess(self, image: Image.Image) -> tuple[Float[Tensor, "1 3 size size"], tuple[int, int]]:
        """The stretched input; the whole model input is the image."""
        return self.square_frame_input(image)

    def sparse_points(self, prompts: Prompts) -> tuple[Float[Tensor, "batch n 2"], Int[Tensor, "batch n"]]:
        return fixed_count_labelled_points(prompts, self.point_count)

    def postprocess(
        self,
        low_res: Float[Tensor, "batch masks low low"],
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> Float[Tensor, "batch masks height width"]:
        """One bicubic resize of the low-resolution logits to the original size."""
        del input_size  # the whole input is the image
        return bicubic_masks(low_res, original_size)
