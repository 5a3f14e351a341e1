"""The torch side of the transforms around the model, identical to the official `SamPredictor`.

Images: longest side resized to the model size (PIL bilinear on uint8), normalised, padded bottom/right (the
rules live in `finesam.inputs`, shared with the ONNX runtime). Masks: low-resolution logits upsampled to the
model size, cropped to the resized image, resized to the original.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image
from torch import Tensor

# MASK_THRESHOLD, ImageLike and as_rgb are read by model/sam.py through here; every other part imports image
# I/O from finesam.inputs
from finesam.inputs import MASK_THRESHOLD, ImageLike, as_rgb, model_input, normalised  # noqa: F401


def resized_and_normalised(
    image: Image.Image, shape: tuple[int, int], device: torch.device | str | None = None
) -> Float[Tensor, "3 height width"]:
    """An RGB image resized to (height, width) as the official predictor does (PIL bilinear on uint8), then
    normalised with SAM's pixel mean and std."""
    return torch.from_numpy(normalised(image, shape)).to(device=device)


def preprocess_image(
    image: Image.Image, size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Float[Tensor, "1 3 size size"], tuple[int, int]]:
    """The model input for an RGB image (see `as_rgb`), and the (height, width) the image occupies inside it."""
    pixels, input_size = model_input(image, size)
    return torch.from_numpy(pixels).to(device=device, dtype=dtype), input_size


def postprocess_masks(
    low_res_logits: Float[Tensor, "batch masks low low"],
    model_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> Float[Tensor, "batch masks height width"]:
    """Mask logits at the original image size."""
    logits = F.interpolate(low_res_logits, (model_size, model_size), mode="bilinear", align_corners=False)
    logits = logits[..., : input_size[0], : input_size[1]]
    return F.interpolate(logits, original_size, mode="bilinear", align_corners=False)
