"""Configurations: the nested layout round-trips through `to_dict` / `from_dict` (and JSON) for every preset, and
the flat layout that finesam 0.1 wrote into its files still reads back as the same configuration."""

import json

import pytest
import torch

from finesam.model.config import PRESETS, SAM_VIT_B, SAM_VIT_TINY, SAMConfig
from finesam.weights import convert_checkpoint, load_sam
from finesam.weights.io import FORMAT_KEY, read_format, read_safetensors, write_safetensors
from finesam.weights.loading import weights_digest

from conftest import SMALL

# `SAMConfig.to_dict()` of finesam 0.1 (one flat dataclass), as its files hold it in `finesam.config`
FLAT_VIT_B = {
    "image_size": 1024,
    "patch_size": 16,
    "encoder_dim": 768,
    "encoder_depth": 12,
    "encoder_heads": 12,
    "global_attention_blocks": [2, 5, 8, 11],
    "window_size": 14,
    "mlp_ratio": 4.0,
    "prompt_dim": 256,
    "mask_in_channels": 16,
    "decoder_depth": 2,
    "decoder_heads": 8,
    "decoder_mlp_dim": 2048,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "encoder_type": "vit",
    "tiny_dims": [64, 128, 160, 320],
    "tiny_depths": [2, 2, 6, 2],
    "tiny_heads": [2, 4, 5, 10],
    "tiny_windows": [7, 7, 14, 7],
    "tiny_mbconv_expand": 4.0,
    "name": "vit_b",
}
FLAT_VIT_TINY = {**FLAT_VIT_B, "encoder_dim": 320, "encoder_type": "tiny_vit", "name": "vit_tiny"}
FLAT_SMALL = {
    **FLAT_VIT_B,
    "image_size": 256,
    "encoder_dim": 64,
    "encoder_depth": 4,
    "encoder_heads": 4,
    "global_attention_blocks": [1, 3],
    "window_size": 6,
    "name": "custom",
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips(name):
    preset = PRESETS[name]
    for values in (preset.to_dict(), json.loads(json.dumps(preset.to_dict()))):  # JSON: tuples become lists
        config = SAMConfig.from_dict(values)
        assert config == preset and config.name == preset.name
        assert type(config.encoder) is type(preset.encoder)


def test_the_small_test_config_round_trips():
    assert SAMConfig.from_dict(json.loads(json.dumps(SMALL.to_dict()))) == SMALL


@pytest.mark.parametrize(("flat", "preset"), [(FLAT_VIT_B, SAM_VIT_B), (FLAT_VIT_TINY, SAM_VIT_TINY)])
def test_the_flat_layout_of_finesam_0_1_reads_as_the_preset(flat, preset):
    config = SAMConfig.from_dict(flat)
    assert config == preset and config.name == preset.name
    assert type(config.encoder) is type(preset.encoder)
    assert SAMConfig.from_dict(config.to_dict()) == preset  # and is written back in the nested layout


def test_unknown_fields_and_families_are_refused():
    with pytest.raises(ValueError, match="unknown SAMConfig fields"):
        SAMConfig.from_dict({**SAM_VIT_B.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="unknown ViTConfig fields"):
        SAMConfig.from_dict({**SAM_VIT_B.to_dict(), "encoder": {"family": "vit", "width": 3}})
    with pytest.raises(ValueError, match="unknown encoder family"):
        SAMConfig.from_dict({**SAM_VIT_B.to_dict(), "encoder": {"family": "resnet"}})


def test_a_sam_file_of_finesam_0_1_loads_and_is_recognised_as_the_same_base(tmp_path, official_small, small):
    """finesam 0.1 wrote the flat configuration and the weights digest as a bare string (now a JSON string)."""
    state = small.state_dict()
    old = write_safetensors(
        state,
        tmp_path / "out" / "old.safetensors",
        {FORMAT_KEY: "sam", "finesam.config": json.dumps(FLAT_SMALL), "finesam.weights_sha256": weights_digest(state)},
    )
    loaded = load_sam(old)
    assert loaded.config == SMALL
    assert list(loaded.state_dict()) == list(state)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    checkpoint = tmp_path / "sam_small.pth"
    torch.save(official_small.state_dict(), checkpoint)
    report = convert_checkpoint(checkpoint, tmp_path / "out")
    assert report.same_base_as == [old]
    _, metadata = read_safetensors(report.written[0])
    assert json.loads(metadata["finesam.weights_sha256"]) == report.base_digest  # written as JSON now
    assert read_format(report.written[0], "sam", tensors=False)[1]["weights_sha256"] == report.base_digest


def test_bare_text_sections_of_finesam_0_1_stay_text(tmp_path):
    """A 0.1 digest made of decimal digits only is still the digest's text, not a number."""
    path = write_safetensors(
        {"x": torch.zeros(1)}, tmp_path / "old.safetensors", {FORMAT_KEY: "sam", "finesam.d": "0123"}
    )
    assert read_format(path, "sam", tensors=False)[1]["d"] == "0123"
