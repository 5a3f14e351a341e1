"""Image / mask pairs on disk, in the layout of DIS5K, ThinObject-5K and HQSeg-44K: `im/` and `gt/` folders whose
files share their stems (`im/0001.jpg` goes with `gt/0001.png`)."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float
from PIL import Image
from torch import Tensor

from finesam.inputs import as_rgb, open_image
from finesam.text import listing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


def _by_stem(folder: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES:
            files.setdefault(path.stem, []).append(path)
    return files


def list_pairs(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths under `root/im` and `root/gt`, matched by stem and sorted by stem.

    Both folders hold images with any of `IMAGE_SUFFIXES` (any case); other files and hidden files are ignored.
    Raises `ValueError` when a folder is missing, there are no images, an image has no mask, a mask has no
    image, or a stem appears twice in one folder (`a.png` and `a.jpg`); the message counts and names them.
    """
    root = Path(root)
    folders = (root / "im", root / "gt")
    for folder in folders:
        if not folder.is_dir():
            raise ValueError(f"{root}: expected images in {folders[0]} and masks in {folders[1]}; {folder} is missing")
    images, masks = (_by_stem(folder) for folder in folders)
    if not images:
        raise ValueError(f"{folders[0]}: no images ({', '.join(IMAGE_SUFFIXES)})")
    problems = []
    for folder, files in zip(folders, (images, masks), strict=True):
        twice = sorted(p.name for stem in sorted(files) if len(files[stem]) > 1 for p in files[stem])
        if twice:
            problems.append(f"{len(twice)} files in {folder} share a stem: {listing(twice, 5)}")
    unmatched = sorted(images[stem][0].name for stem in set(images) - set(masks))
    if unmatched:
        problems.append(
            f"{len(unmatched)} of {len(images)} images have no mask in {folders[1]}: {listing(unmatched, 5)}"
        )
    stray = sorted(masks[stem][0].name for stem in set(masks) - set(images))
    if stray:
        problems.append(f"{len(stray)} masks in {folders[1]} have no image in {folders[0]}: {listing(stray, 5)}")
    if problems:
        raise ValueError(f"{root}: " + "; ".join(problems))
    return [(images[stem][0], masks[stem][0]) for stem in sorted(images)]


def read_mask(path: Path) -> Bool[np.ndarray, "height width"]:
    """A ground-truth mask file as booleans, by one rule: a file whose values are all 0 or 1 is a 0/1 mask
    (foreground = 1); any other file is read as grey levels, foreground = above 127 (0/255 masks, anti-aliased
    edges). Colour files are converted to grey first.

    Raises:
        ValueError: the file cannot be read as an image.
    """
    mask = open_image(path)
    values = np.asarray(mask if mask.mode in ("L", "1", "I;16", "I") else mask.convert("L"))
    if values.dtype == bool:
        return values
    if values.max(initial=0) <= 1:
        return values == 1
    threshold = 127 if values.dtype == np.uint8 else 32767  # 16-bit masks: half their range
    return values > threshold


def check_masks(pairs: Sequence[tuple[Path, Path]], count: int = 32) -> None:
    """Raises `ValueError` when the first `count` masks of a dataset are all empty under `read_mask`'s rule: a
    dataset whose masks mean something else (say, class indices above 1) would train on empty targets."""
    looked = pairs[:count]
    if looked and not any(read_mask(mask).any() for _, mask in looked):
        raise ValueError(
            f"the first {len(looked)} masks ({looked[0][1].name}, ...) are all empty: masks are read as 0/1 files "
            "or as grey levels with foreground above 127 (see docs/training.md)"
        )


def load_pair(image_path: Path, mask_path: Path) -> tuple[Image.Image, Float[Tensor, "height width"]]:
    """An image (see `as_rgb`) and its mask (see `read_mask`) as 0.0 / 1.0.

    Raises:
        ValueError: a file is unreadable, or the sizes differ.
    """
    image = as_rgb(open_image(image_path))
    target = torch.from_numpy(read_mask(mask_path)).float()
    if target.shape != (image.height, image.width):
        raise ValueError(
            f"{mask_path}: mask is {target.shape[1]}x{target.shape[0]}, image {image.width}x{image.height}"
        )
    return image, target
