"""The masks of a video's frames as the files that video object segmentation benchmarks read: one palette PNG per
frame (mode "P"), each pixel the id of its object (0: background), coloured with the DAVIS palette; and object
masks read back from such files."""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

MAX_OBJECT_ID = 255  # a palette PNG holds 8-bit indices


def davis_palette() -> list[int]:
    """The 256 colours of DAVIS's (and PASCAL VOC's) annotation PNGs, flat [r, g, b, r, g, b, ...]: index i's
    bits 0, 1, 2 light up red, green and blue, the next three bits the same channels one step dimmer, and so on
    (1: dark red (128, 0, 0), 2: green, 3: olive, 4: navy, ...)."""
    colours = []
    for index in range(256):
        rgb, bits = [0, 0, 0], index
        for level in range(8):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << (7 - level)
            bits >>= 3
        colours += rgb
    return colours


DAVIS_PALETTE = davis_palette()


def object_index_map(object_ids: Sequence[int], masks: Tensor, threshold: float = 0.0) -> np.ndarray:
    """One frame's objects as an (H, W) uint8 map of object ids: each pixel goes to the object of the highest
    logit there when that logit is above `threshold` (the predictor's non-overlapping rule: where masks overlap,
    the most confident object keeps the pixel; the first in `object_ids` on a tie), else 0.

    Args:
        object_ids: the ids of the masks' objects, each 1 to 255.
        masks: (objects, 1, H, W) logits (what the video predictor returns).
        threshold: the logit above which a pixel is the object's.
    """
    if len(object_ids) != masks.shape[0]:
        raise ValueError(f"{len(object_ids)} object ids for {masks.shape[0]} masks")
    if any(not 1 <= i <= MAX_OBJECT_ID for i in object_ids):
        raise ValueError(f"object ids in a palette PNG are 1 to {MAX_OBJECT_ID}, got {list(object_ids)}")
    height, width = masks.shape[-2:]
    if not object_ids:
        return np.zeros((height, width), np.uint8)
    logits = masks[:, 0].float()
    best, which = logits.max(dim=0)
    ids = torch.tensor(list(object_ids), dtype=torch.uint8, device=masks.device)
    index = torch.where(best > threshold, ids[which], torch.zeros((), dtype=torch.uint8, device=masks.device))
    return index.cpu().numpy()


def palette_image(index: np.ndarray) -> Image.Image:
    """An (H, W) uint8 map of object ids as a palette image (mode "P", the DAVIS palette)."""
    image = Image.fromarray(np.ascontiguousarray(index, dtype=np.uint8), mode="P")
    image.putpalette(DAVIS_PALETTE)
    return image


def object_masks(image: Image.Image) -> dict[int, np.ndarray]:
    """The objects of an annotation image: a palette image's (mode "P") or a grey image's (mode "L") non-zero
    values, each its object's id; (H, W) boolean masks by id, in increasing order."""
    if image.mode not in ("P", "L"):
        raise ValueError(f"an annotation of several objects is a palette (P) or grey (L) image, not {image.mode}")
    values = np.asarray(image)
    return {int(v): values == v for v in np.unique(values) if v != 0}
