"""Image and prompt transforms around the model, identical to the official `SamPredictor`.

Images: longest side resized to the model size (PIL bilinear on uint8), normalised, padded bottom/right.
Masks: low-resolution logits upsampled to the model size, cropped to the resized image, resized to the original.
"""

import struct
import warnings
from pathlib import Path
from typing import BinaryIO, TypeAlias

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import ExifTags, Image, ImageOps
from torch import Tensor

ImageLike: TypeAlias = Image.Image | np.ndarray

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0


def resized_shape(height: int, width: int, longest_side: int) -> tuple[int, int]:
    """(height, width) after scaling the longest side to `longest_side`, rounded half up.

    As the official transform, except that a side never rounds down to 0 (very elongated images).
    """
    scale = longest_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit (or wider integer) samples scaled to 0..255, rounded."""
    return ((values.astype(np.float64) * 255.0 / 65535.0).round().clip(0, 255)).astype(np.uint8)


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """An image file opened and fully decoded (nothing is left to fail later), in its own mode.

    Images over PIL's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 million; the CLI's `--max-pixels`)
    are refused before they are decoded: a small file can declare a huge image (a decompression bomb).

    Raises:
        ValueError: the file is missing, not an image, truncated or corrupt, or over the pixel limit.
    """
    limit = Image.MAX_IMAGE_PIXELS
    hint = "a decompression bomb? Raise the limit with --max-pixels or PIL.Image.MAX_IMAGE_PIXELS"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the exact limit
            image = Image.open(path)  # reads the header only; raises itself at twice PIL's limit
        if limit is not None and image.width * image.height > limit:
            pixels = image.width * image.height
            raise ValueError(
                f"{path}: {image.width} x {image.height} = {pixels} pixels, over the pixel limit of {limit} ({hint})"
            )
        image.load()
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: over the pixel limit of {limit}: {e} ({hint})") from None
    except ValueError as e:
        if "pixel limit" in str(e):
            raise
        raise ValueError(f"{path}: not a readable image (truncated or corrupt?): {e}") from None
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not an image") from None
    except (OSError, SyntaxError, EOFError, struct.error, IndexError, TypeError) as e:
        # PIL's decoders raise all of these on corrupt files
        raise ValueError(f"{path}: not a readable image (truncated or corrupt?): {e}") from None
    return image


def as_rgb(image: ImageLike) -> Image.Image:
    """An 8-bit RGB PIL image, oriented as a viewer shows it.

    Accepts PIL images of any mode (RGB, RGBA and LA lose their alpha, L, P, CMYK, 16-bit I;16 and I are
    scaled to 8 bits) with their EXIF orientation applied, and numpy arrays HxWx3 / HxWx4 / HxW of uint8
    (or uint16, scaled). Raises `ValueError` for anything else.
    """
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:
            image = _to_uint8(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"numpy images must be uint8 (or uint16) arrays of shape HxWx3, HxWx4 or HxW, "
                f"got {image.dtype} {image.shape}"
            )
        image = Image.fromarray(np.ascontiguousarray(image))
    elif not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    else:
        try:
            image.load()  # a lazily opened file fails here, not in the middle of the work
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as e:
            name = getattr(image, "filename", "") or "the image"
            raise ValueError(f"{name}: not a readable image (truncated or corrupt?): {e}") from None
    if image.width == 0 or image.height == 0:
        raise ValueError(f"the image is empty ({image.width}x{image.height})")
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # exif_transpose would copy the image anyway
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).round().astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def resized_and_normalised(
    image: Image.Image, shape: tuple[int, int], device: torch.device | str | None = None
) -> Float[Tensor, "3 height width"]:
    """An RGB image resized to (height, width) as the official predictor does (PIL bilinear on uint8), then
    normalised with SAM's pixel mean and std."""
    height, width = shape
    resized = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    pixels = torch.from_numpy(resized.copy()).to(device=device).permute(2, 0, 1).float()
    mean = torch.tensor(PIXEL_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(3, 1, 1)
    return (pixels - mean) / std


def preprocess_image(
    image: Image.Image, size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Float[Tensor, "1 3 size size"], tuple[int, int]]:
    """The model input for an RGB image (see `as_rgb`), and the (height, width) the image occupies inside it."""
    height, width = resized_shape(image.height, image.width, size)
    normalised = resized_and_normalised(image, (height, width), device)
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
