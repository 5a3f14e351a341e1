"""The transforms around SAM 2, as the official `SAM2ImagePredictor` does them.

Images: squashed to a square of the model size (no padding: the aspect ratio is not kept), bilinear with
antialiasing on [0, 1] floats (torchvision's tensor path), normalised with ImageNet's mean and std. Masks: the
low-resolution logits resized straight to the original size; optionally, small holes filled and small
sprinkles removed first, at the low resolution.
"""

from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image
from scipy import ndimage
from torch import Tensor

from finesam.inputs import IMAGENET_MEAN, IMAGENET_STD, MASK_THRESHOLD

# the logit offsets the official predictor gives filled holes and removed sprinkles
HOLE_LOGIT, SPRINKLE_LOGIT = MASK_THRESHOLD + 10.0, MASK_THRESHOLD - 10.0


def square_input(
    image: Image.Image, size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Float[Tensor, "1 3 size size"]:
    """An RGB image as SAM 2's model input: resized to size x size (bilinear, antialiased), normalised."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255
    resized = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((resized - mean) / std).to(device=device, dtype=dtype)


def video_frame_input(image: Image.Image, size: int) -> Float[Tensor, "1 3 size size"]:
    """A video frame as the official video loader gives it to SAM 2: stretched to size x size by PIL's default
    resize (bicubic, on uint8), divided by 255 in float64, then normalised with ImageNet's mean and std in
    float32 (`sam2.utils.misc.load_video_frames`; not the image predictor's `square_input`)."""
    resized = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.uint8)
    pixels = torch.from_numpy(resized / 255.0).permute(2, 0, 1)[None].float()
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean) / std


def component_areas(mask: np.ndarray) -> np.ndarray:
    """For a boolean (H, W) mask, the area of the 8-connected component of every true pixel (0 elsewhere)."""
    labelled = cast(tuple[np.ndarray, int], ndimage.label(mask, structure=np.ones((3, 3), dtype=bool)))
    labels = labelled[0].astype(np.int64)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    return areas[labels]


def fill_holes_and_sprinkles(
    logits: Float[Tensor, "batch masks h w"],
    max_hole_area: float,
    max_sprinkle_area: float,
    hole_logit: float = HOLE_LOGIT,
) -> Float[Tensor, "batch masks h w"]:
    """Background regions of at most `max_hole_area` pixels become foreground, then foreground regions of at
    most `max_sprinkle_area` pixels become background (8-connected regions of each mask; 0 turns a step off).
    The official image predictor's rule: the changed pixels take logit +10 / -10 (the video predictor fills
    holes only, with `hole_logit` 0.1)."""
    if max_hole_area <= 0 and max_sprinkle_area <= 0:
        return logits
    flat = logits.detach().float().cpu().reshape(-1, *logits.shape[-2:]).numpy()
    holes = np.zeros(flat.shape, dtype=bool)
    sprinkles = np.zeros(flat.shape, dtype=bool)
    for i, mask in enumerate(flat):
        if max_hole_area > 0:  # both steps read the logits as they came (as the official code does)
            areas = component_areas(mask <= MASK_THRESHOLD)
            holes[i] = (areas > 0) & (areas <= max_hole_area)
        if max_sprinkle_area > 0:
            areas = component_areas(mask > MASK_THRESHOLD)
            sprinkles[i] = (areas > 0) & (areas <= max_sprinkle_area)
    out = torch.where(torch.from_numpy(holes).reshape(logits.shape).to(logits.device), hole_logit, logits)
    return torch.where(torch.from_numpy(sprinkles).reshape(logits.shape).to(logits.device), SPRINKLE_LOGIT, out)


def upscale_masks(
    low_res: Float[Tensor, "batch masks low low"], original_size: tuple[int, int]
) -> Float[Tensor, "batch masks height width"]:
    """Low-resolution logits resized to the original (height, width), bilinear."""
    return F.interpolate(low_res.float(), original_size, mode="bilinear", align_corners=False)
