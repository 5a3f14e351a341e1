"""Validation of user prompts (points, labels, boxes, mask input) and their batching.

Every problem raises a `ValueError` that says what was wrong, before anything reaches the model.
"""

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from finesam.model.processing import scale_coordinates


@dataclass(frozen=True)
class Prompts:
    """A batch of B prompts in pixels of the model input (the resized image), as the model takes them.

    `prepare_prompts` makes one from user input in pixels of the original image, checking everything.
    """

    points: Float[Tensor, "batch n 2"] | None = None
    labels: Int[Tensor, "batch n"] | None = None  # 0 = background, 1 = foreground
    boxes: Float[Tensor, "batch 4"] | None = None  # x1 y1 x2 y2
    mask_input: Float[Tensor, "batch 1 low low"] | None = None  # low-resolution logits of an earlier prediction

    def __post_init__(self) -> None:
        if self.points is not None and self.labels is None:
            raise ValueError("points need labels (1 foreground, 0 background)")

    @property
    def batch_size(self) -> int:
        return max((len(t) for t in (self.points, self.boxes, self.mask_input) if t is not None), default=1)

    def __getitem__(self, index: slice) -> "Prompts":
        """Prompts `index` of the batch (a slice)."""
        values = (getattr(self, f.name) for f in fields(self))
        return Prompts(*(None if t is None else t[index] for t in values))


def _array(value: Any, name: str) -> np.ndarray:
    if isinstance(value, Tensor):
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


def prepare_prompts(
    *,
    points: Any = None,
    labels: Any = None,
    boxes: Any = None,
    mask_input: Any = None,
    original_size: tuple[int, int],
    input_size: tuple[int, int],
    mask_input_size: int,
) -> Prompts:
    """Checks prompts given in original-image pixels and moves them to model-input coordinates.

    points: (N, 2) or (B, N, 2) x, y; labels: (N,) or (B, N), 1 foreground / 0 background (default: all 1);
    boxes: (4,) or (B, 4) x1, y1, x2, y2; mask_input: (M, M), (1, M, M) or (B, 1, M, M) logits.
    A batch of one (points, or mask) is repeated to match a larger batch of another kind (usually boxes).
    """
    points_t = labels_t = boxes_t = mask_t = None
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
        points_t = torch.from_numpy(scale_coordinates(coords, original_size, input_size)).float()
        labels_t = torch.from_numpy(kinds).long()
        batch_sizes["points"] = coords.shape[0]
    if boxes is not None:
        box_array = _batched(_array(boxes, "boxes"), 2, "boxes", "(4,) or (B, 4)")
        if box_array.shape[-1] != 4 or box_array.shape[0] == 0:
            raise ValueError(f"boxes must have shape (4,) or (B, 4), got {tuple(box_array.shape)}")
        corners = box_array.reshape(-1, 2, 2)
        _check_inside(corners, "box corners", original_size)
        if (corners[:, 1] < corners[:, 0]).any():
            raise ValueError(f"boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1, got {box_array.tolist()}")
        boxes_t = torch.from_numpy(scale_coordinates(corners, original_size, input_size).reshape(-1, 4)).float()
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
        mask_t = torch.from_numpy(masks).float()
        batch_sizes["mask_input"] = masks.shape[0]
    if not batch_sizes:
        raise ValueError("the prompt is empty: give points, boxes or a mask_input")
    batch = max(batch_sizes.values())
    if any(size not in (1, batch) for size in batch_sizes.values()):
        raise ValueError(f"prompt batch sizes do not match: {batch_sizes}")

    def expand(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.expand(batch, *t.shape[1:])

    return Prompts(expand(points_t), expand(labels_t), expand(boxes_t), expand(mask_t))
