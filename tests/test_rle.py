"""RLE of masks: round trips (property-based), the official encoding, pycocotools compatibility, and the small
region removal against OpenCV (what the official generator uses)."""

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as coco_mask

from finesam.amg import decode_counts, encode_counts, from_coco, masks_to_rle, rle_area, rle_to_mask, to_coco
from finesam.amg.regions import remove_small_regions
from finesam.rle import mask_to_rle

masks = st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(lambda size: arrays(bool, size))


@given(masks)
@settings(max_examples=200, deadline=None)
def test_rle_round_trip(mask):
    rle = masks_to_rle(torch.from_numpy(mask)[None])[0]
    assert rle["size"] == list(mask.shape)
    assert sum(rle["counts"]) == mask.size
    assert (rle["counts"][0] == 0) == bool(mask.T.flat[0])  # the first run is of zeros, empty if pixel 0 is set
    assert np.array_equal(rle_to_mask(rle), mask)
    assert rle_area(rle) == mask.sum()
    coco = to_coco(rle)
    assert isinstance(coco["counts"], str)
    assert from_coco(coco) == rle
    assert np.array_equal(rle_to_mask(coco), mask)
    assert rle_area(coco) == mask.sum()


@given(masks)
@settings(max_examples=200, deadline=None)
def test_coco_strings_are_pycocotools(mask):
    rle = masks_to_rle(torch.from_numpy(mask)[None])[0]
    theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert to_coco(rle)["counts"] == theirs["counts"].decode("ascii")
    assert coco_mask.frPyObjects(rle, *rle["size"])["counts"].decode("ascii") == to_coco(rle)["counts"]
    assert np.array_equal(coco_mask.decode(theirs).astype(bool), rle_to_mask(to_coco(rle)))


@given(masks)
@settings(max_examples=200, deadline=None)
def test_the_torch_free_encoding_is_the_batched_one(mask):
    """`finesam.rle.mask_to_rle` (numpy, for the torch-free dataset runs) writes what `masks_to_rle` writes."""
    assert mask_to_rle(mask) == masks_to_rle(torch.from_numpy(mask)[None])[0]
    assert mask_to_rle(mask.astype(np.uint8) * 255) == mask_to_rle(mask)


@given(st.lists(st.integers(0, 2**31 - 1), max_size=40))
def test_counts_round_trip(counts):
    assert decode_counts(encode_counts(counts)) == counts


@given(masks)
@settings(max_examples=50, deadline=None)
def test_batch_encoding_is_the_official_one(mask):
    from official import install_stand_ins

    install_stand_ins()
    from segment_anything.utils.amg import mask_to_rle_pytorch

    batch = torch.from_numpy(np.stack([mask, ~mask, np.zeros_like(mask)]))
    assert masks_to_rle(batch) == mask_to_rle_pytorch(batch)


def test_empty_batch_and_bad_rle():
    assert masks_to_rle(torch.zeros(0, 4, 5, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match="add up"):
        rle_to_mask({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError, match="invalid character"):
        decode_counts("0 1")
    with pytest.raises(ValueError, match="middle of a count"):
        decode_counts("1o")


def opencv_reference(mask: np.ndarray, min_area: float, mode: str) -> tuple[np.ndarray, bool]:
    """The official `remove_small_regions`, restated: OpenCV 8-connected components."""
    holes = mode == "holes"
    labels_count, regions, stats, _ = cv2.connectedComponentsWithStats((holes ^ mask).astype(np.uint8), 8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, size in enumerate(sizes) if size < min_area]
    if not small:
        return mask, False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(labels_count) if i not in fill] or [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


@given(arrays(bool, (20, 23)), st.integers(0, 40), st.sampled_from(["holes", "islands"]))
@settings(max_examples=150, deadline=None)
def test_small_regions_match_opencv(mask, min_area, mode):
    expected, expected_changed = opencv_reference(mask, min_area, mode)
    actual, changed = remove_small_regions(mask, min_area, mode)
    assert changed == expected_changed
    assert np.array_equal(actual, expected)


def test_small_islands_tie_keeps_the_one_opencv_numbers_first():
    """Every island is small and two are the largest: OpenCV numbers regions by 2x2 blocks, not by pixels."""
    mask = np.zeros((6, 7), dtype=bool)
    mask[0, 5] = mask[1, 3] = mask[2, 1] = True
    expected, _ = opencv_reference(mask, 2, "islands")
    actual, changed = remove_small_regions(mask, 2, "islands")
    assert changed and np.array_equal(actual, expected) and actual[1, 3] and actual.sum() == 1
