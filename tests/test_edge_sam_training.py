"""HQ-SAM trained on a frozen EdgeSAM, which has no HQ release: the HQ adapter taps RepViT's stage 2 (the stage at
the embedding grid), the HQ-SAM 1 recipe (config, loss, data path) applies, the loss falls and the trained adapter
beats the base on a synthetic thin-structure set; inject / eject leave the base bit-identical.

The base is a narrow RepViT with EdgeSAM's structure at 256 px (so that CI trains it in seconds), seeded, with the
prompt encoder and decoder of the small official SAM (converted by our converter).

On this base HQ-SAM gains less than on SAM's ViT (tests/test_training.py asks +0.1 mIoU there): a random RepViT's
stage 2 holds the detail of its 16x16-pixel cells after three stride-2 depthwise stages of random nonlinear
mixing, where the ViT's early embedding is a linear projection of the patch's pixels. The test asks the trained
HQ mask to more than double the base's mIoU and boundary IoU, by at least 0.03."""

from pathlib import Path

import pytest
import torch

from finesam.adapters.hq import HQSAMAdapter, hq_adapter_for
from finesam.model.config import SAMConfig
from finesam.model.prompts import Prompts
from finesam.model.rep_vit import RepViTConfig
from finesam.model.sam import SegmentAnything, build_sam
from finesam.weights import load_sam, save_sam

from conftest import assert_model_unchanged, model_snapshot
from hq_training import base_and_hq_scores, hq_trainer, run_hq_training, synthetic_split

SIZE = 96  # synthetic images: small and quick to draw
SMALL_EDGE_SAM_256 = SAMConfig(
    RepViTConfig(widths=(16, 24, 32, 48), depths=(1, 2, 2, 1), se_blocks=(0, 2, 4)), image_size=256
)


def small_edge_sam(small: SegmentAnything) -> SegmentAnything:
    """The narrow EdgeSAM: its encoder seeded, its prompt encoder and decoder the small official SAM's."""
    torch.manual_seed(0)
    model = build_sam(SMALL_EDGE_SAM_256).eval()
    decoder = {k: v for k, v in small.state_dict().items() if not k.startswith(type(small.image_encoder).__name__)}
    missing, unexpected = model.load_state_dict(decoder, strict=False)
    assert not unexpected and all(k.startswith("RepViTEncoder.") for k in missing)
    return model


@pytest.fixture(scope="module")
def base(tmp_path_factory, small) -> Path:
    return save_sam(small_edge_sam(small), tmp_path_factory.mktemp("base") / "edge_sam_small.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return synthetic_split(tmp_path_factory.mktemp("synthetic"), SIZE)


@torch.no_grad()
def test_hq_taps_stage_2_and_ejects_bit_exactly(base):
    model = load_sam(base)
    assert model.config.encoder.early_embedding_dim == 32
    adapter = hq_adapter_for(model)
    assert isinstance(adapter, HQSAMAdapter)
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    box = Prompts(boxes=torch.tensor([[30.0, 40.0, 200.0, 220.0]]))
    before_weights = model_snapshot(model)
    before = model.decode(model.encode(pixels), box, multimask_output=True)
    for parameter in adapter.parameters():  # trained-looking HQ weights: the masks change
        parameter.normal_(0, 0.1)
    adapter.inject()
    embedding = model.encode(pixels)
    assert model.image_features()["early_embedding"].shape == (1, 16, 16, 32)  # stage 2, channels-last
    changed = model.decode(embedding, box, multimask_output=True)
    assert not torch.equal(changed[0], before[0])
    adapter.eject()
    assert_model_unchanged(model, before_weights)
    after = model.decode(model.encode(pixels), box, multimask_output=True)
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_training_hq_on_edge_sam_lowers_the_loss_and_beats_the_base(base, data, tmp_path):
    trainer = hq_trainer(base, data[0], tmp_path, epochs=12, lr=3e-3)
    assert isinstance(trainer.adapters["hq"], HQSAMAdapter)
    written = run_hq_training(trainer, base, steps=48, window=8)

    before, after = base_and_hq_scores(base, written["hq"], data[1])
    assert after[0] > max(2 * before[0], before[0] + 0.03), (before, after)
    assert after[1] > max(2 * before[1], before[1] + 0.03), (before, after)
