"""SAM 2 / SAM 2.1 on images against Meta's `sam2` 1.1.0: `SegmentAnything2.predict` equals `SAM2ImagePredictor`
(clicks, boxes, both, mask input, multimask on and off, batched prompts, several images, hole / sprinkle
filling) on real photos, with seeded random weights converted by our converter; checkpoints load from the
official file and round-trip through ours."""

import functools
from typing import Any

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks
from PIL import Image
from refiners.fluxion import layers as fl

from finesam.adapters.hq import HQSAMAdapter
from finesam.data.synthetic import write_dataset
from finesam.fast import apply_fast_paths, remove_fast_paths
from finesam.fast.swap import is_fast
from finesam.model.config import SAMConfig
from finesam.model.sam import build_sam
from finesam.model.sam2.config import HieraConfig, SAM2DecoderConfig
from finesam.model.sam2.hiera import WindowedPositionEmbedding
from finesam.model.sam2.mask_decoder import SAM2MultimaskSelection, stability_scores
from finesam.model.sam2.sam2 import SegmentAnything2
from finesam.training.config import load_config
from finesam.training.trainer import Trainer
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.loading import convert_checkpoint, load_sam, read_kept, sam_from_state_dict, save_sam
from finesam.weights.sam_keys import convert_state_dict

from conftest import PHOTOS, PREDICTOR_PROMPTS, max_diff
from helpers import write_config
from official_sam2 import SAM2ImagePredictor, build_official_sam2, small_hiera

# largest absolute difference allowed with the official predictor: logits at the original size, low-resolution
# logits, IoU and object scores (float32, CPU; what is reached is ~1e-6)
TOLERANCE = 1e-3
# the same for the image embedding and the high-resolution features
FEATURE_TOLERANCE = 1e-4

SMALL_SAM2 = SAMConfig(
    HieraConfig(embed_dim=32, heads=1, stages=(1, 1, 2, 1), global_attention_blocks=(3,)), SAM2DecoderConfig()
)


@functools.cache
def _small() -> tuple[Any, SegmentAnything2]:
    official = build_official_sam2("sam2.1_hiera_tiny", small_hiera())
    ours = build_sam(SMALL_SAM2)
    assert isinstance(ours, SegmentAnything2)
    ours.load_state_dict(convert_state_dict(official.state_dict(), ours, ignore=is_memory_key))
    return official, ours.eval()


@functools.cache
def _release(name: str) -> tuple[Any, SegmentAnything2]:
    official = build_official_sam2(name)
    ours = sam_from_state_dict(official.state_dict())
    assert isinstance(ours, SegmentAnything2)
    return official, ours


def _ours_kwargs(prompt: dict[str, Any]) -> dict[str, Any]:
    return {"points": prompt.get("point_coords"), "labels": prompt.get("point_labels"), "boxes": prompt.get("box")}


def _compare(official: Any, ours: SegmentAnything2, image: np.ndarray, prompt: dict[str, Any], multimask: bool) -> None:
    predictor = SAM2ImagePredictor(official)
    predictor.set_image(image)
    masks, iou, low_res = predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
    embedding = ours.encode_image(image)
    features: Any = predictor._features
    assert max_diff(embedding.embedding, features["image_embed"]) <= FEATURE_TOLERANCE
    for i, key in enumerate(("high_res_s0", "high_res_s1")):
        assert max_diff(embedding.features[key], features["high_res_feats"][i]) <= FEATURE_TOLERANCE
    result = ours.predict(embedding, **_ours_kwargs(prompt), multimask_output=multimask, return_logits=True)
    assert result.masks.shape[1] == (3 if multimask else 1)
    assert max_diff(result.masks[0], torch.from_numpy(masks)) <= TOLERANCE
    assert max_diff(result.low_res_logits[0], torch.from_numpy(low_res)) <= TOLERANCE
    assert max_diff(result.iou_predictions[0], torch.from_numpy(iou)) <= TOLERANCE
    # no confident pixel (|logit| > 0.1) on the other side of the threshold
    logits, expected = result.masks[0], torch.from_numpy(masks)
    assert not ((logits > 0.1) & (expected < 0) | (logits < -0.1) & (expected > 0)).any()


@pytest.mark.parametrize("multimask", [True, False], ids=["multimask", "single"])
@pytest.mark.parametrize("prompt", list(PREDICTOR_PROMPTS))
@pytest.mark.parametrize("shape", ["landscape", "portrait"])
@torch.no_grad()
def test_predict_matches_the_official_predictor(shape, prompt, multimask):
    _compare(*_small(), np.asarray(PHOTOS[shape]()), PREDICTOR_PROMPTS[prompt], multimask)


@torch.no_grad()
def test_sam2_1_hiera_tiny_matches_the_official_predictor():
    official, ours = _release("sam2.1_hiera_tiny")
    assert ours.config.name == "sam2.1_hiera_tiny"
    image = np.asarray(PHOTOS["small landscape"]())
    for prompt in PREDICTOR_PROMPTS.values():
        _compare(official, ours, image, prompt, multimask=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sam2.1_hiera_small", "sam2.1_hiera_base_plus", "sam2.1_hiera_large"])
@torch.no_grad()
def test_every_release_matches_the_official_predictor(name):
    official, ours = _release(name)
    assert ours.config.name == name
    _compare(official, ours, np.asarray(PHOTOS["square"]()), PREDICTOR_PROMPTS["box and clicks"], multimask=True)


@torch.no_grad()
def test_mask_input_and_batched_boxes_match():
    official, ours = _small()
    image = np.asarray(PHOTOS["landscape"]())
    predictor = SAM2ImagePredictor(official)
    predictor.set_image(image)
    embedding = ours.encode_image(image)
    # a refinement: the previous low-resolution logits (clamped, as returned) fed back with a click
    _, _, low_res = predictor.predict(**PREDICTOR_PROMPTS["click"], multimask_output=False)
    first = ours.predict(embedding, **_ours_kwargs(PREDICTOR_PROMPTS["click"]))
    assert max_diff(first.low_res_logits[0], torch.from_numpy(low_res)) <= TOLERANCE
    masks, iou, _ = predictor.predict(
        **PREDICTOR_PROMPTS["click"], mask_input=low_res, multimask_output=False, return_logits=True
    )
    refined = ours.predict(
        embedding, **_ours_kwargs(PREDICTOR_PROMPTS["click"]), mask_input=first.low_res_logits[0], return_logits=True
    )
    assert max_diff(refined.masks[0], torch.from_numpy(masks)) <= TOLERANCE
    assert max_diff(refined.iou_predictions[0], torch.from_numpy(iou)) <= TOLERANCE
    # a batch of boxes in one call (the official batched mode)
    boxes = np.array([[10.0, 20.0, 300.0, 400.0], [500.0, 100.0, 1700.0, 1100.0], [0.0, 0.0, 1799.0, 1199.0]])
    masks, iou, _ = predictor.predict(box=boxes, multimask_output=True, return_logits=True)
    batched = ours.predict(embedding, boxes=boxes, multimask_output=True, return_logits=True)
    assert batched.masks.shape == masks.shape == (3, 3, 1200, 1800)
    assert max_diff(batched.masks, torch.from_numpy(masks)) <= TOLERANCE
    assert max_diff(batched.iou_predictions, torch.from_numpy(iou)) <= TOLERANCE
    assert batched.object_score_logits is not None and batched.object_score_logits.shape == (3, 1)


@torch.no_grad()
def test_several_images_at_once_match_the_official_batch():
    official, ours = _small()
    images = [np.asarray(PHOTOS["landscape"]()), np.asarray(PHOTOS["portrait"]())]
    predictor = SAM2ImagePredictor(official)
    predictor.set_image_batch(images)
    boxes = [np.array([100.0, 50.0, 420.0, 300.0]), np.array([30.0, 60.0, 400.0, 700.0])]
    masks, ious, _ = predictor.predict_batch(box_batch=boxes, multimask_output=False, return_logits=True)
    embeddings = ours.encode_images(images)
    for embedding, box, expected, iou in zip(embeddings, boxes, masks, ious, strict=True):
        result = ours.predict(embedding, boxes=box, return_logits=True)
        assert max_diff(result.masks[0], torch.from_numpy(expected)) <= TOLERANCE
        assert max_diff(result.iou_predictions[0], torch.from_numpy(iou)) <= TOLERANCE


@torch.no_grad()
def test_hole_and_sprinkle_filling_match_the_official_predictor():
    official, ours = _small()
    image = np.asarray(PHOTOS["portrait"]())
    # areas that change some regions but not all (random weights give ragged masks)
    predictor = SAM2ImagePredictor(official, max_hole_area=40.0, max_sprinkle_area=40.0)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(**PREDICTOR_PROMPTS["box"], multimask_output=True, return_logits=True)
    plain = ours.predict(image, **_ours_kwargs(PREDICTOR_PROMPTS["box"]), multimask_output=True, return_logits=True)
    ours.max_hole_area, ours.max_sprinkle_area = 40.0, 40.0
    try:
        filled = ours.predict(
            image, **_ours_kwargs(PREDICTOR_PROMPTS["box"]), multimask_output=True, return_logits=True
        )
    finally:
        ours.max_hole_area, ours.max_sprinkle_area = 0.0, 0.0
    assert max_diff(filled.masks[0], torch.from_numpy(masks)) <= TOLERANCE
    assert not torch.equal(filled.masks > 0, plain.masks > 0)  # the filling changed something


def test_single_mask_output_falls_back_to_the_best_multimask_output_where_unstable():
    selection = fl.Chain(SAM2MultimaskSelection(SAM2DecoderConfig())).eval()  # a parent provides the `sam` context
    selection.set_context("sam", {"multimask_output": False})
    stable = torch.full((1, 1, 8, 8), -5.0)
    stable[..., 2:6, 2:6] = 5.0
    unstable = torch.full((1, 1, 8, 8), -5.0)
    unstable[..., 2:6, 2:6] = 0.01  # inside the +-delta band: stability 0
    others = torch.randn(1, 3, 8, 8)
    iou = torch.tensor([[0.1, 0.2, 0.9, 0.3]])
    scores = torch.zeros(1, 1)
    assert stability_scores(stable, 0.05).item() == 1.0 and stability_scores(unstable, 0.05).item() == 0.0
    masks, chosen, _ = selection(torch.cat([stable, others], 1), iou, scores)
    assert torch.equal(masks, stable) and chosen.item() == pytest.approx(0.1)
    masks, chosen, _ = selection(torch.cat([unstable, others], 1), iou, scores)
    assert torch.equal(masks, others[:, 1:2]) and chosen.item() == pytest.approx(0.9)
    selection.train()  # training keeps token 0 (as the official decoder does)
    masks, _, _ = selection(torch.cat([unstable, others], 1), iou, scores)
    assert torch.equal(masks, unstable)


@torch.no_grad()
def test_official_files_load_and_round_trip(tmp_path):
    official, ours = _release("sam2.1_hiera_tiny")
    state_dict = official.state_dict()
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": state_dict}, path)
    loaded = load_sam(path, fast=False)
    assert isinstance(loaded, SegmentAnything2) and loaded.config == ours.config
    saved = load_sam(save_sam(loaded, tmp_path / "converted.safetensors"))
    assert saved.config.name == "sam2.1_hiera_tiny"
    for key, value in ours.state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
    # SAM 2.0 files have no `no_obj_embed_spatial`: same image model, their own name
    older = {k: v for k, v in state_dict.items() if k != "no_obj_embed_spatial"}
    torch.save({"model": older}, tmp_path / "sam2_hiera_tiny.pt")
    assert load_sam(tmp_path / "sam2_hiera_tiny.pt").config.name == "sam2_hiera_tiny"
    assert all(is_memory_key(k) for k in state_dict if k.startswith(("memory_", "obj_ptr", "maskmem")))
    # a converted file keeps the video memory's tensors beside the image model, as they were
    report = convert_checkpoint(path, tmp_path / "out")
    assert report.dropped == [] and report.kept > 100
    kept = read_kept(report.written[0])
    memory = {k: v for k, v in state_dict.items() if is_memory_key(k)}
    assert kept.keys() == memory.keys() and all(torch.equal(kept[k], v) for k, v in memory.items())
    assert load_sam(report.written[0]).config == ours.config


def test_adapters_train_on_a_frozen_sam2_in_its_own_input_frame(tmp_path):
    _, ours = _small()
    base = save_sam(ours, tmp_path / "sam2.safetensors")
    train = write_dataset(tmp_path / "train", 2, seed=0, size=(96, 64))
    extra = "[lora]\nrank = 4\ntargets = ['decoder', 'encoder_attention']"
    config = load_config(
        write_config(tmp_path / "c.toml", base, train, tmp_path / "run", extra, epochs=1, batch_size=2)
    )
    trainer = Trainer(config, progress=False)
    # the samples are what SAM 2's inference sees: the image squashed to the square input
    sample = trainer.data.sample(0, epoch=0)
    pixels, _ = ours.preprocess(Image.open(sample.image_path).convert("RGB"))
    assert max_diff(sample.pixels, pixels[0]) <= 1e-6
    base_state = {k: v.clone() for k, v in load_sam(base).state_dict().items()}
    lora = trainer.adapters["lora"]
    before = {k: v.clone() for k, v in lora.state_dict().items()}
    trainer.run()
    assert any(not torch.equal(before[k], v) for k, v in lora.state_dict().items())
    lora.eject()
    state = trainer.model.state_dict()
    assert list(state) == list(base_state) and all(torch.equal(state[k], base_state[k]) for k in state)


def test_the_sam1_hq_adapter_refuses_a_sam2_model_with_a_reason():
    _, ours = _small()
    with pytest.raises(
        ValueError, match="HQ-SAM adapts SAM's mask decoder; this SegmentAnything2 has a SAM2MaskDecoder"
    ):
        HQSAMAdapter(ours)


@torch.no_grad()
def test_the_fast_paths_of_sam2_equal_its_reference():
    _, ours = _small()
    image = PHOTOS["portrait"]()
    reference = ours.predict(image, **_ours_kwargs(PREDICTOR_PROMPTS["box and clicks"]), return_logits=True)
    apply_fast_paths(ours)
    try:
        assert is_fast(ours.image_encoder.ensure_find(WindowedPositionEmbedding))
        for _ in range(2):  # the second call reads what the first remembered
            fast = ours.predict(image, **_ours_kwargs(PREDICTOR_PROMPTS["box and clicks"]), return_logits=True)
            assert max_diff(fast.masks, reference.masks) <= 1e-5
            assert max_diff(fast.iou_predictions, reference.iou_predictions) <= 1e-6
        # the remembered embedding follows its weights
        positions = ours.image_encoder.ensure_find(WindowedPositionEmbedding)
        grid = torch.zeros(1, 256, 256, positions.background.shape[0])
        before = positions(grid).clone()
        positions.window.add_(1.0)
        assert max_diff(positions(grid), before + 1.0) <= 1e-5
        positions.window.sub_(1.0)
    finally:
        remove_fast_paths(ours)
    assert not is_fast(ours.image_encoder.ensure_find(WindowedPositionEmbedding))


@pytest.mark.filterwarnings("ignore:this CPU has AMX:UserWarning")
@torch.no_grad()
def test_the_int8_encoder_runs_sam2():
    official, _ = _small()
    image = PHOTOS["portrait"]()
    models = []
    for _ in range(2):
        model = build_sam(SMALL_SAM2)
        model.load_state_dict(convert_state_dict(official.state_dict(), model, ignore=is_memory_key))
        models.append(model.eval())
    reference, quantized = models[0].encode_image(image), models[1].quantize_encoder().encode_image(image)
    for a, b in [
        (reference.embedding, quantized.embedding),
        *((reference.features[k], quantized.features[k]) for k in ("high_res_s0", "high_res_s1")),
    ]:
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0.99
