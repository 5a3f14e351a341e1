"""The decoder-variant example of docs/variants.md: it is HQ-SAM when tapping the official block, something
else otherwise, and it trains and evaluates with the same commands as the built-in adapters."""

import os
import sys
from pathlib import Path

import pytest
import torch

from finesam.adapters.hq import HQSAMAdapter
from finesam.data.synthetic import write_dataset
from finesam.model.prompts import Prompts
from finesam.weights.loading import sam_from_state_dict

from conftest import SMALL
from helpers import finesam, write_config
from official import build_official

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

from variants import HQFromBlock  # noqa: E402


@torch.no_grad()
def hq_logits(model, adapter) -> torch.Tensor:
    adapter.inject()
    embedding = model.encode(
        torch.randn(1, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(0))
    )
    logits, _ = model.decode(embedding, Prompts(boxes=torch.tensor([[20.0, 30.0, 200.0, 220.0]])))
    adapter.eject()
    return logits


def test_variant_on_the_official_block_is_hq_sam():
    model = sam_from_state_dict(build_official(SMALL, seed=5).state_dict())
    reference = HQSAMAdapter(model, hq_mask_only=True)
    official_block = HQFromBlock(model, block=SMALL.encoder.early_embedding_block)
    official_block.load_state_dict(reference.state_dict())
    other_block = HQFromBlock(model, block=0)
    other_block.load_state_dict(reference.state_dict())
    expected = hq_logits(model, reference)
    assert torch.equal(hq_logits(model, official_block), expected)
    assert (hq_logits(model, other_block) - expected).abs().max() > 1e-3
    with pytest.raises(ValueError, match="block must be"):
        HQFromBlock(model, block=SMALL.encoder.depth)


def test_variant_trains_and_evaluates_with_the_cli(tmp_path, small):
    from finesam.weights import save_sam

    base = save_sam(small, tmp_path / "base.safetensors")
    train = write_dataset(tmp_path / "train", 4, seed=0, size=(64, 64))
    variant = '[variant]\nadapter = "variants:HQFromBlock"\noptions = { block = 0 }'
    config = write_config(tmp_path / "v.toml", base, train, tmp_path / "run", variant, epochs=1)
    env = {"PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    trained = finesam("train", "--config", config, "--quiet", env=env)
    assert trained.returncode == 0, trained.stderr
    weights = tmp_path / "run" / "variant.safetensors"
    assert weights.is_file()
    evaluated = finesam(
        "eval",
        train,
        "--weights",
        base,
        "--variant",
        "variants:HQFromBlock",
        "--variant-weights",
        weights,
        "--variant-options",
        '{"block": 0}',
        "--out",
        tmp_path / "eval",
        env=env,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert "| base |" in table and "| variant |" in table
