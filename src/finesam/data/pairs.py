"""Image / mask pairs on disk, in the layout of DIS5K, ThinObject-5K and HQSeg-44K: `im/` and `gt/` folders whose
files share their stems (`im/0001.jpg` goes with `gt/0001.png`)."""

from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from finesam.model.processing import as_rgb
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


def load_pair(image_path: Path, mask_path: Path) -> tuple[Image.Image, Float[Tensor, "height width"]]:
    image = as_rgb(Image.open(image_path))
    mask = Image.open(mask_path)
    mask = mask.convert("L") if mask.mode not in ("L", "1") else mask
    target = torch.from_numpy(np.asarray(mask, dtype=np.float32) > 127.5).float()
    if target.shape != (image.height, image.width):
        raise ValueError(
            f"{mask_path}: mask is {target.shape[1]}x{target.shape[0]}, image {image.width}x{image.height}"
        )
    return image, target
