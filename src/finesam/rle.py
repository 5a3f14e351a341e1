"""Run-length encoding of binary masks, in the formats of the COCO API (pycocotools); numpy only, no torch (the
dataset runs of `finesam segment --onnx` write their annotations with it). `finesam.amg.rle` adds the batched
encoding of masks that are torch tensors (on any device) and re-exports these names.

Uncompressed RLE: `{"size": [height, width], "counts": [zeros, ones, zeros, ...]}`, runs over the pixels in
column-major (Fortran) order, starting with a run of zeros (0 when the first pixel is set).
COCO RLE: the same with `counts` written as a string, as `pycocotools.mask.frPyObjects` / `encode` write it:
each count (from the third on, minus the count two before it) in 5-bit groups, least significant first, a
continuation bit 0x20, the sign in bit 0x10 of the last group, each group offset by 48 into printable ASCII.
"""

from typing import Any, TypedDict

import numpy as np


class RLE(TypedDict):
    """A mask as runs: `counts` is a list of ints (uncompressed) or a string (COCO compressed)."""

    size: list[int]  # [height, width]
    counts: Any


def rle_from_changes(height: int, width: int, first_set: bool, changes: np.ndarray) -> RLE:
    """The uncompressed RLE of a mask given where its values change: `changes`, the increasing column-major
    indices of the pixels that differ from the pixel before them, and whether its first pixel is set."""
    runs = np.diff(np.concatenate(([0], changes, [height * width]))).tolist()
    return {"size": [height, width], "counts": [0, *runs] if first_set else runs}


def mask_to_rle(mask: np.ndarray) -> RLE:
    """Uncompressed RLE of one (H, W) mask (an array; nonzero is set)."""
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    columns = mask.T.reshape(-1)
    changes = np.flatnonzero(columns[1:] != columns[:-1]) + 1
    return rle_from_changes(height, width, bool(columns[0]) if columns.size else False, changes)


def _counts(rle: RLE) -> list[int]:
    counts = rle["counts"]
    return decode_counts(counts) if isinstance(counts, str | bytes) else [int(c) for c in counts]


def rle_to_mask(rle: RLE) -> np.ndarray:
    """The (H, W) boolean mask of an uncompressed or COCO RLE."""
    height, width = (int(v) for v in rle["size"])
    counts = _counts(rle)
    if any(c < 0 for c in counts) or sum(counts) != height * width:
        raise ValueError(f"RLE counts must be non-negative and add up to {height}x{width} = {height * width} pixels")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(width, height).T


def rle_area(rle: RLE) -> int:
    """Number of set pixels of an uncompressed or COCO RLE."""
    return sum(_counts(rle)[1::2])


def encode_counts(counts: list[int]) -> str:
    """The COCO string of a list of run lengths."""
    characters: list[str] = []
    for i, count in enumerate(counts):
        value = count - counts[i - 2] if i > 2 else count  # the first three counts are stored as they are
        while True:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: a negative value ends at -1
            more = value != -1 if group & 0x10 else value != 0
            characters.append(chr(48 + (group | 0x20 if more else group)))
            if not more:
                break
    return "".join(characters)


def decode_counts(text: str | bytes) -> list[int]:
    """The run lengths of a COCO string (see `encode_counts`)."""
    data = text.encode("ascii") if isinstance(text, str) else text
    counts: list[int] = []
    position = 0
    while position < len(data):
        value, shift = 0, 0
        while True:
            if position >= len(data):
                raise ValueError("COCO RLE string ends in the middle of a count")
            group = data[position] - 48
            if not 0 <= group < 64:
                raise ValueError(f"COCO RLE string has an invalid character {chr(data[position])!r}")
            value |= (group & 0x1F) << shift
            position += 1
            shift += 5
            if not group & 0x20:
                if group & 0x10:
                    value -= 1 << shift  # sign extension
                break
        counts.append(value + counts[-2] if len(counts) > 2 else value)
    return counts


def to_coco(rle: RLE) -> RLE:
    """The COCO (string) form of an uncompressed RLE, as `pycocotools.mask.frPyObjects` gives it (decoded)."""
    return {"size": list(rle["size"]), "counts": encode_counts(_counts(rle))}


def from_coco(rle: RLE) -> RLE:
    """The uncompressed form of a COCO RLE."""
    return {"size": list(rle["size"]), "counts": _counts(rle)}
