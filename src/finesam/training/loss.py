"""The HQ-SAM training loss: binary cross-entropy plus Dice, on points sampled where the prediction is unsure.

Facts from the HQ-SAM training code (`train/utils/loss_mask.py`, itself the Mask2Former / PointRend recipe):

- The loss is not computed on every pixel but on `112 * 112` points per mask. First `3 * 112 * 112` points are
  drawn uniformly in the unit square and the low-resolution logits are read there by bilinear interpolation;
  the uncertainty of a point is `-|logit|` (read at the point, not interpolated from per-pixel uncertainties).
  The `int(0.75 * 112 * 112)` most uncertain points are kept and the rest are fresh uniform points.
- Points are (x, y) in [0, 1]^2, read with `grid_sample(..., 2 * p - 1, align_corners=False)`: the centre of
  pixel (i, j) of an h x w map is ((j + 0.5) / w, (i + 0.5) / h). Logits (256 x 256 in HQ-SAM) and targets
  (the 1024 x 1024 ground truth divided by 255) are read at the same points, so their resolutions may differ;
  the targets read there are soft (between 0 and 1) near the mask's edges.
- Point selection and target reading happen without gradients; the gradient reaches the logits only.
- Per mask: BCE-with-logits averaged over its points, and Dice `1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`
  with `p = sigmoid(logit)` (the +1 keeps empty masks finite). Each is summed over masks and divided by
  `num_masks`, which HQ-SAM sets to the number of masks in the local batch: a plain mean over masks, as here.
  The total is `bce + dice`, unweighted.

Two deliberate differences: randomness comes from explicit `torch.Generator`s (one per mask if wanted) and
never from the global RNG, so a run is reproducible whatever the number of processes; and points within half
a pixel of the image border read the edge pixel (`padding_mode="border"`) instead of blending with zeros (the
reference's `grid_sample` default, which pulls both logits and targets towards 0 there). Pass
`padding_mode="zeros"` to reproduce the reference exactly.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

NUM_POINTS = 112 * 112
OVERSAMPLE_RATIO = 3.0
IMPORTANCE_SAMPLE_RATIO = 0.75

Generators: TypeAlias = torch.Generator | Sequence[torch.Generator] | None
PaddingMode: TypeAlias = Literal["border", "zeros"]


@dataclass(frozen=True)
class MaskLoss:
    """A mask loss and its two parts (scalar tensors): `total = bce + dice`."""

    total: Tensor
    bce: Tensor
    dice: Tensor


def point_sample(
    values: Float[Tensor, "b c h w"], points: Float[Tensor, "b p 2"], padding_mode: PaddingMode = "border"
) -> Float[Tensor, "b c p"]:
    """Bilinear reading of `values` at `points`, (x, y) in [0, 1]^2 with pixel (i, j) centred at
    ((j + 0.5) / w, (i + 0.5) / h)."""
    grid = (2.0 * points - 1.0).unsqueeze(2).to(values.dtype)
    return F.grid_sample(values, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False).squeeze(3)


def _per_mask_generators(generator: Generators, count: int) -> list[torch.Generator]:
    if generator is None:
        fresh = torch.Generator()
        fresh.seed()  # from OS entropy; the global RNG is left alone
        return [fresh] * count
    if isinstance(generator, torch.Generator):
        return [generator] * count
    generators = list(generator)
    if len(generators) != count:
        raise ValueError(f"got {len(generators)} generators for {count} masks; pass one per mask, or a single one")
    return generators


def _uniform_points(generators: list[torch.Generator], count: int, device: torch.device) -> Tensor:
    """(len(generators), count, 2) uniform points, mask k drawn from generators[k] on the generator's device."""
    return torch.stack([torch.rand(count, 2, generator=g, device=g.device).to(device) for g in generators])


def uncertain_points(
    logits: Float[Tensor, "b 1 h w"],
    generator: Generators,
    num_points: int = NUM_POINTS,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
    padding_mode: PaddingMode = "border",
) -> Float[Tensor, "b p 2"]:
    """`num_points` (x, y) points per mask: the most uncertain of `oversample_ratio * num_points` uniform
    candidates first (`int(importance_sample_ratio * num_points)` of them), then fresh uniform points.

    `generator`: one generator for the whole batch, one per mask (mask k's points then depend only on its own
    generator), or None for a fresh unseeded one.
    """
    _check_sampling(logits, num_points, oversample_ratio, importance_sample_ratio)
    generators = _per_mask_generators(generator, logits.shape[0])
    num_uncertain = int(importance_sample_ratio * num_points)
    with torch.no_grad():
        candidates = _uniform_points(generators, int(num_points * oversample_ratio), logits.device)
        uncertainty = -point_sample(logits.detach(), candidates, padding_mode).squeeze(1).abs()
        chosen = uncertainty.topk(num_uncertain, dim=1).indices
        points = candidates.gather(1, chosen.unsqueeze(2).expand(-1, -1, 2))
        if num_uncertain < num_points:
            points = torch.cat([points, _uniform_points(generators, num_points - num_uncertain, logits.device)], 1)
    return points


def _check_logits(logits: Tensor) -> None:
    if logits.ndim != 4 or logits.shape[1] != 1 or 0 in logits.shape:
        raise ValueError(f"logits must be (B, 1, h, w) with B, h, w > 0, got shape {tuple(logits.shape)}")


def _check_sampling(logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float) -> None:
    _check_logits(logits)
    if num_points < 1:
        raise ValueError(f"num_points must be at least 1, got {num_points}")
    if not oversample_ratio >= 1:
        raise ValueError(f"oversample_ratio must be at least 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be within [0, 1], got {importance_sample_ratio}")


def _check_targets(logits: Tensor, targets: Tensor) -> None:
    _check_logits(logits)
    if targets.ndim != 4 or targets.shape[:2] != logits.shape[:2] or 0 in targets.shape:
        raise ValueError(
            f"targets must be (B, 1, H, W) with the logits' B = {logits.shape[0]}, got shape {tuple(targets.shape)}"
        )
    if not targets.is_floating_point():
        raise ValueError(f"targets must be a float tensor of values in [0, 1], got {targets.dtype}")
    if not ((targets >= 0) & (targets <= 1)).all():
        raise ValueError("targets must hold values in [0, 1] (divide 0/255 masks by 255)")


def _bce_dice(point_logits: Tensor, point_targets: Tensor) -> MaskLoss:
    """The loss of (B, P) logits against (B, P) targets: per-mask means, averaged over the masks."""
    point_logits, point_targets = point_logits.float(), point_targets.float()
    bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none").mean(1).mean()
    probabilities = point_logits.sigmoid()
    overlap = (probabilities * point_targets).sum(1)
    dice = (1 - (2 * overlap + 1) / (probabilities.sum(1) + point_targets.sum(1) + 1)).mean()
    return MaskLoss(total=bce + dice, bce=bce, dice=dice)


def point_sampled_loss(
    logits: Float[Tensor, "b 1 h w"],
    targets: Float[Tensor, "b 1 H W"],
    generator: Generators,
    num_points: int = NUM_POINTS,
    oversample_ratio: float = OVERSAMPLE_RATIO,
    importance_sample_ratio: float = IMPORTANCE_SAMPLE_RATIO,
    padding_mode: PaddingMode = "border",
) -> MaskLoss:
    """HQ-SAM's BCE + Dice loss on uncertainty-sampled points (see the module docstring), averaged over masks.

    `logits` are the predicted mask logits; `targets` the ground truth as floats in [0, 1], at any resolution
    (both are read at the same normalised points). `generator` as for `uncertain_points`.
    """
    _check_targets(logits, targets)
    points = uncertain_points(logits, generator, num_points, oversample_ratio, importance_sample_ratio, padding_mode)
    with torch.no_grad():
        point_targets = point_sample(targets.detach().to(logits.dtype), points, padding_mode).squeeze(1)
    return _bce_dice(point_sample(logits, points, padding_mode).squeeze(1), point_targets)


def bce_dice_loss(logits: Float[Tensor, "b 1 h w"], targets: Float[Tensor, "b 1 H W"]) -> MaskLoss:
    """BCE + Dice on every logit pixel, without sampling, averaged over masks.

    Targets of another resolution are resized bilinearly to the logits' (`align_corners=False`), which reads
    them at the logits' pixel centres just as the point-sampled loss would.
    """
    _check_targets(logits, targets)
    with torch.no_grad():
        targets = targets.detach().to(logits.dtype)
        if targets.shape[-2:] != logits.shape[-2:]:
            targets = F.interpolate(targets, size=logits.shape[-2:], mode="bilinear", align_corners=False)
    return _bce_dice(logits.flatten(1), targets.flatten(1))
