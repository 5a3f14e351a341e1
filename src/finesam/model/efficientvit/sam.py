"""`EfficientViTSAM`: EfficientViT-SAM as `SegmentAnything` with its own input: the encoder reads the image at
its `input_size` (512 for L0-L2), normalised on [0, 1] pixels as its predictor does, while prompts, the prompt
encoder and the masks stay in SAM's 1024 frame."""

from typing import ClassVar

import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.inputs import CROP_THEN_RESIZE, LONGEST_SIDE_PADDED_UNIT, POINTS_FIRST, unit_model_input
from finesam.model.config import SAMConfig
from finesam.model.efficientvit.config import EFFICIENTVIT_SAM_L0, EfficientViTConfig
from finesam.model.sam import SegmentAnything


class EfficientViTSAM(SegmentAnything):
    """EfficientViT-SAM (L0-L2, XL0-XL1): SAM's API, prompt encoder and decoder on the EfficientViT encoder, with
    the official `EfficientViTSamPredictor`'s preprocessing (`finesam.inputs.unit_model_input`). Prompts are
    scaled into the 1024 frame and masks cropped there, exactly as SAM's."""

    processing_names: ClassVar[dict[str, str]] = {
        "preprocessing": LONGEST_SIDE_PADDED_UNIT,
        "prompt_order": POINTS_FIRST,
        "postprocessing": CROP_THEN_RESIZE,
    }

    def __init__(
        self, config: SAMConfig = EFFICIENTVIT_SAM_L0, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(config, device=device, dtype=dtype)

    @property
    def encoder_input_size(self) -> int:
        encoder = self.config.encoder
        assert isinstance(encoder, EfficientViTConfig)
        return encoder.input_size

    def preprocess(self, image: Image.Image) -> tuple[Float[Tensor, "1 3 size size"], tuple[int, int]]:
        """The encoder's input (`encoder_input_size` wide) and the image's (height, width) in the prompt frame."""
        pixels, input_size = unit_model_input(image, self.config.image_size, self.encoder_input_size)
        return torch.from_numpy(pixels).to(device=self.device, dtype=self.dtype or torch.float32), input_size

    def encoder_input_from_frame(self, pixels: Float[Tensor, "batch 3 size size"]) -> Float[Tensor, "batch 3 s s"]:
        """Training samples drawn in the prompt frame, resized to the encoder's input size where it is smaller
        (L0-L2: 1024 -> 512; bilinear, antialiased): the image the encoder sees at inference, up to the
        resampling (PIL's 8-bit resize there)."""
        size = self.encoder_input_size
        if pixels.shape[-1] == size and pixels.shape[-2] == size:
            return pixels
        return F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
