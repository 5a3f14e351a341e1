"""Random prompts drawn from ground-truth masks, reproducibly: for training samples and evaluation alike."""

import hashlib

import torch
from torch import Tensor


def sample_generator(seed: int, epoch: int, index: int, stream: str = "") -> torch.Generator:
    """A generator that depends only on (seed, epoch, index, stream)."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}/{stream}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def mask_box(mask: Tensor) -> Tensor | None:
    """(x1, y1, x2, y2) of the pixels > 0.5 (pixel indices), or None for an empty mask."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.stack([xs.min(), ys.min(), xs.max(), ys.max()]).float()


def foreground_points(mask: Tensor, count: int, g: torch.Generator) -> Tensor:
    """Up to `count` distinct (x, y) pixels > 0.5 of `mask`, drawn uniformly: (N, 2) float."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    chosen = torch.randperm(len(xs), generator=g)[:count]
    return torch.stack([xs[chosen], ys[chosen]], dim=-1).float()


def noisy_box(box: Tensor, scale: float, size: int, g: torch.Generator) -> Tensor:
    """Moves the centre by up to ±half the size and changes each side by up to ±its length (times `scale`)."""
    centre, extent = (box[:2] + box[2:]) / 2, box[2:] - box[:2]
    jitter = (torch.rand(4, generator=g) * 2 - 1) * torch.cat([extent / 2, extent]) * scale
    centre, extent = centre + jitter[:2], extent + jitter[2:]
    corners = torch.cat([centre - extent / 2, centre + extent / 2]).clamp(0, size)
    return torch.cat([torch.minimum(corners[:2], corners[2:]), torch.maximum(corners[:2], corners[2:])])
