"""Run-length encoding of masks that are torch tensors, batched on their device; the numpy RLE functions and the
formats are `finesam.rle`'s (torch-free), re-exported here."""

import numpy as np
import torch
from jaxtyping import Bool
from torch import Tensor

from finesam.rle import (
    RLE,
    decode_counts,
    encode_counts,
    from_coco,
    rle_area,
    rle_from_changes,
    rle_to_mask,
    to_coco,
)
from finesam.rle import mask_to_rle as array_to_rle

__all__ = [
    "RLE",
    "decode_counts",
    "encode_counts",
    "from_coco",
    "mask_to_rle",
    "masks_to_rle",
    "rle_area",
    "rle_to_mask",
    "to_coco",
]


def masks_to_rle(masks: Bool[Tensor, "batch height width"]) -> list[RLE]:
    """Uncompressed RLE of each mask of a batch (on any device: only where the values change leaves it)."""
    batch, height, width = masks.shape
    if batch == 0:
        return []
    columns = masks.transpose(1, 2).reshape(batch, height * width)
    # index (in column-major order) of every pixel that differs from the one before it
    mask_index, position = (columns[:, 1:] != columns[:, :-1]).nonzero(as_tuple=True)
    per_mask = torch.bincount(mask_index, minlength=batch).tolist()
    changes = np.split((position + 1).cpu().numpy(), np.cumsum(per_mask)[:-1])
    first = columns[:, 0].cpu().tolist()
    return [rle_from_changes(height, width, is_set, starts) for starts, is_set in zip(changes, first, strict=True)]


def mask_to_rle(mask: Bool[Tensor, "height width"] | np.ndarray) -> RLE:
    """Uncompressed RLE of one (H, W) mask, a tensor or an array (`finesam.rle.mask_to_rle`)."""
    if isinstance(mask, np.ndarray):
        return array_to_rle(mask)
    return masks_to_rle(mask.bool()[None])[0]
