"""HQ-SAM 2 trained on a frozen SAM 2.1 of a size that has no HQ release: the HQ-SAM 1 recipe (config, loss, data
path) applies; the loss falls and the trained adapter beats the base on a synthetic thin-structure set. And the
automatic mask generator with HQ-SAM 2 injected.

The base is a small Hiera (SAM 2.1's structure, narrow and at 256 px so that CI trains it in seconds) with the
official package's seeded random weights, converted by our converter."""

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks

from finesam.adapters.hq import HQSAM2Adapter
from finesam.amg import AutomaticMaskGenerator
from finesam.model.config import SAMConfig
from finesam.model.sam import build_sam
from finesam.model.sam2.config import HieraConfig, SAM2DecoderConfig
from finesam.weights import load_sam, save_sam
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.sam_keys import convert_state_dict

from conftest import photo
from hq_training import base_and_hq_scores, hq_trainer, run_hq_training, synthetic_split
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
    return synthetic_split(tmp_path_factory.mktemp("synthetic"), SIZE)


def test_training_hq_sam2_lowers_the_loss_and_beats_the_base(base, data, tmp_path):
    trainer = hq_trainer(base, data[0], tmp_path, epochs=12)
    assert isinstance(trainer.adapters["hq"], HQSAM2Adapter)
    written = run_hq_training(trainer, base, steps=48, window=8)

    before, after = base_and_hq_scores(base, written["hq"], data[1])
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
