"""Image and prompt transforms around the model, identical to the official `SamPredictor`.

Images: longest side resized to the model size (PIL bilinear on uint8), normalised, padded bottom/right.
Masks: low-resolution logits upsampled to the model size, cropped to the resized image, resized to the original.
"""

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image
from torch import Tensor

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0


def resized_shape(height: int, width: int, longest_side: int) -> tuple[int, int]:
    """(height, width) after scaling the longest side to `longest_side`, rounded half up."""
    scale = longest_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_image(
    image: Image.Image, size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Float[Tensor, "1 3 size size"], tuple[int, int]]:
    """The model input for an RGB image, and the (height, width) the image occupies inside it."""
    height, width = resized_shape(image.height, image.width, size)
    resized = np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
    pixels = torch.from_numpy(resized.copy()).to(device=device).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(3, 1, 1)
    normalised = (pixels - mean) / std
    padded = F.pad(normalised, (0, size - width, 0, size - height))
    return padded.unsqueeze(0).to(dtype=dtype), (height, width)


def scale_coordinates(coords: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """(..., 2) x/y pixel coordinates in the original image to coordinates in the resized image."""
    scaled = np.array(coords, dtype=np.float64)
    scaled[..., 0] *= input_size[1] / original_size[1]
    scaled[..., 1] *= input_size[0] / original_size[0]
    return scaled


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
