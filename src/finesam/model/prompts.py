"""Prompts as the model takes them: user prompts checked by `finesam.inputs.check_prompts` (every problem a
`ValueError` that says what was wrong, before anything reaches the model), moved to model-input coordinates
and batched as tensors.
"""

from dataclasses import dataclass, fields
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from finesam.inputs import check_prompts, scale_coordinates


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
    checked = check_prompts(
        points=points,
        labels=labels,
        boxes=boxes,
        mask_input=mask_input,
        original_size=original_size,
        mask_input_size=mask_input_size,
    )
    points_t = labels_t = boxes_t = mask_t = None
    if checked.points is not None and checked.labels is not None:
        points_t = torch.from_numpy(scale_coordinates(checked.points, original_size, input_size)).float()
        labels_t = torch.from_numpy(checked.labels).long()
    if checked.boxes is not None:
        corners = scale_coordinates(checked.boxes.reshape(-1, 2, 2), original_size, input_size)
        boxes_t = torch.from_numpy(corners.reshape(-1, 4)).float()
    if checked.mask_input is not None:
        mask_t = torch.from_numpy(checked.mask_input).float()
    batch = checked.batch

    def expand(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.expand(batch, *t.shape[1:])

    return Prompts(expand(points_t), expand(labels_t), expand(boxes_t), expand(mask_t))
