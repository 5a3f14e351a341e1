"""The HQ training tests' shared recipe (SAM, EdgeSAM, EfficientSAM, EfficientViT-SAM, SAM 2): a synthetic
train / val pair, a trainer for `[hq]` on a saved base, the loss and frozen-base checks of a run, and the val
scores of the base and of the trained HQ mask."""

from pathlib import Path

import numpy as np
import torch

from finesam.data.synthetic import write_dataset
from finesam.evaluation import adapter_configuration, evaluate
from finesam.model.sam import SegmentAnything
from finesam.training.config import load_config
from finesam.training.trainer import Trainer
from finesam.weights import load_hq, load_sam

from helpers import write_config

Scores = tuple[float, float]  # (mIoU, boundary mIoU)


def synthetic_split(root: Path, size: int, train: int = 16, val: int = 8) -> tuple[Path, Path]:
    """`train` and `val` synthetic images of size x size (seeds 0 and 100: the two sets never share an image)."""
    return write_dataset(root / "train", train, seed=0, size=(size, size)), write_dataset(
        root / "val", val, seed=100, size=(size, size)
    )


def hq_trainer(base: Path, train: Path, tmp_path: Path, **optim: object) -> Trainer:
    """A trainer of `[hq]` on the frozen `base`, writing its run to `tmp_path / "run"`."""
    config = load_config(write_config(tmp_path / "c.toml", base, train, tmp_path / "run", "[hq]", **optim))
    return Trainer(config, progress=False)


def run_hq_training(trainer: Trainer, base: Path, steps: int, window: int, frozen_base: bool = True) -> dict[str, Path]:
    """Runs `trainer` for its `steps` steps; the mean loss of the last `window` steps is under 0.8 times that of
    the first. With `frozen_base`, the base is bit-identical to `base` once the HQ adapter is ejected."""
    # loaded before the run, as the tests did before this helper: the same RNG state reaches the trainer
    base_state = {k: v.clone() for k, v in load_sam(base).state_dict().items()} if frozen_base else None
    written = trainer.run()
    losses = [row["loss"] for row in trainer.rows]
    assert len(losses) == trainer.total_steps == steps
    first, last = np.mean(losses[:window]), np.mean(losses[-window:])
    assert last < 0.8 * first, (first, last)
    if base_state is not None:
        trainer.adapters["hq"].eject()
        state = trainer.model.state_dict()  # the frozen base: bit-identical after training
        assert all(torch.equal(state[k], base_state[k]) for k in base_state)
    return written


def val_scores(model: SegmentAnything, adapters: list[object], val: Path) -> Scores:
    """(mIoU, boundary mIoU) on `val` with `adapters` injected (an HQ adapter gives its HQ mask alone)."""
    (result,) = evaluate(model, [adapter_configuration("x", adapters, hq_mask_only=True)], val)
    return result.miou, result.mbiou


def base_and_hq_scores(base: Path, hq: Path, val: Path) -> tuple[Scores, Scores]:
    """The val scores of a fresh `base`, then of the same model with the trained HQ weights `hq`."""
    fresh = load_sam(base)
    return val_scores(fresh, [], val), val_scores(fresh, [load_hq(fresh, hq)], val)
