"""EfficientSAM (the `efficient_sam` family) against the official code's outputs.

EfficientSAM has no installable package: `tests/data/efficient_sam_ti/` holds what the official predictor
(github.com/yformer/EfficientSAM, commit d525f62) returned on two scikit-image photos, three prompts each, with
and without multimask output, for ViT-Ti weights that `fixture_recipe.recipe` regenerates key by key (its
check value is the fixture's). Our converter reads those weights, and the model equals the official one at model
level (embedding, low-resolution logits, IoU: 1e-4) and through `predict` (logits at the original size: 1e-3).
ViT-S is the same code with other widths: its presets build and an official-layout file of its shapes converts
completely. Then EfficientSAM in the tools: its prompt rules (refused mask inputs, at most 6 points), the ONNX
export and predictor (its own processing, equal to torch), `segment`, `everything`, and a dataset run.
"""

import functools
import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from torch import Tensor

from finesam import inputs
from finesam.adapters.hq import HQEfficientSAMAdapter, HQSAMAdapter, hq_adapter_for
from finesam.amg import AutomaticMaskGenerator
from finesam.fast import apply_fast_paths, remove_fast_paths
from finesam.model.config import SAMConfig
from finesam.model.efficient_sam.config import (
    EFFICIENT_SAM_VITS,
    EFFICIENT_SAM_VITT,
    EfficientSAMConfig,
    EfficientSAMDecoderConfig,
)
from finesam.model.efficient_sam.efficient_sam import EfficientSAM, stretched_input
from finesam.model.efficient_sam.prompt_encoder import fixed_count_labelled_points
from finesam.model.prompts import Prompts
from finesam.model.sam import ImageEmbedding, build_sam
from finesam.onnx.export import export
from finesam.onnx.predictor import OnnxPredictor
from finesam.weights import load_sam, save_sam
from finesam.weights.layouts import layout_for
from finesam.weights.loading import sam_from_state_dict
from finesam.weights.sam_keys import convert_state_dict, infer_config, sam_key_map

from conftest import assert_model_unchanged, model_snapshot
from fixture_recipe import recipe_sha256
from helpers import finesam
from hq_training import base_and_hq_scores, hq_trainer, run_hq_training, synthetic_split
from official_efficient_sam import (
    CHECK_VALUE,
    DATA,
    official_keys,
    official_shaped,
    official_state_dict,
    reference_encoder,
)

MODEL_TOLERANCE = 1e-4  # embedding, low-resolution logits, IoU
PREDICTOR_TOLERANCE = 1e-3  # logits at the original size (bicubic from 256 x 256)
IMAGES = {"astronaut": skimage_data.astronaut, "coffee": skimage_data.coffee}  # (512, 512), (400, 600)


@functools.cache
def stored() -> tuple[Any, list[dict[str, Any]]]:
    outputs = np.load(DATA / "outputs.npz")
    return outputs, json.loads(str(outputs["meta_json"]))["cases"]


@functools.cache
def ti() -> EfficientSAM:
    model = sam_from_state_dict(official_state_dict())
    assert isinstance(model, EfficientSAM)
    return model.eval()


@functools.cache
def embedding(image: str) -> ImageEmbedding:
    return ti().encode_image(IMAGES[image]())


@functools.cache
def small_official() -> dict[str, Tensor]:
    """A narrow EfficientSAM in the official layout (64-wide ViT of 3 blocks, 64-channel decoder), recipe weights."""
    return official_shaped(dim=64, depth=3, prompt_dim=64)


# the narrow EfficientSAM at 256 px (the recipe's weights, the position table resized to the 16 x 16 grid): the
# tools and training run it in seconds
SMALL_256 = SAMConfig(
    EfficientSAMConfig(dim=64, depth=3, heads=1),
    EfficientSAMDecoderConfig(prompt_dim=64, mlp_dim=512, iou_head_hidden_dim=64),
    image_size=256,
)


def small_256() -> EfficientSAM:
    model = build_sam(SMALL_256)
    assert isinstance(model, EfficientSAM)
    model.load_state_dict(convert_state_dict(small_official(), model))
    return model.eval()


def ours(case: dict[str, Any]) -> dict[str, Any]:
    """A stored case's prompt as `predict` takes it: labels 2 and 3 (the first two points) are the box."""
    points, labels = np.array(case["points"], dtype=np.float64), np.array(case["labels"])
    prompt: dict[str, Any] = {}
    if labels[0] == 2:
        prompt["boxes"], points, labels = points[:2].reshape(4), points[2:], labels[2:]
    if len(points):
        prompt["points"], prompt["labels"] = points, labels
    return prompt


def test_the_recipe_regenerates_the_official_weights():
    keys = official_keys()
    state_dict = official_state_dict()
    assert len(keys) == len(state_dict) == 278 and list(state_dict) == [e["key"] for e in keys]
    assert recipe_sha256(state_dict) == CHECK_VALUE
    # a one-ulp change anywhere changes the check value
    changed = dict(
        state_dict, **{"mask_decoder.iou_token.weight": state_dict["mask_decoder.iou_token.weight"] * 1.0001}
    )
    assert recipe_sha256(changed) != CHECK_VALUE


def test_the_layout_reads_the_release_and_maps_every_key():
    state_dict = official_state_dict()
    assert layout_for(state_dict).family == "efficient_sam"
    config = infer_config(state_dict)
    assert config == EFFICIENT_SAM_VITT and config.name == "efficient_sam_vitt"
    model = ti()
    rules = sam_key_map(model)
    assert rules.keys() == model.state_dict().keys()
    sources = [source for rule in rules.values() for source in rule.sources]
    assert sorted(sources) == sorted(state_dict)  # every official key, exactly once


def test_vit_s_has_the_same_code_with_its_widths():
    """ViT-S: an official-layout file of its shapes (384 wide, 6 heads) is recognised as the release, converts
    key for key and loads; the model has as many weights as the file."""
    state_dict = official_shaped(dim=384)
    config = infer_config(state_dict)
    assert config == EFFICIENT_SAM_VITS and config.name == "efficient_sam_vits"
    encoder = config.encoder
    assert isinstance(encoder, EfficientSAMConfig) and (encoder.dim, encoder.heads, encoder.depth) == (384, 6, 12)
    model = sam_from_state_dict(state_dict)
    assert isinstance(model, EfficientSAM) and model.config.name == "efficient_sam_vits"
    assert sum(t.numel() for t in model.state_dict().values()) == sum(t.numel() for t in state_dict.values())
    weights = model.state_dict()
    assert torch.equal(
        weights["EfficientSAMEncoder.PositionEmbedding.PretrainPositionTable.weight"],
        state_dict["image_encoder.pos_embed"],
    )


@torch.no_grad()
def test_the_embedding_matches_the_official_one():
    stretched = stretched_input(Image.fromarray(IMAGES["astronaut"]()), 1024)
    expected = torch.from_numpy(stored()[0]["astronaut_image_embed_s2"])
    assert (embedding("astronaut").embedding[:, ::2, ::2, ::2] - expected).abs().max() <= MODEL_TOLERANCE
    # the functional reference encoder of tests/test_families.py is the official one too
    reference, _ = reference_encoder(official_state_dict(), heads=3)(stretched)
    assert (reference[:, ::2, ::2, ::2] - expected).abs().max() <= MODEL_TOLERANCE


def _case_ids() -> list[str]:
    return [case["case"] for case in stored()[1]]


@pytest.mark.parametrize("name", _case_ids())
@torch.no_grad()
def test_model_and_predictor_match_the_official_outputs(name):
    outputs, cases = stored()
    case = next(c for c in cases if c["case"] == name)
    image, multimask = case["image"], case["multimask_output"]
    height, width = case["image_hw"]
    low_res = torch.from_numpy(outputs[f"{name}_low_res_logits_s2"])
    iou = torch.from_numpy(outputs[f"{name}_iou"])
    # model level: the official rescaling of the points (x * 1024 / W, y * 1024 / H), in the official order
    points = torch.tensor(case["points"], dtype=torch.float32)
    scaled = torch.stack([points[:, 0] * 1024 / width, points[:, 1] * 1024 / height], dim=-1)[None]
    labels = torch.tensor(case["labels"])[None]
    masks, scores = ti().decode(embedding(image).embedding, Prompts(scaled, labels), multimask_output=multimask)
    assert masks.shape[1] == (3 if multimask else 1)
    assert (masks[0, :, ::2, ::2] - low_res).abs().max() <= MODEL_TOLERANCE
    assert (scores[0] - iou).abs().max() <= MODEL_TOLERANCE
    # through the predictor: prompts in original pixels, the box as a box
    prediction = ti().predict(embedding(image), **ours(case), multimask_output=multimask, return_logits=True)
    full = torch.from_numpy(outputs[f"{name}_mask_logits_s9"])
    assert prediction.masks.shape == (1, masks.shape[1], height, width)
    assert (prediction.masks[0, :, ::9, ::9] - full).abs().max() <= PREDICTOR_TOLERANCE
    assert (prediction.low_res_logits[0, :, ::2, ::2] - low_res).abs().max() <= MODEL_TOLERANCE
    assert (prediction.iou_predictions[0] - iou).abs().max() <= MODEL_TOLERANCE


@torch.no_grad()
def test_mask_inputs_and_too_many_points_are_refused():
    model, emb = ti(), embedding("coffee")
    with pytest.raises(ValueError, match="EfficientSAM takes no mask input"):
        model.predict(emb, points=[[10, 10]], mask_input=np.zeros((256, 256)))
    with pytest.raises(ValueError, match="at most 6 prompt points per prompt \\(a box counts as two\\), got 7"):
        model.predict(emb, points=np.full((7, 2), 20.0))
    with pytest.raises(ValueError, match="got 7"):
        model.predict(emb, boxes=[10, 10, 100, 100], points=np.full((5, 2), 20.0))
    model.predict(emb, boxes=[10, 10, 100, 100], points=np.full((4, 2), 20.0))  # six: the most it embeds


def test_the_prompt_order_and_padding_have_a_numpy_twin():
    g = np.random.default_rng(0)
    for has_box, n in ((True, 0), (True, 3), (False, 1), (False, 6)):
        box = g.uniform(0, 500, 4) if has_box else None
        points = g.uniform(0, 500, (n, 2)) if n else None
        labels = g.integers(0, 2, n) if n else None
        prompts = Prompts(
            None if points is None else torch.tensor(points)[None],
            None if labels is None else torch.tensor(labels)[None],
            None if box is None else torch.tensor(box)[None],
        )
        coords, kinds = fixed_count_labelled_points(prompts, 6)
        twin_coords, twin_kinds = inputs.fixed_count_labelled_points(points, labels, box, 6)
        assert coords.shape == (1, 6, 2) and np.allclose(coords[0].numpy(), twin_coords, atol=1e-4)
        assert np.array_equal(kinds[0].numpy(), twin_kinds)
        # box corners first, then the clicks, then padding at (-1, -1)
        expected = [2, 3] * has_box + list(labels if labels is not None else []) + [-1] * (6 - n - 2 * has_box)
        assert twin_kinds.tolist() == expected and (twin_coords[len(expected) - expected.count(-1) :] == -1).all()


@pytest.mark.parametrize("shape", [(400, 600), (1024, 1024), (1500, 700)])
def test_the_stretched_input_has_a_numpy_twin(shape):
    pixels = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    expected = stretched_input(image, 1024)
    twin, size = inputs.stretched_model_input(image, 1024)
    assert size == (1024, 1024) and np.abs(twin - expected.numpy()).max() <= 2e-5


@torch.no_grad()
def test_the_fast_paths_equal_the_reference_and_leave_no_trace():
    model, image = small_256(), IMAGES["coffee"]()
    prompt: dict[str, Any] = {"boxes": [[200, 60, 480, 330], [10, 20, 300, 200]], "multimask_output": True}
    reference, text = model.predict(image, **prompt, return_logits=True), repr(model)
    assert apply_fast_paths(model) > 0  # its GELUs, the dense positional encoding
    fast = model.predict(image, **prompt, return_logits=True)
    assert (fast.masks - reference.masks).abs().max() <= 1e-5
    assert (fast.iou_predictions - reference.iou_predictions).abs().max() <= 1e-6
    remove_fast_paths(model)
    assert repr(model) == text


@torch.no_grad()
def test_the_onnx_export_and_predictor_equal_torch(tmp_path):
    model = small_256()
    image = Image.fromarray(IMAGES["coffee"]())
    report = export(model, tmp_path / "onnx")
    description = report.description
    assert description["processing"] == model.processing_names
    assert description["preprocessing"]["point_count"] == 6 and description["preprocessing"]["image_size"] == 256
    assert "mask_input" not in description["decoder_inputs"]
    predictor = OnnxPredictor(tmp_path / "onnx")
    prompts: list[dict[str, Any]] = [
        {"boxes": [200, 60, 480, 330]},
        {"boxes": [[200, 60, 480, 330], [10, 20, 300, 200]], "points": [[330, 200], [100, 350]], "labels": [1, 0]},
    ]
    for prompt in prompts:
        expected = model.predict(image, **prompt, return_logits=True)
        onnx = predictor.predict(image, **prompt, return_logits=True)
        assert np.abs(onnx.masks - expected.masks.numpy()).max() <= PREDICTOR_TOLERANCE
        assert np.abs(onnx.iou_predictions - expected.iou_predictions.numpy()).max() <= MODEL_TOLERANCE
    with pytest.raises(ValueError, match="takes no mask input"):
        predictor.predict(image, points=[[10, 10]], mask_input=np.zeros((256, 256)))
    with pytest.raises(ValueError, match="at most 6 prompt points"):
        predictor.predict(image, points=np.full((7, 2), 20.0))


@torch.no_grad()
def test_everything_upscales_and_filters_as_predict():
    model = small_256()
    image = IMAGES["coffee"]()[::2, ::2]
    options: dict[str, Any] = dict(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    records = AutomaticMaskGenerator(model, box_nms_thresh=1.0, **options).generate(image)
    assert len(records) == 4 * 3
    points = np.array([record["point_coords"][0] for record in records])
    prediction = model.predict(image, points=points[:, None], multimask_output=True)  # (12, 3, H, W)
    for record, masks in zip(records, prediction.masks, strict=True):
        # every mask of everything is one of predict's masks for its point (EfficientSAM's bicubic upscaling)
        segmentation = record["segmentation"]
        assert isinstance(segmentation, np.ndarray)
        assert any(np.array_equal(segmentation, mask.numpy()) for mask in masks)


def test_segment_and_a_dataset_run_read_the_official_file(tmp_path):
    path = tmp_path / "efficient_sam_small.pt"
    torch.save({"model": small_official()}, path)
    model = load_sam(path)
    assert isinstance(model, EfficientSAM)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, load in IMAGES.items():
        Image.fromarray(load()).save(folder / f"{name}.png")
    mask = tmp_path / "mask.png"
    result = finesam(
        "segment",
        folder / "coffee.png",
        "--weights",
        path,
        "--box",
        "200,60,480,330",
        "--point",
        "330,200",
        "--out",
        mask,
    )
    assert result.returncode == 0, result.stderr
    expected, _ = model.predict(
        Image.open(folder / "coffee.png"), boxes=[200, 60, 480, 330], points=[[330, 200]]
    ).best()
    with Image.open(mask) as png:
        assert np.array_equal(np.asarray(png) == 255, expected[0].numpy())
    manifest = tmp_path / "prompts.jsonl"
    manifest.write_text(
        "".join(
            json.dumps(line) + "\n"
            for line in (
                {"image": str(folder / "astronaut.png"), "boxes": [[150, 20, 360, 420]]},
                {"image": str(folder / "coffee.png"), "points": [[[330, 200]]]},
            )
        )
    )
    out = tmp_path / "run"
    result = finesam("segment", "--manifest", manifest, "--weights", path, "--out", out, "--keep-empty")
    assert result.returncode == 0, result.stderr
    annotations = json.loads((out / "annotations.json").read_text())
    assert len(annotations["images"]) == 2 and len(annotations["annotations"]) == 2
    result = finesam(
        "everything",
        folder,
        "--weights",
        path,
        "--out",
        tmp_path / "everything",
        "--points-per-side=2",
        "--pred-iou-thresh=0",
        "--stability-score-thresh=0",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "everything" / "annotations.json").read_text())["annotations"]


# HQ-SAM on EfficientSAM: no official HQ weights exist, so the adapter is trained (`finesam train`).


@torch.no_grad()
def test_hq_sam_injects_into_efficient_sam_and_ejects_bit_exactly():
    model = small_256()
    image = IMAGES["coffee"]()
    prompt: dict[str, Any] = {"boxes": [200, 60, 480, 330], "points": [[330, 200]], "multimask_output": True}
    before, outputs = model_snapshot(model), model.predict(image, **prompt, return_logits=True)
    adapter = hq_adapter_for(model)
    assert isinstance(adapter, HQEfficientSAMAdapter)
    with pytest.raises(ValueError, match="HQ-SAM adapts SAM's mask decoder; this EfficientSAM has a EfficientSAMMask"):
        HQSAMAdapter(model)
    adapter.inject()
    # the early feature is the output of ViT block 2, channels-last
    early = model.encode_image(image).features["early_embedding"]
    assert early.shape == (1, 16, 16, 64)
    with_hq = model.predict(image, **prompt, return_logits=True)
    assert with_hq.masks.shape[1] == 1  # HQ-SAM's output: the best SAM mask plus the HQ mask
    assert (with_hq.masks - outputs.masks[:, :1]).abs().max() > 1e-3
    adapter.eject()
    assert_model_unchanged(model, before)
    again = model.predict(image, **prompt, return_logits=True)
    assert torch.equal(again.masks, outputs.masks) and torch.equal(again.iou_predictions, outputs.iou_predictions)


def test_finesam_train_trains_hq_sam_on_efficient_sam(tmp_path):
    base = save_sam(small_256(), tmp_path / "efficient_sam.safetensors")
    train, val = synthetic_split(tmp_path, 96, train=12)
    trainer = hq_trainer(base, train, tmp_path, epochs=8, lr=3e-3)
    assert isinstance(trainer.adapters["hq"], HQEfficientSAMAdapter)
    assert "noise_mask" not in trainer.data.prompts.kinds and trainer.data.prompts.max_points == 6
    # the samples are EfficientSAM's input frame: the image stretched without antialiasing
    sample = trainer.data.sample(0, epoch=0)
    pixels, _ = trainer.model.preprocess(Image.open(sample.image_path).convert("RGB"))
    assert (sample.pixels - pixels[0]).abs().max() <= 1e-6
    written = run_hq_training(trainer, base, steps=24, window=6)
    plain, hq = base_and_hq_scores(base, written["hq"], val)
    assert hq[0] > plain[0] + 0.1 and hq[1] > plain[1] + 0.1, (plain, hq)
