"""Mask IoU and Boundary IoU, the two numbers HQ-SAM reports (mIoU and mBIoU over a dataset).

Boundary IoU (Cheng et al., 2021) compares only the band of pixels within `d` pixels of each mask's contour:
`d = round(dilation_ratio * image diagonal)`, at least 1, and the band is the mask minus its erosion by a
`(2d + 1)` square (the same as `d` erosions by a 3x3 square). Everything outside the image counts as background,
so a mask cut by the image border has a band along the border, as in the reference evaluation.

Masks are boolean; integer or float masks are accepted only when every value is 0 or 1 (threshold logits with
`> 0` and 0/255 ground truth with `> 127` first). When both masks (or both bands) are empty the IoU is 1.0: a
perfect prediction of nothing. The reference code divides by zero there instead.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

DEFAULT_DILATION_RATIO = 0.02


def _as_bool(mask: Tensor, name: str) -> Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(
            f"{name} must be a boolean mask or hold only 0 and 1 (threshold logits with `> 0`, 0/255 masks with "
            f"`> 127`); got {mask.dtype} values outside {{0, 1}}"
        )
    return mask != 0


def _check_pair(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}")
    if pred.ndim not in (2, 3) or pred.shape[-1] == 0 or pred.shape[-2] == 0:
        raise ValueError(f"masks must be non-empty (H, W) or (B, H, W) tensors, got shape {tuple(pred.shape)}")
    return _as_bool(pred, "pred"), _as_bool(gt, "gt")


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boolean (..., H, W) masks over their last two dimensions; 1.0 where the union is empty."""
    intersection = (a & b).sum(dim=(-2, -1))
    union = (a | b).sum(dim=(-2, -1))
    return torch.where(union > 0, intersection / union.clamp(min=1), 1.0).float()


def mask_iou(pred: Bool[Tensor, "*b h w"], gt: Bool[Tensor, "*b h w"]) -> Float[Tensor, "*b"]:
    """Intersection over union of two masks, or of each pair in a batch.

    `pred` and `gt` are (H, W) or (B, H, W) masks (see the module docstring for the accepted dtypes); returns a
    float tensor of shape () or (B,). Both masks empty gives 1.0.
    """
    pred, gt = _check_pair(pred, gt)
    return _iou(pred, gt)


def boundary_dilation(height: int, width: int, dilation_ratio: float = DEFAULT_DILATION_RATIO) -> int:
    """Width `d` in pixels of the boundary band: `round(dilation_ratio * diagonal)`, at least 1.

    Rounds half to even like Python's `round`, which the reference code uses.
    """
    if not dilation_ratio > 0:
        raise ValueError(f"dilation_ratio must be positive, got {dilation_ratio}")
    return max(1, round(dilation_ratio * math.hypot(height, width)))


def _window_or(x: Tensor, size: int, dim: int) -> Tensor:
    """OR over every run of `size` consecutive elements along `dim` (the output is `size - 1` shorter).

    Windows of 1, 2, 4, ... elements are built by doubling, and a run of `size` is the OR of two overlapping
    power-of-two windows: about log2(size) passes over the tensor instead of `size` (a max-pool's kernel).
    """
    span, windows = 1, x
    while 2 * span <= size:
        length = windows.shape[dim] - span
        windows = windows.narrow(dim, 0, length) | windows.narrow(dim, span, length)
        span *= 2
    length = windows.shape[dim] - (size - span)
    return windows.narrow(dim, 0, length) | windows.narrow(dim, size - span, length)


def mask_boundary(mask: Bool[Tensor, "*b h w"], dilation: int) -> Bool[Tensor, "*b h w"]:
    """Pixels of `mask` within `dilation` pixels (chessboard distance) of the background or the image border."""
    if dilation < 1:
        raise ValueError(f"dilation must be at least 1, got {dilation}")
    mask = _as_bool(mask, "mask")
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be (H, W) or (B, H, W), got shape {tuple(mask.shape)}")
    # Erosion of the mask = dilation of its complement, where the outside of the image is complement too. The
    # square dilation is separable (rows, then columns), and each pass costs log2 of its width.
    outside = F.pad((~mask).reshape(-1, *mask.shape[-2:]), (dilation,) * 4, value=True)
    size = 2 * dilation + 1
    near_outside = _window_or(_window_or(outside, size, -1), size, -2)
    return mask & near_outside.reshape(mask.shape)


def boundary_iou(
    pred: Bool[Tensor, "*b h w"], gt: Bool[Tensor, "*b h w"], dilation_ratio: float = DEFAULT_DILATION_RATIO
) -> Float[Tensor, "*b"]:
    """Boundary IoU: the IoU of the boundary bands of two masks (see the module docstring), per pair.

    `pred` and `gt` are (H, W) or (B, H, W) masks; returns shape () or (B,). Both bands empty gives 1.0.
    """
    pred, gt = _check_pair(pred, gt)
    dilation = boundary_dilation(pred.shape[-2], pred.shape[-1], dilation_ratio)
    return _iou(mask_boundary(pred, dilation), mask_boundary(gt, dilation))


def summarise(
    mask_ious: Sequence[float] | Float[Tensor, " n"], boundary_ious: Sequence[float] | Float[Tensor, " n"]
) -> dict[str, float]:
    """Dataset summary of per-mask scores: `count`, `miou` and `mbiou` (means of mask and boundary IoU)."""
    ious = torch.as_tensor(mask_ious, dtype=torch.float64).flatten()
    bious = torch.as_tensor(boundary_ious, dtype=torch.float64).flatten()
    if ious.numel() != bious.numel():
        raise ValueError(f"got {ious.numel()} mask IoUs but {bious.numel()} boundary IoUs")
    if ious.numel() == 0:
        raise ValueError("no scores to summarise")
    if ious.isnan().any() or bious.isnan().any():
        raise ValueError("scores contain NaN")
    return {"count": float(ious.numel()), "miou": ious.mean().item(), "mbiou": bious.mean().item()}
