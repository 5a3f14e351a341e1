"""HF transformers' `Sam2Model` checkpoints in finesam, and HF as a second, independent check of our SAM 2.1.

The same seeded random weights (the official SAM 2.1 Hiera-T of `build_official_sam2`, every tensor perturbed) go
to HF's `Sam2Model` through `finesam.weights.hf`'s renames and `save_pretrained`, then back into finesam through
`load_sam(folder)`. HF's model, read by transformers itself (`from_pretrained`), and finesam's then predict on a
real photo.

Pixels: HF's `Sam2ImageProcessor` imports torchvision, which is not installed, so HF gets the pixel values of
finesam's own SAM 2 preprocessing (`SegmentAnything2.preprocess`: the official 1024 x 1024 antialiased bilinear
resize and ImageNet normalisation), and prompts in that 1024 x 1024 frame, as its processor would scale them.

Tolerance: TOLERANCE (1e-4, float32) on the image embedding, the two high-resolution features, the
low-resolution logits, the IoU and the object-score logits. HF's SAM 2 image path is the official one: the same
LayerNorm epsilons, the same dynamic single-mask rule (stability, delta 0.05, threshold 0.98), the same padding
point. One difference by design, harmless: with a box and clicks, HF orders the sparse tokens clicks-then-box
where the official code puts the box first; the two-way transformer does not see the order (no positional index
on prompt tokens), so the outputs agree within float rounding. finesam's `predict` returns low-resolution logits
clamped to +-32 as the official predictor does; those of these weights stay well inside, so HF's are compared
as they are.
"""

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks
from transformers import Sam2Config, Sam2Model

from finesam.model.sam2.sam2 import SegmentAnything2
from finesam.weights import CheckpointError, convert_checkpoint, load_sam
from finesam.weights.hf import (
    HF_POINT_EMBED,
    HF_SHARED_POSITIONAL,
    from_hf_key,
    read_hf_checkpoint,
    to_hf_key,
    to_hf_state_dict,
)
from finesam.weights.layouts.hiera import is_memory_key

from conftest import PHOTOS, TOLERANCE, max_diff
from official_sam2 import build_official_sam2

RELEASE = "sam2.1_hiera_tiny"
LOW_RES_LIMIT = 32.0  # the official predictor's (and finesam's) clamp of returned low-resolution logits

# prompts in pixels of the landscape photo (1800 x 1200)
CLICKS = (np.array([[900.0, 600.0], [300.0, 250.0]]), np.array([1, 0]))
BOX = np.array([500.0, 300.0, 1400.0, 1000.0])
PROMPTS: dict[str, dict[str, Any]] = {
    "clicks": {"points": CLICKS[0], "labels": CLICKS[1]},
    "box": {"boxes": BOX},
    "box and click": {"boxes": BOX, "points": CLICKS[0][:1], "labels": CLICKS[1][:1]},
}


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    """The official SAM 2.1 Hiera-T `state_dict` with seeded random weights (video memory included)."""
    return build_official_sam2(RELEASE).state_dict()


@pytest.fixture(scope="module")
def folders(official, tmp_path_factory) -> tuple[Path, Path]:
    """(HF folder written by `Sam2Model.save_pretrained`, official `.pt`) holding the same weights."""
    root = tmp_path_factory.mktemp("sam2")
    hf = Sam2Model(Sam2Config())  # transformers' defaults are SAM 2.1 Hiera-T
    hf.load_state_dict(to_hf_state_dict(official, "sam2"), strict=True)
    folder = root / "sam2.1-hiera-tiny"
    hf.save_pretrained(folder)
    pt = root / f"{RELEASE}.pt"
    torch.save({"model": official}, pt)
    return folder, pt


def test_renames_map_every_image_key_both_ways(official):
    """Every official image-model key has its `Sam2Model` key of the same shape, and back; the four (1, 256)
    point embeddings are the rows of HF's one (4, 256). The video memory's tensors are not `Sam2Model`'s: they
    have no HF name, `to_hf_state_dict` leaves them out, and an HF folder has none (a converted HF checkpoint keeps
    no memory tensors; the official `.pt` keeps them beside the model, see test (c))."""
    hf = Sam2Model(Sam2Config()).state_dict()
    image = {k: v for k, v in official.items() if not is_memory_key(k)}
    memory = sorted(k for k in official if is_memory_key(k))
    assert len(memory) > 100 and len(image) > 250
    renamed = to_hf_state_dict(official, "sam2")
    assert renamed.keys() == hf.keys()
    assert all(renamed[k].shape == hf[k].shape for k in hf)
    points = [f"sam_prompt_encoder.point_embeddings.{i}.weight" for i in range(4)]
    assert torch.equal(renamed[HF_POINT_EMBED], torch.cat([official[k] for k in points]))
    fourier = official["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]
    assert torch.equal(renamed[HF_SHARED_POSITIONAL], fourier)
    one_to_one = [k for k in image if k not in points]
    hf_names = [to_hf_key(k, "sam2") for k in one_to_one]
    assert None not in hf_names and len(set(hf_names)) == len(one_to_one)  # no two official keys on one HF key
    assert all(from_hf_key(h or "", "sam2") == k for k, h in zip(one_to_one, hf_names, strict=True))
    assert all(to_hf_key(k, "sam2") is None for k in memory)
    # spot checks of the table against the brief's reading of the two models
    assert to_hf_key("image_encoder.neck.convs.2.conv.weight", "sam2") == "vision_encoder.neck.convs.2.weight"
    assert to_hf_key("no_mem_embed", "sam2") == "no_memory_embedding"
    assert (
        from_hf_key("mask_decoder.transformer.layers.1.cross_attn_image_to_token.o_proj.bias", "sam2")
        == "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.bias"
    )
    assert from_hf_key("mask_decoder.pred_obj_score_head.layers.0.weight", "sam2") == (
        "sam_mask_decoder.pred_obj_score_head.layers.1.weight"
    )
    # SAM 1's table is untouched
    assert to_hf_key("image_encoder.blocks.3.norm2.bias") == "vision_encoder.layers.3.layer_norm2.bias"


def test_hf_reads_back_as_the_official_state_dict(official, folders):
    """`read_hf_checkpoint` gives the official image keys, tensor for tensor; HF's second Fourier matrix, when
    saved, is checked and dropped."""
    read = read_hf_checkpoint(folders[0])
    assert read.model_type == "sam2" and read.decoder_heads == 8
    image = {k: v for k, v in official.items() if not is_memory_key(k)}
    assert read.state_dict.keys() == image.keys()
    assert all(torch.equal(read.state_dict[k], image[k]) for k in image)


def test_hf_sam2_predicts_as_finesam(folders):
    """HF's `Sam2Model` (read by transformers) and finesam's `load_sam(folder)`, on a real photo: embeddings,
    low-resolution logits, IoU and object scores, single and multimask."""
    hf = Sam2Model.from_pretrained(folders[0]).eval()
    ours = load_sam(folders[0])
    assert isinstance(ours, SegmentAnything2)
    image = PHOTOS["landscape"]()
    width, height = image.size
    pixels, _ = ours.preprocess(image)
    embedding = ours.encode_image(image)
    scale = torch.tensor([1024.0 / width, 1024.0 / height])
    with torch.no_grad():
        features = hf(pixel_values=pixels).image_embeddings  # prompted with HF's empty point
        assert max_diff(embedding.embedding, features[-1]) <= TOLERANCE
        assert max_diff(embedding.features["high_res_s0"], features[0]) <= TOLERANCE
        assert max_diff(embedding.features["high_res_s1"], features[1]) <= TOLERANCE
        for name, prompt in PROMPTS.items():
            inputs: dict[str, Any] = {}
            if "points" in prompt:
                inputs["input_points"] = (torch.from_numpy(prompt["points"]).float() * scale)[None, None]
                inputs["input_labels"] = torch.from_numpy(prompt["labels"])[None, None]
            if "boxes" in prompt:
                inputs["input_boxes"] = (torch.from_numpy(prompt["boxes"]).float() * scale.repeat(2))[None, None]
            for multimask in (False, True):
                out = hf(image_embeddings=features, multimask_output=multimask, **inputs)
                result = ours.predict(embedding, **prompt, multimask_output=multimask)
                low_res = out.pred_masks[0]
                assert low_res.shape == result.low_res_logits.shape == (1, 3 if multimask else 1, 256, 256)
                # finesam's logits are clamped to +-32 like the official predictor's: these never reach it, and
                # vary about 1000 times more than the tolerance
                assert low_res.abs().max() < LOW_RES_LIMIT and low_res.std() > 0.05, name
                assert max_diff(result.low_res_logits, low_res) <= TOLERANCE, (name, multimask)
                assert max_diff(result.iou_predictions, out.iou_scores[0]) <= TOLERANCE, (name, multimask)
                assert result.object_score_logits is not None
                assert max_diff(result.object_score_logits, out.object_score_logits[0]) <= TOLERANCE, name


def test_hf_folder_equals_official_file(folders, tmp_path):
    """`load_sam(HF folder)` equals `load_sam(official .pt)` weight for weight; converted, both give the same
    weights digest, the official file keeping the video memory beside the model and the HF one none."""
    folder, pt = folders
    from_hf, from_pt = load_sam(folder).state_dict(), load_sam(pt).state_dict()
    assert from_hf.keys() == from_pt.keys()
    assert all(torch.equal(from_hf[k], from_pt[k]) for k in from_pt)
    official_report = convert_checkpoint(pt, tmp_path)
    hf_report = convert_checkpoint(folder, tmp_path)
    assert hf_report.written == [tmp_path / f"{folder.name}.safetensors"]
    assert hf_report.base_digest == official_report.base_digest
    assert hf_report.same_base_as == official_report.written
    assert official_report.kept > 100 and hf_report.kept == 0


def _copy(folder: Path, to: Path, changes: dict[str, Any]) -> Path:
    """`folder` with its weights hard-linked (no copy of 150 MB) and `changes` merged into config.json."""
    to.mkdir()
    os.link(folder / "model.safetensors", to / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    for path, value in changes.items():
        section = config
        *parts, last = path.split(".")
        for part in parts:
            section = section.setdefault(part, {})
        section[last] = value
    (to / "config.json").write_text(json.dumps(config))
    return to


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("vision_config.backbone_config.global_attention_blocks", [5, 7]),
        ("vision_config.backbone_config.num_attention_heads_per_stage", [2, 4, 8, 16]),
        ("vision_config.backbone_config.window_size_per_stage", [8, 4, 8, 7]),
        ("mask_decoder_config.num_attention_heads", 4),
        ("mask_decoder_config.dynamic_multimask_via_stability", False),
        ("prompt_encoder_config.hidden_act", "relu"),
    ],
)
def test_settings_sam2_cannot_express_are_refused(folders, tmp_path, setting, value):
    """Settings that the weights do not show must be those of the release whose shapes they have."""
    changed = _copy(folders[0], tmp_path / "changed", {setting: value})
    with pytest.raises(CheckpointError, match=rf"{setting} = .* \(finesam's SAM 2: "):
        load_sam(changed)


def test_hiera_of_no_release_is_refused(tmp_path):
    """A `Sam2Model` whose Hiera has no released shape: clear error, nothing guessed. (Saved as initialised, it is
    refused earlier: HF's `Sam2Model` does not tie its two Fourier matrices, which start different; the official
    model has one.)"""
    backbone = {"model_type": "sam2_hiera_det_model", "hidden_size": 32, "blocks_per_stage": [1, 1, 2, 1]}
    backbone |= {"embed_dim_per_stage": [32, 64, 128, 256], "global_attention_blocks": [3]}
    config = Sam2Config(vision_config={"backbone_config": backbone, "backbone_channel_list": [256, 128, 64, 32]})
    model = Sam2Model(config)
    model.save_pretrained(tmp_path / "untied")
    with pytest.raises(CheckpointError, match=rf"{HF_SHARED_POSITIONAL} differs from prompt_encoder\."):
        load_sam(tmp_path / "untied")
    with torch.no_grad():
        model.shared_image_embedding.positional_embedding.copy_(
            model.prompt_encoder.shared_embedding.positional_embedding
        )
    model.save_pretrained(tmp_path / "small")
    with pytest.raises(CheckpointError, match=r"config.json: a Hiera of no released size \(width 32"):
        load_sam(tmp_path / "small")


def test_unknown_model_type_lists_sam2(folders, tmp_path):
    changed = _copy(folders[0], tmp_path / "edgetam", {"model_type": "edgetam"})
    with pytest.raises(CheckpointError, match=r"model_type 'edgetam'; .* or 'sam2' \(Sam2Model\)"):
        load_sam(changed)


def test_memory_tensors_are_not_hf_keys(official):
    """Guard of the bench's use: an official file goes to HF's Sam2Model with its memory left out, and a key
    of neither layout is an error."""
    assert not any(is_memory_key(k) for k in to_hf_state_dict(official, "sam2"))
    with pytest.raises(KeyError, match="bogus: no HF name"):
        to_hf_state_dict({**official, "bogus": torch.zeros(1)}, "sam2")
