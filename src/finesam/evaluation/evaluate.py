"""Evaluation: mIoU and boundary IoU (mBIoU) of configurations side by side (base, + HQ, + LoRA, ...).

As in the HQ-SAM paper, each object is prompted with its ground-truth box (optionally a noisy box, or
foreground points), the predicted mask is compared at the image's full resolution, and boundary IoU uses a
dilation ratio of 0.02 of the image diagonal.
"""

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finesam.data.pairs import list_pairs, load_pair
from finesam.data.sampling import foreground_points, mask_box, noisy_box, sample_generator
from finesam.evaluation.metrics import DEFAULT_DILATION_RATIO, boundary_iou, mask_iou
from finesam.model.sam import SegmentAnything
from finesam.progress import progress as progress_items
from finesam.weights.io import atomic_write

PROMPTS = ("box", "noisy_box", "points")


@dataclass(frozen=True)
class Configuration:
    """A named model setup: `setup()` injects its adapters, `teardown()` ejects them."""

    name: str
    setup: Callable[[], None]
    teardown: Callable[[], None]


def adapter_configuration(name: str, adapters: Sequence[Any], hq_mask_only: bool | None = None) -> Configuration:
    """A configuration made of adapters injected in order (and ejected in reverse)."""

    def setup() -> None:
        for adapter in adapters:
            if hq_mask_only is not None and hasattr(adapter, "hq_mask_only"):
                adapter.hq_mask_only = hq_mask_only
            adapter.inject()

    def teardown() -> None:
        for adapter in reversed(adapters):
            adapter.eject()

    return Configuration(name, setup, teardown)


def object_prompt(mask: torch.Tensor, kind: str, g: torch.Generator, box_noise: float, points: int) -> dict[str, Any]:
    """The prompt of one object, in pixels of the original image, from its ground-truth mask."""
    box = mask_box(mask)
    if box is None:
        raise ValueError("empty ground-truth mask: nothing to prompt")
    if kind == "box":
        return {"boxes": box.tolist()}
    if kind == "noisy_box":
        height, width = mask.shape
        noisy = noisy_box(box, box_noise, max(height, width), g)
        noisy[0::2] = noisy[0::2].clamp(0, width)
        noisy[1::2] = noisy[1::2].clamp(0, height)
        return {"boxes": noisy.tolist()}
    chosen = foreground_points(mask, points, g)
    return {"points": chosen.tolist(), "labels": [1] * len(chosen)}


@dataclass(frozen=True)
class Result:
    name: str
    miou: float
    mbiou: float
    count: int
    # (image file, IoU, boundary IoU) of each sample, in the dataset's order
    per_sample: tuple[tuple[str, float, float], ...] = ()


def evaluate(
    model: SegmentAnything,
    configurations: Sequence[Configuration],
    data: Path,
    prompt: str = "box",
    box_noise: float = 0.1,
    points: int = 1,
    seed: int = 0,
    limit: int | None = None,
    dilation_ratio: float = DEFAULT_DILATION_RATIO,
    progress: bool = False,
) -> list[Result]:
    """mIoU / mBIoU of each configuration on the (image, mask) pairs of `data`, with every sample's scores.

    Each image and mask is read once, and every configuration is set up for it in turn; `progress` draws a
    bar of the samples on stderr (see `finesam.progress`). Under `torchrun` each process takes every
    world-size-th sample and the results are gathered.
    """
    if prompt not in PROMPTS:
        raise ValueError(f"unknown prompt kind {prompt!r} (one of {', '.join(PROMPTS)})")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 (or None: every sample), got {limit}")
    pairs = list_pairs(data)[:limit]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(pairs), world))
    scores: dict[str, list[tuple[int, float, float]]] = {c.name: [] for c in configurations}
    for index in progress_items(mine, "evaluating", quiet=not progress):
        image, mask = load_pair(*pairs[index])
        if not mask.any():
            raise ValueError(f"{pairs[index][1]}: empty ground-truth mask (see docs/training.md): nothing to prompt")
        kwargs = object_prompt(mask, prompt, sample_generator(seed, 0, index, "eval"), box_noise, points)
        truth = mask > 0.5
        for configuration in configurations:
            configuration.setup()
            try:
                predicted = model.predict(image, multimask_output=False, **kwargs).masks[0, 0].cpu()
            finally:
                configuration.teardown()
            iou = mask_iou(predicted, truth).item()
            biou = boundary_iou(predicted, truth, dilation_ratio=dilation_ratio).item()
            scores[configuration.name].append((index, iou, biou))
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, scores)
        scores = {name: sorted(r for part in gathered for r in part[name]) for name in scores}
    root = Path(data)
    return [
        Result(
            name,
            sum(r[1] for r in rows) / max(len(rows), 1),
            sum(r[2] for r in rows) / max(len(rows), 1),
            len(rows),
            tuple((pairs[i][0].relative_to(root).as_posix(), iou, biou) for i, iou, biou in rows),
        )
        for name, rows in scores.items()
    ]


def markdown_table(results: Sequence[Result]) -> str:
    lines = ["| configuration | mIoU | mBIoU | objects |", "|---|---:|---:|---:|"]
    lines += [f"| {r.name} | {r.miou:.4f} | {r.mbiou:.4f} | {r.count} |" for r in results]
    return "\n".join(lines) + "\n"


def per_sample_csv(results: Sequence[Result]) -> str:
    """One row per sample: its image, then the IoU and boundary IoU of each configuration."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *(f"{r.name} {metric}" for r in results for metric in ("IoU", "BIoU"))])
    for row in zip(*(r.per_sample for r in results), strict=True):
        writer.writerow([row[0][0], *(f"{value:.6f}" for _, iou, biou in row for value in (iou, biou))])
    return buffer.getvalue()


def write_report(results: Sequence[Result], out: Path, details: dict[str, Any]) -> tuple[Path, Path, Path]:
    """`out/eval.md` (the table), `out/eval.json` (the table and how it was made) and `out/per_image.csv`
    (every sample's scores), atomically."""
    table = markdown_table(results)
    summary = [{k: v for k, v in r.__dict__.items() if k != "per_sample"} for r in results]
    payload = {**details, "results": summary}
    markdown = atomic_write(out / "eval.md", lambda tmp: tmp.write_text(table))
    data = atomic_write(out / "eval.json", lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    rows = per_sample_csv(results)
    per_image = atomic_write(out / "per_image.csv", lambda tmp: tmp.write_text(rows))
    return markdown, data, per_image
