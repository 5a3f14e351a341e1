"""Images and prompts as users give them, checked and brought to SAM's input frame: numpy and PIL only.

Shared by the torch model (`finesam.model`) and the torch-free ONNX runtime (`finesam.onnx`), so both read
images, resize them and check prompts by the same rules.

Images: longest side resized to the model size (PIL bilinear on uint8, as the official `SamPredictor`),
normalised with SAM's pixel mean and std, padded bottom/right with zeros.
"""

import math
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# the label of every sparse prompt point, as the official encoder (and its ONNX interface) numbers them
PADDING_LABEL, BACKGROUND_LABEL, FOREGROUND_LABEL, BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL = -1, 0, 1, 2, 3
# where the official encoder puts the point that stands for a missing box (see `needs_padding_point`)
PADDING_POINT = (0.0, 0.0)

ImageLike: TypeAlias = Image.Image | np.ndarray

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0
# prompts (boxes, objects) decoded in one call by the batch jobs: datasets, text prompts (MobileSAMv2's batch)
DECODER_BATCH = 64
# SAM 2's input normalisation (of [0, 1] pixels)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# the names of the processing rules around a model (`SegmentAnything.processing_names`), which an ONNX export
# writes to its model.json for the torch-free predictor: SAM's, then SAM 2's
LONGEST_SIDE_PADDED, POINTS_FIRST, CROP_THEN_RESIZE = "longest_side_padded", "points_first", "crop_then_resize"
SQUARE, BOXES_FIRST_PADDED, RESIZE = "square", "boxes_first_padded", "resize"
# EfficientSAM's: stretched to a square without antialiasing, a fixed number of points, one bicubic resize
STRETCH, BOXES_FIRST_FIXED_COUNT, BICUBIC_RESIZE = "stretch", "boxes_first_fixed_count", "bicubic_resize"
# where EfficientSAM puts its padding points (model-input pixels)
FIXED_COUNT_PADDING_POINT = (-1.0, -1.0)
# EfficientViT-SAM's: the longest side resized to the encoder's own input size, [0, 1] pixels normalised
LONGEST_SIDE_PADDED_UNIT = "longest_side_padded_unit"


def resized_shape(height: int, width: int, longest_side: int) -> tuple[int, int]:
    """(height, width) after scaling the longest side to `longest_side`, rounded half up.

    As the official transform, except that a side never rounds down to 0 (very elongated images).
    """
    scale = longest_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """16-bit (or wider integer) samples scaled to 0..255, rounded."""
    return ((values.astype(np.float64) * 255.0 / 65535.0).round().clip(0, 255)).astype(np.uint8)


def special_file(path: str | Path) -> str | None:
    """What `path` is when it exists and is not a regular file ("a FIFO", "a device", "a folder", ...); None for
    a regular file (through links) or a missing one. Opening a FIFO or a device can wait forever: every input
    is checked with this before it is opened (folders, lists, manifests, single images, text files).
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (a named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def check_regular_file(path: str | Path, what: str = "file") -> None:
    """Raises `ValueError` (one line) when `path` exists and is not a regular file (see `special_file`).

    Args:
        path: the input.
        what: what the input should be ("image", "list of images", ...), for the message.
    """
    if (kind := special_file(path)) is not None:
        raise ValueError(f"{path}: is {kind}, not a{'n' if what[0] in 'aeiou' else ''} {what}")


def read_text_input(path: str | Path, what: str) -> str:
    """The text of an input file a user wrote (a list of images, a manifest, a prompts file, a TOML config):
    the one rule for every text input.

    Args:
        path: the file.
        what: what it is ("the list of images", ...), for the message.

    Returns:
        Its text, decoded as UTF-8, without the byte-order mark it may start with.

    Raises:
        ValueError: it is not a regular file (a FIFO would block), cannot be read, or is not UTF-8; one line
            that names the file.
    """
    check_regular_file(path, "text file")
    try:
        # one rule for a byte-order mark (Windows editors write one): accepted and dropped, in every text input
        return Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"{path}: cannot read {what}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: cannot read {what}: not UTF-8 text ({e})") from None


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """An image file opened and fully decoded (nothing is left to fail later), in its own mode.

    Images over PIL's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 million; the CLI's `--max-pixels`)
    are refused before they are decoded: a small file can declare a huge image (a decompression bomb).

    Raises:
        ValueError: the file is missing, not an image, truncated or corrupt, or over the pixel limit.
    """
    if isinstance(path, (str, Path)):
        check_regular_file(path, "image")  # before opening: a FIFO would block here
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
    except PermissionError:
        raise ValueError(f"{path}: permission denied (the file cannot be read by this user)") from None
    except UnidentifiedImageError:  # before OSError: not a damaged image, not an image PIL knows at all
        raise ValueError(f"{path}: not a readable image: {_unknown_format(path)}") from None
    except (OSError, SyntaxError, EOFError, struct.error, IndexError, TypeError) as e:
        # PIL's decoders raise all of these on corrupt files
        raise ValueError(f"{path}: not a readable image (truncated or corrupt?): {e}") from None
    return image


def _unknown_format(path: str | Path | BinaryIO) -> str:
    """Why PIL did not recognise a file, in words: empty, or in no format this PIL reads."""
    try:
        if isinstance(path, (str, Path)) and os.path.getsize(path) == 0:
            return "the file is empty"
    except OSError:
        pass
    formats = "PNG, JPEG, TIFF, BMP, WebP, GIF, ..."
    return f"its content is in no image format PIL reads ({formats}; video, PDF, RAW and HEIC are not)"


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


def scale_coordinates(coords: np.ndarray, original_size: tuple[int, int], input_size: tuple[int, int]) -> np.ndarray:
    """(..., 2) x/y pixel coordinates in the original image to coordinates in the resized image."""
    scaled = np.array(coords, dtype=np.float64)
    scaled[..., 0] *= input_size[1] / original_size[1]
    scaled[..., 1] *= input_size[0] / original_size[0]
    return scaled


def needs_padding_point(has_points: bool, has_box: bool) -> bool:
    """The padding-point rule of the official prompt encoder, stated once for the torch model
    (`finesam.model.prompt_encoder.labelled_points`) and the ONNX predictor (`labelled_points` here).

    The sparse sequence is the points, then the box's two corners; when there are points but no box, one
    padding point (`PADDING_POINT`, labelled `PADDING_LABEL`) is appended after the points. Box-only and
    mask-only prompts get none.

    Args:
        has_points: the prompt has clicked points.
        has_box: the prompt has a box.

    Returns:
        Whether a padding point is appended.
    """
    return has_points and not has_box


def labelled_points(
    points: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's points and box as the labelled point sequence the official encoder embeds (numpy; the
    torch model's batched twin is `finesam.model.prompt_encoder.labelled_points`).

    Args:
        points: (n, 2) x/y points, or None.
        labels: (n,) their labels (1 foreground, 0 background), or None.
        box: (4,) x1, y1, x2, y2, or None.

    Returns:
        (k, 2) float64 coordinates and (k,) float64 labels: points, the padding point if
        `needs_padding_point`, the box's corners labelled 2 and 3.
    """
    coords: list[Any] = [np.zeros((0, 2))]
    kinds: list[Any] = [np.zeros(0)]
    if points is not None and labels is not None:
        coords.append(points)
        kinds.append(labels)
    if needs_padding_point(points is not None, box is not None):
        coords.append([PADDING_POINT])
        kinds.append([PADDING_LABEL])
    if box is not None:
        coords.append(np.reshape(box, (2, 2)))
        kinds.append([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL])
    return np.concatenate(coords).astype(np.float64), np.concatenate(kinds).astype(np.float64)


def resized_pixels(image: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    """An RGB image resized to (height, width) as the official predictor does (PIL bilinear on uint8): float32
    (height, width, 3), 0-255 (what an export with `--encoder-input pixels` takes)."""
    height, width = shape
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def normalised(image: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    """An RGB image resized to (height, width) as the official predictor does (PIL bilinear on uint8), then
    normalised with SAM's pixel mean and std: float32 (3, height, width)."""
    resized = resized_pixels(image, shape)
    mean, std = np.array(PIXEL_MEAN, dtype=np.float32), np.array(PIXEL_STD, dtype=np.float32)
    return ((resized - mean) / std).transpose(2, 0, 1)


def model_input(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The model input for an RGB image (see `as_rgb`): float32 (1, 3, size, size), the resized image padded
    bottom/right with zeros; and the (height, width) the image occupies inside it."""
    height, width = resized_shape(image.height, image.width, size)
    padded = np.zeros((1, 3, size, size), dtype=np.float32)
    padded[0, :, :height, :width] = normalised(image, (height, width))
    return padded, (height, width)


def unit_model_input(image: Image.Image, image_size: int, input_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """EfficientViT-SAM's model input for an RGB image (its predictor's transforms): the longest side resized to
    the encoder's `input_size` (PIL bilinear on uint8), scaled to [0, 1], normalised with SAM's mean and std
    divided by 255, padded bottom/right with zeros to `input_size`; float32 (1, 3, input_size, input_size). And
    the (height, width) the image occupies in the prompt frame (`image_size`, where prompts and masks live),
    which differs from the encoder's input for the 512-pixel models."""
    height, width = resized_shape(image.height, image.width, input_size)
    resized = (
        image
        if (height, width) == (image.height, image.width)
        else image.resize((width, height), Image.Resampling.BILINEAR)
    )
    pixels = np.asarray(resized, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.array([m / 255 for m in PIXEL_MEAN], dtype=np.float32).reshape(3, 1, 1)
    std = np.array([s / 255 for s in PIXEL_STD], dtype=np.float32).reshape(3, 1, 1)
    padded = np.zeros((1, 3, input_size, input_size), dtype=np.float32)
    padded[0, :, :height, :width] = (pixels - mean) / std
    return padded, resized_shape(image.height, image.width, image_size)


def _boxes_first(
    points: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None
) -> tuple[list[Any], list[Any]]:
    """The box's corners labelled 2 and 3, then the points: the start of SAM 2's and EfficientSAM's sequences, as
    parts to concatenate (an empty first part, so that a mask-only prompt concatenates to empty arrays)."""
    coords: list[Any] = [np.zeros((0, 2))]
    kinds: list[Any] = [np.zeros(0)]
    if box is not None:
        coords.append(np.reshape(box, (2, 2)))
        kinds.append([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL])
    if points is not None and labels is not None:
        coords.append(points)
        kinds.append(labels)
    return coords, kinds


def boxes_first_labelled_points(
    points: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """SAM 2's order of one prompt's sparse sequence (numpy; the torch model's batched twin is
    `finesam.model.sam2.sam2.sam2_labelled_points`): the box's corners labelled 2 and 3, then the points,
    then one padding point whenever there is either (the official SAM 2 predictor always pads).

    Returns:
        (k, 2) float64 coordinates and (k,) float64 labels; empty for a mask-only prompt.
    """
    coords, kinds = _boxes_first(points, labels, box)
    if len(coords) > 1:
        coords.append([PADDING_POINT])
        kinds.append([PADDING_LABEL])
    return np.concatenate(coords).astype(np.float64), np.concatenate(kinds).astype(np.float64)


def check_point_count(given: int, count: int) -> None:
    """Raises `ValueError` when a prompt of a model that embeds exactly `count` points (EfficientSAM: 6) has more
    (box corners count as two); the official model would drop the last ones silently."""
    if given > count:
        raise ValueError(
            f"this model embeds at most {count} prompt points per prompt (a box counts as two), got {given}"
        )


def fixed_count_labelled_points(
    points: np.ndarray | None, labels: np.ndarray | None, box: np.ndarray | None, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """EfficientSAM's sparse sequence of one prompt (numpy; the torch model's batched twin is
    `finesam.model.efficient_sam.prompt_encoder.fixed_count_labelled_points`): the box's corners labelled 2 and 3,
    then the points, then padding points (`FIXED_COUNT_PADDING_POINT`, label -1) up to `count`.

    Raises:
        ValueError: more than `count` points (`check_point_count`).
    """
    coords, kinds = _boxes_first(points, labels, box)
    given = sum(len(c) for c in coords)
    check_point_count(given, count)
    coords.append(np.tile(FIXED_COUNT_PADDING_POINT, (count - given, 1)))
    kinds.append(np.full(count - given, PADDING_LABEL))
    return np.concatenate(coords).astype(np.float64), np.concatenate(kinds).astype(np.float64)


def bilinear_resize_weights(input_size: int, output_size: int) -> np.ndarray:
    """The (output_size, input_size) float32 matrix of torch's `F.interpolate(mode="bilinear",
    align_corners=False)` without antialiasing along one axis: two taps per output, at source position
    (i + 0.5) * scale - 0.5 clamped at 0 (float32, as torch computes it for float32 images)."""
    f32 = np.float32
    scale = f32(input_size) / f32(output_size)
    weights = np.zeros((output_size, input_size), dtype=f32)
    for i in range(output_size):
        source = max(scale * f32(i + 0.5) - f32(0.5), f32(0.0))
        first = min(int(source), input_size - 1)
        second = min(first + 1, input_size - 1)
        fraction = f32(source - f32(first))
        weights[i, first] += f32(1.0) - fraction
        weights[i, second] += fraction
    return weights


def stretched_model_input(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """EfficientSAM's model input for an RGB image (numpy twin of
    `finesam.model.efficient_sam.processing.stretched_input`): the [0, 1] pixels stretched to size x size
    (bilinear, no antialiasing), normalised with ImageNet's mean and std; float32 (1, 3, size, size), and the
    (height, width) the image occupies in it (all of it)."""
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255
    rows = bilinear_resize_weights(pixels.shape[-2], size)
    columns = bilinear_resize_weights(pixels.shape[-1], size)
    resized = rows @ (pixels @ columns.T)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    return ((resized - mean) / std)[None].astype(np.float32), (size, size)


def antialiased_resize_weights(input_size: int, output_size: int) -> np.ndarray:
    """The (output_size, input_size) float32 matrix of torch's `F.interpolate(mode="bilinear", antialias=True,
    align_corners=False)` along one axis: a triangle filter whose support grows with the downscale factor,
    each row normalised (PIL's resampling algorithm, in floats: PIL's 8-bit BILINEAR rounds differently).
    Computed in float32 as torch does for float32 images: its float32 scale moves the filter centres of a
    1000-pixel axis by about 1e-5 pixel, which float64 weights would not follow."""
    f32 = np.float32
    scale = f32(input_size) / f32(output_size)
    support = scale if scale >= 1.0 else f32(1.0)
    inverse = f32(1.0) / scale if scale >= 1.0 else f32(1.0)
    weights = np.zeros((output_size, input_size), dtype=f32)
    for i in range(output_size):
        center = scale * f32(i + 0.5)
        first = max(math.trunc(float(center - support + f32(0.5))), 0)  # C++ casts to int64 (towards zero)
        last = min(math.trunc(float(center + support + f32(0.5))), input_size)
        offsets = (np.arange(first, last, dtype=f32) - center + f32(0.5)) * inverse
        taps = np.maximum(f32(0.0), f32(1.0) - np.abs(offsets)).astype(f32)
        total = taps.sum(dtype=f32)
        weights[i, first:last] = taps / total if total != 0 else taps
    return weights


def antialiased_resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float (..., H, W) array resized to `shape` (height, width) as torch's bilinear `F.interpolate` with
    `antialias=True, align_corners=False` does (separable; float32 out)."""
    rows = antialiased_resize_weights(array.shape[-2], shape[0])
    columns = antialiased_resize_weights(array.shape[-1], shape[1])
    return (rows @ (array.astype(np.float32) @ columns.T)).astype(np.float32)


def square_model_input(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """SAM 2's model input for an RGB image (numpy twin of `finesam.model.sam2.processing.square_input`): the
    [0, 1] pixels squashed to size x size (antialiased bilinear), normalised with ImageNet's mean and std; float32
    (1, 3, size, size), and the (height, width) the image occupies in it (all of it)."""
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255
    resized = antialiased_resize(pixels, (size, size))
    mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    return ((resized - mean) / std)[None].astype(np.float32), (size, size)


def _array(value: Any, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (torch itself is not imported here)
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(value).__name__}: {e}") from None
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_inside(coords: np.ndarray, name: str, original_size: tuple[int, int]) -> None:
    height, width = original_size
    x, y = coords[..., 0], coords[..., 1]
    if (x < 0).any() or (y < 0).any() or (x > width).any() or (y > height).any():
        raise ValueError(f"{name} lie outside the {width}x{height} image: {coords.reshape(-1, 2).tolist()}")


def _batched(array: np.ndarray, ndim: int, name: str, shape_hint: str) -> np.ndarray:
    if array.ndim == ndim - 1:
        array = array[None]
    if array.ndim != ndim:
        raise ValueError(f"{name} must have shape {shape_hint}, got {tuple(array.shape)}")
    return array


@dataclass(frozen=True)
class CheckedPrompts:
    """User prompts that passed `check_prompts`, in pixels of the original image, each with a batch axis of
    1 or `batch` (a batch of one is meant for every prompt)."""

    batch: int
    points: np.ndarray | None = None  # (B or 1, N, 2) x, y
    labels: np.ndarray | None = None  # (B or 1, N): 1 foreground, 0 background
    boxes: np.ndarray | None = None  # (B or 1, 4) x1, y1, x2, y2
    mask_input: np.ndarray | None = None  # (B or 1, 1, M, M) logits


def check_prompts(
    *,
    points: Any = None,
    labels: Any = None,
    boxes: Any = None,
    mask_input: Any = None,
    original_size: tuple[int, int],
    mask_input_size: int,
) -> CheckedPrompts:
    """Checks prompts given in original-image pixels; every problem is a `ValueError` that says what is wrong.

    points: (N, 2) or (B, N, 2) x, y; labels: (N,) or (B, N), 1 foreground / 0 background (default: all 1);
    boxes: (4,) or (B, 4) x1, y1, x2, y2; mask_input: (M, M), (1, M, M) or (B, 1, M, M) logits.
    A batch of one (points, or mask) goes with a larger batch of another kind (usually boxes).
    """
    checked: dict[str, np.ndarray] = {}
    batch_sizes: dict[str, int] = {}
    if points is None and labels is not None:
        raise ValueError("labels were given without points")
    if points is not None:
        coords = _batched(_array(points, "points"), 3, "points", "(N, 2) or (B, N, 2)")
        if coords.shape[-1] != 2 or coords.shape[1] == 0:
            raise ValueError(f"points must have shape (N, 2) or (B, N, 2) with N >= 1, got {tuple(coords.shape)}")
        _check_inside(coords, "points", original_size)
        kinds = (
            np.ones(coords.shape[:2])
            if labels is None
            else _batched(_array(labels, "labels"), 2, "labels", "(N,) or (B, N)")
        )
        if kinds.shape != coords.shape[:2]:
            raise ValueError(f"labels must have shape {coords.shape[:2]} to match points, got {tuple(kinds.shape)}")
        if not np.isin(kinds, (0, 1)).all():
            raise ValueError(f"labels must be 1 (foreground) or 0 (background), got {np.unique(kinds).tolist()}")
        checked["points"], checked["labels"] = coords, kinds
        batch_sizes["points"] = coords.shape[0]
    if boxes is not None:
        box_array = _batched(_array(boxes, "boxes"), 2, "boxes", "(4,) or (B, 4)")
        if box_array.shape[-1] != 4 or box_array.shape[0] == 0:
            raise ValueError(f"boxes must have shape (4,) or (B, 4), got {tuple(box_array.shape)}")
        corners = box_array.reshape(-1, 2, 2)
        _check_inside(corners, "box corners", original_size)
        if (corners[:, 1] < corners[:, 0]).any():
            raise ValueError(f"boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1, got {box_array.tolist()}")
        checked["boxes"] = box_array
        batch_sizes["boxes"] = box_array.shape[0]
    if mask_input is not None:
        masks = _array(mask_input, "mask_input")
        masks = masks[None] if masks.ndim == 2 else masks
        masks = masks[None] if masks.ndim == 3 else masks
        if masks.ndim != 4 or masks.shape[1:] != (1, mask_input_size, mask_input_size):
            raise ValueError(
                f"mask_input must have shape ({mask_input_size}, {mask_input_size}), (1, {mask_input_size}, "
                f"{mask_input_size}) or (B, 1, {mask_input_size}, {mask_input_size}), got {tuple(np.shape(mask_input))}"
            )
        checked["mask_input"] = masks
        batch_sizes["mask_input"] = masks.shape[0]
    if not batch_sizes:
        raise ValueError("the prompt is empty: give points, boxes or a mask_input")
    batch = max(batch_sizes.values())
    if any(size not in (1, batch) for size in batch_sizes.values()):
        raise ValueError(f"prompt batch sizes do not match: {batch_sizes}")

    return CheckedPrompts(batch, **checked)


# The JSON prompt dialect (docs/prompting.md), read by one parser for `finesam segment --prompts`, the lines of a
# manifest and the HTTP API; each of them adds its own keys (multimask, image, category_ids, hq, ...).
JSON_PROMPT_KEYS = frozenset({"box", "boxes", "points", "labels"})
_BOX_FORM = "[x1, y1, x2, y2] or a list of them, one per object"
_POINTS_FORM = "a list of [x, y] pairs, or a list of such lists, one per object"


@dataclass(frozen=True)
class JsonPrompts:
    """The objects that one JSON prompt object describes, one mask each: K boxes and/or K point lists, in
    pixels of the original image (read by `parse_json_prompts`)."""

    boxes: list[list[float]] | None = None  # K x [x1, y1, x2, y2]
    points: list[list[list[float]]] | None = None  # K x [[x, y], ...]
    labels: list[list[int]] | None = None  # K x [1 | 0, ...], the shape of points (all 1 when not given)

    def __len__(self) -> int:
        return len(self.boxes if self.boxes is not None else self.points or [])

    def as_arrays(self) -> dict[str, np.ndarray | None]:
        """The objects as one batch: the `points`, `labels` and `boxes` keyword arguments of `check_prompts`
        (and of `SegmentAnything.predict`).

        Returns:
            points (K, N, 2), labels (K, N) and boxes (K, 4), each None when not given.

        Raises:
            ValueError: the point lists are not all equally long (one batch needs the same number per object).
        """
        if self.points is not None and len({len(p) for p in self.points}) > 1:
            raise ValueError("the point lists of one prompt must be equally long; give them as separate prompts")
        return {
            "points": None if self.points is None else np.array(self.points, dtype=np.float64),
            "labels": None if self.labels is None else np.array(self.labels, dtype=np.int64),
            "boxes": None if self.boxes is None else np.array(self.boxes, dtype=np.float64),
        }


def finite_number(value: Any) -> float | None:
    """A JSON number as a float: None for a non-number (bools included) and for a value no float holds finitely
    (NaN, infinity, an integer of hundreds of digits). The one number rule of the JSON inputs.

    Args:
        value: a decoded JSON value.

    Returns:
        The float, or None.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range
        return None
    return number if math.isfinite(number) else None


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters, for messages (a number of hundreds of digits, a long list)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints over Python's digit limit; deep nesting
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _json_number(value: Any, name: str) -> float:
    number = finite_number(value)
    if number is None:
        kind = "finite numbers" if isinstance(value, (int, float)) and not isinstance(value, bool) else "numbers"
        raise ValueError(f'"{name}" must hold {kind}, got {shown(value)}')
    return number


def _json_list(value: Any) -> list[Any] | None:
    """A JSON value that may be absent: None and [] both mean "none"."""
    return value if value else None


def _depth(value: Any) -> int:
    """How deep the first elements of nested lists go: 1 for [1, 2], 2 for [[1, 2]], 0 for a number."""
    depth = 0
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
    return depth


def parse_json_prompts(data: dict[str, Any]) -> JsonPrompts:
    """Reads the prompt keys of one JSON object; the caller checks its other keys.

    The dialect: `"box"` or `"boxes"` (the same key, spelled either way): `[x1, y1, x2, y2]` for one object or
    a list of them, one per object; `"points"`: `[[x, y], ...]` for one object or a list of such lists, one per
    object; `"labels"`: the shape of `"points"` without the pair, 1 foreground / 0 background (default: all 1).
    With boxes and points, each box goes with the point list at its position. `null` and `[]` mean "none".

    Args:
        data: a JSON object (a dict).

    Returns:
        The objects it describes (at least one).

    Raises:
        ValueError: one sentence naming the key and what is wrong.
    """
    if "box" in data and "boxes" in data:
        raise ValueError('give "box" or "boxes", not both (they are the same key)')
    key = "boxes" if "boxes" in data else "box"
    boxes = _json_boxes(_json_list(data.get(key)), key)
    points = _json_points(_json_list(data.get("points")))
    labels = _json_list(data.get("labels"))
    if labels is not None and points is None:
        raise ValueError('"labels" were given without "points"')
    if boxes is None and points is None:
        raise ValueError('give "box" (or "boxes") and/or "points"')
    if points is not None:
        labels = _json_labels(labels, points, single=_depth(data["points"]) == 2)
        if boxes is not None and len(points) != len(boxes):
            raise ValueError(f"{len(boxes)} boxes but {len(points)} point lists: give one point list per box")
    return JsonPrompts(boxes, points, labels)


def _json_boxes(value: list[Any] | None, key: str) -> list[list[float]] | None:
    if value is None:
        return None
    boxes = [value] if _depth(value) == 1 else value
    if not all(isinstance(b, list) and len(b) == 4 for b in boxes):
        raise ValueError(f'"{key}" must be {_BOX_FORM}, got {shown(value)}')
    numbers = [[_json_number(v, key) for v in box] for box in boxes]
    for box in numbers:
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f'"{key}" must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1, got {box}')
    return numbers


def _json_points(value: list[Any] | None) -> list[list[list[float]]] | None:
    if value is None:
        return None
    lists = [value] if _depth(value) == 2 else value
    if not all(isinstance(p, list) and p and all(isinstance(q, list) and len(q) == 2 for q in p) for p in lists):
        raise ValueError(f'"points" must be {_POINTS_FORM}, got {shown(value)}')
    return [[[_json_number(v, "points") for v in point] for point in points] for points in lists]


def _json_labels(value: list[Any] | None, points: list[list[list[float]]], single: bool) -> list[list[int]]:
    if value is None:
        return [[FOREGROUND_LABEL] * len(p) for p in points]
    lists = [value] if single else value
    shape = "one label per point" if single else "one list of labels per point list, one label per point"
    if not isinstance(lists, list) or [len(a) if isinstance(a, list) else -1 for a in lists] != [
        len(p) for p in points
    ]:
        raise ValueError(f'"labels" must have the shape of "points": {shape}, got {shown(value)}')
    if any(isinstance(v, bool) or v not in (BACKGROUND_LABEL, FOREGROUND_LABEL) for a in lists for v in a):
        raise ValueError(f'"labels" must be 1 (foreground) or 0 (background), got {shown(value)}')
    return [[int(v) for v in a] for a in lists]
