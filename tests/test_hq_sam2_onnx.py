"""ONNX export of SAM 2.1 with HQ-SAM 2 injected: onnxruntime (CPU, `OnnxPredictor`, no torch there) against our
torch `SegmentAnything2` with the `HQSAM2Adapter` injected, which tests/test_hq_sam2.py proves equal to the
official sam-hq2 outputs. The model is that file's: SAM 2.1 tiny (full size) rebuilt under seed 0 with the
fixture's HQ tensors, as the official image predictor builds it (dynamic multimask on: the stability fallback).

Tolerance: ONNX_TOLERANCE (1e-3) max abs on logits at the original size, low-resolution logits, IoU, object
scores and the image embedding.
"""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from finesam.adapters.hq import HQSAM2Adapter, hq_mask_only_set_to
from finesam.model.sam2.sam2 import SegmentAnything2
from finesam.onnx import OnnxPredictor
from finesam.onnx import interface as io
from finesam.onnx.export import export
from finesam.onnx.predictor import OnnxEmbedding
from finesam.weights import save_hq, save_sam

from helpers import finesam
from test_hq_sam2 import embedding, models

ONNX_TOLERANCE = 1e-3
IMAGES = {"coffee": skimage_data.coffee, "astronaut": skimage_data.astronaut}
IMAGE = "coffee"  # 400 x 600: not square, so the resize to the original size is exercised
# (multimask_output, hq_mask_only) of each export in Python; the CLI test exports the fourth, (True, True)
CONFIGURATIONS = [(False, False), (True, False), (False, True)]


def model() -> tuple[SegmentAnything2, HQSAM2Adapter]:
    return models()[True]


def cases(image: np.ndarray) -> dict[str, dict[str, Any]]:
    """A box, clicks (foreground and background), a box with clicks, in pixels of the original image."""
    h, w = image.shape[:2]
    points = np.array([[0.5 * w, 0.5 * h], [0.2 * w, 0.7 * h], [0.7 * w, 0.3 * h]])
    labels = np.array([1, 0, 1])
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h])
    return {
        "box": {"boxes": box},
        "clicks": {"points": points, "labels": labels},
        "box+clicks": {"points": points[:2], "labels": labels[:2], "boxes": box},
    }


def assert_close(actual: np.ndarray, expected: torch.Tensor, what: str) -> float:
    assert actual.shape == tuple(expected.shape), f"{what}: shapes {actual.shape} vs {tuple(expected.shape)}"
    diff = float(np.abs(actual - expected.numpy()).max())
    assert diff <= ONNX_TOLERANCE, f"{what}: max abs {diff}"
    return diff


@torch.no_grad()
def torch_prediction(prompt: dict[str, Any], multimask: bool, hq_only: bool, image: str = IMAGE):
    sam, adapter = model()
    adapter.inject()
    try:
        with hq_mask_only_set_to(sam, hq_only):
            return sam.predict(embedding(image), **prompt, multimask_output=multimask, return_logits=True)
    finally:
        adapter.eject()


def assert_matches_torch(
    predictor: OnnxPredictor, onnx_embedding: OnnxEmbedding, hq_only: bool, image: str = IMAGE
) -> float:
    """Every case, then a mask input (the torch low-res logits of the box) with a click; the largest difference."""
    multimask = predictor.multimask_output
    masks = 1 if hq_only or not multimask else 3
    worst = 0.0
    prompts = cases(IMAGES[image]())
    expected = None
    for name, prompt in prompts.items():
        expected = torch_prediction(prompt, multimask, hq_only, image)
        actual = predictor.predict(onnx_embedding, **prompt, return_logits=True)
        assert actual.masks.shape[:2] == (1, masks)
        assert actual.object_score_logits is not None and expected.object_score_logits is not None
        worst = max(
            worst,
            assert_close(actual.masks, expected.masks, f"{name}: logits"),
            assert_close(actual.iou_predictions, expected.iou_predictions, f"{name}: iou"),
            assert_close(actual.low_res_logits, expected.low_res_logits, f"{name}: low-res logits"),
            assert_close(actual.object_score_logits, expected.object_score_logits, f"{name}: object score"),
        )
    assert expected is not None
    mask_input = expected.low_res_logits[:, :1].numpy()
    click = {"points": prompts["clicks"]["points"][:1], "labels": prompts["clicks"]["labels"][:1]}
    expected = torch_prediction({**click, "mask_input": mask_input}, multimask, hq_only, image)
    actual = predictor.predict(onnx_embedding, **click, mask_input=mask_input, return_logits=True)
    worst = max(
        worst,
        assert_close(actual.masks, expected.masks, "mask input: logits"),
        assert_close(actual.iou_predictions, expected.iou_predictions, "mask input: iou"),
    )
    return worst


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[tuple[bool, bool], Path]:
    """One export per configuration, in Python; the model is left as it was (not injected, SAM + HQ)."""
    sam, adapter = model()
    folders = {}
    for multimask, hq_only in CONFIGURATIONS:
        folder = tmp_path_factory.mktemp(f"hq2_multimask{int(multimask)}_hqonly{int(hq_only)}")
        adapter.inject()
        try:
            with hq_mask_only_set_to(sam, hq_only):
                export(sam, folder, multimask_output=multimask)
        finally:
            adapter.eject()
        folders[multimask, hq_only] = folder
    assert not adapter.injected and not adapter.hq_mask_only
    return folders


@pytest.fixture(scope="module")
def onnx_embedding(exports) -> OnnxEmbedding:
    """The image encoded once by onnxruntime (every export has the same encoder: SAM 2.1's, no HQ feature)."""
    return OnnxPredictor(exports[False, False]).encode_image(IMAGES[IMAGE]())


def test_the_encoder_is_sam2s(exports, onnx_embedding):
    """No HQ feature: the encoder and its outputs are SAM 2.1's; the image embedding and high-resolution features
    match torch's."""
    torch_embedding = embedding(IMAGE)
    description = OnnxPredictor(exports[False, False]).description
    assert list(description["encoder_outputs"]) == [io.IMAGE_EMBED, *io.feature_names(2)]
    assert io.HQ_FEATURES not in description["decoder_inputs"]
    assert list(description["decoder_outputs"]) == [*io.DECODER_OUTPUTS, "object_score_logits"]
    assert_close(onnx_embedding.outputs[io.IMAGE_EMBED], torch_embedding.embedding, "embedding")
    image_features = [torch_embedding.features[key] for key in description["model"]["image_features"]]
    for name, expected in zip(io.feature_names(2), image_features, strict=True):
        assert_close(onnx_embedding.outputs[name], expected, name)


@pytest.mark.parametrize(("multimask", "hq_only"), CONFIGURATIONS)
def test_export_matches_torch(exports, onnx_embedding, multimask, hq_only):
    folder = exports[multimask, hq_only]
    predictor = OnnxPredictor(folder)
    description = predictor.description
    assert description["model"]["hq"] == {"hq_mask_only": hq_only}
    assert description["multimask_output"] is multimask
    masks = 1 if hq_only or not multimask else 3  # HQ-SAM 2: each SAM mask plus the HQ mask, or the HQ mask alone
    assert description["decoder_outputs"][io.MASKS]["shape"] == [1, masks, "height", "width"]
    assert description["decoder_outputs"][io.IOU_PREDICTIONS]["shape"] == [1, masks]
    for side in ("encoder", "decoder"):
        session = getattr(predictor, side)
        assert session.input_names == list(description[f"{side}_inputs"])
        assert session.output_names == list(description[f"{side}_outputs"])
    assert_matches_torch(predictor, onnx_embedding, hq_only)


def test_cli_export_with_hq(tmp_path, onnx_embedding):
    """`finesam export --weights <SAM 2.1 base> --hq <HQ-SAM 2 .hq.safetensors> --hq-only --multimask`: the HQ mask
    alone, with the best of SAM's three IoUs."""
    sam, adapter = model()
    base = save_sam(sam, tmp_path / "sam2.1_tiny.safetensors")
    hq = save_hq(adapter, tmp_path / "sam2.1_tiny.hq.safetensors")
    out = tmp_path / "out"
    result = finesam("export", "--weights", base, "--hq", hq, "--hq-only", "--multimask", "--out", out)
    assert result.returncode == 0, result.stderr
    predictor = OnnxPredictor(out)
    description = predictor.description
    assert description["model"]["hq"] == {"hq_mask_only": True} and predictor.multimask_output is True
    assert description["decoder_outputs"][io.MASKS]["shape"] == [1, 1, "height", "width"]
    cli_embedding = predictor.encode_image(Image.fromarray(IMAGES[IMAGE]()))
    for name, output in onnx_embedding.outputs.items():
        assert np.array_equal(cli_embedding.outputs[name], output), name  # the same encoder as the Python export
    assert_matches_torch(predictor, cli_embedding, hq_only=True)
