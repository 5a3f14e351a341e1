"""HQ-SAM 2 trained on a frozen SAM 2.1 of a size that has no HQ release: the HQ-SAM 1 recipe (config, loss, data
path) applies; the loss falls and the trained adapter beats the base on a synthetic thin-structure set. And the
automatic mask generator with HQ-SAM 2 injected.

The base is a small Hiera (SAM 2.1's structure, narrow and at 256 px so that CI trains it in seconds) with the
official package's seeded random weights, converted by our converter."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks

from finesam.adapters.hq import HQSAM2Adapter
from finesam.amg import AutomaticMaskGenerator
from finesam.data.synthetic import write_dataset
from finesam.evaluation import adapter_configuration, evaluate
from finesam.model.config import SAMConfig
from finesam.model.sam import build_sam
from finesam.model.sam2.config import HieraConfig, SAM2DecoderConfig
from finesam.training.config import load_config
from finesam.training.trainer import Trainer
from finesam.weights import load_hq, load_sam, save_sam
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.sam_keys import convert_state_dict

from conftest import photo
from helpers import write_config
from official_sam2 import build_official_sam2, small_hiera

SIZE = 96  # synthetic images: small and quick to draw
SMALL_SAM2_256 = SAMConfig(
    HieraConfig(embed_dim=32, heads=1, stages=(1, 1, 2, 1), global_attention_blocks=(3,)),
    SAM2DecoderConfig(),
    image_size=256,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    official = build_official_sam2("sam2.1_hiera_tiny", small_hiera())
    model = build_sam(SMALL_SAM2_256)
    model.load_state_dict(convert_state_dict(official.state_dict(), model, ignore=is_memory_key))
    return save_sam(model.eval(), tmp_path_factory.mktemp("base") / "sam2.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return write_dataset(root / "train", 16, seed=0, size=(SIZE, SIZE)), write_dataset(
        root / "val", 8, seed=100, size=(SIZE, SIZE)
    )


def evaluate_val(model, adapters, val: Path) -> tuple[float, float]:
    (result,) = evaluate(model, [adapter_configuration("x", adapters, hq_mask_only=True)], val)
    return result.miou, result.mbiou


def test_training_hq_sam2_lowers_the_loss_and_beats_the_base(base, data, tmp_path):
    config = load_config(write_config(tmp_path / "c.toml", base, data[0], tmp_path / "run", "[hq]", epochs=12))
    trainer = Trainer(config, progress=False)
    assert isinstance(trainer.adapters["hq"], HQSAM2Adapter)
    base_state = {k: v.clone() for k, v in load_sam(base).state_dict().items()}
    written = trainer.run()
    rows = [row["loss"] for row in trainer.rows]
    assert len(rows) == trainer.total_steps == 48
    first, last = np.mean(rows[:8]), np.mean(rows[-8:])
    assert last < 0.8 * first, (first, last)
    trainer.adapters["hq"].eject()
    state = trainer.model.state_dict()  # the frozen base: bit-identical after training
    assert all(torch.equal(state[k], base_state[k]) for k in base_state)

    fresh = load_sam(base)
    before = evaluate_val(fresh, [], data[1])
    after = evaluate_val(fresh, [load_hq(fresh, written["hq"])], data[1])
    assert after[0] > before[0] + 0.1 and after[1] > before[1] + 0.1, (before, after)


@torch.no_grad()
def test_everything_with_hq_sam2_injected(base, tmp_path):
    model = load_sam(base)
    adapter = HQSAM2Adapter(model)
    image = photo("rocket").resize((300, 200))
    options: dict[str, Any] = dict(
        points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    )
    plain = AutomaticMaskGenerator(model, **options).generate(image)
    adapter.inject()
    try:
        for hq_mask_only, per_point in ((False, 3), (True, 1)):  # the HQ mask added to SAM's three, or alone
            records = AutomaticMaskGenerator(model, hq_mask_only=hq_mask_only, **options).generate(image)
            assert len(records) == 16 * per_point
            assert all(0.0 <= r["predicted_iou"] <= 1.0 for r in records)
    finally:
        adapter.eject()
    assert len(plain) == 16 * 3
