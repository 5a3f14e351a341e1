"""Removing small islands and filling small holes of a mask (8-connected regions, via `scipy.ndimage.label`)."""

from typing import Any, Literal

import numpy as np

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def remove_small_regions(
    mask: np.ndarray, min_area: float, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """Fills the holes (`mode="holes"`) or removes the islands (`"islands"`) of a (H, W) boolean mask smaller
    than `min_area` pixels, as the official generator does with OpenCV; returns the mask and whether any region
    was that small. If every island is small, the largest one stays."""
    if mode not in ("holes", "islands"):
        raise ValueError(f'mode must be "holes" or "islands", got {mode!r}')
    from scipy import ndimage  # here: scipy takes a tenth of the `finesam` command's start-up to import

    holes = mode == "holes"
    regions = np.zeros(mask.shape, dtype=np.int32)
    label: Any = ndimage.label  # its stubs do not know that it returns the count when given `output`
    count = int(label(~mask if holes else mask, structure=EIGHT_CONNECTED, output=regions))
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
    small = sizes < min_area
    if not small.any():
        return mask, False
    if holes:
        filled = np.concatenate(([True], small))  # the mask itself (label 0) and its small holes
    else:
        big = ~small
        if not big.any():
            big[_first_largest(regions, sizes) - 1] = True
        filled = np.concatenate(([False], big))
    return filled[regions], True


def _first_largest(regions: np.ndarray, sizes: np.ndarray) -> int:
    """The label of the largest region; among equals, the first in OpenCV's numbering, which scans the image by
    2x2 blocks (rows of blocks, top to bottom): the official generator keeps that one."""
    largest = np.flatnonzero(sizes == sizes.max()) + 1
    if len(largest) == 1:
        return int(largest[0])
    from scipy import ndimage

    rows, columns = np.indices(regions.shape)
    block = (rows // 2) * ((regions.shape[1] + 1) // 2) + columns // 2
    first_block = np.asarray(ndimage.minimum(block, regions, largest))
    return int(largest[np.argmin(first_block)])  # two regions never start in one block: 8-connected
