"""ONNX export of SAM 2.1: onnxruntime (CPU) runs encoder.onnx -> decoder.onnx through `OnnxPredictor` (no torch
there), compared with Meta's `SAM2ImagePredictor` on the same random weights; the predictor's numpy processing
compared with the torch model's.

Tolerances: ONNX_TOLERANCE (1e-3) max abs on logits at the original size, low-resolution logits, IoU and the
image embedding; RESIZE_TOLERANCE (1e-5) between the numpy antialiased resize and torch's.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from finesam.inputs import antialiased_resize, boxes_first_labelled_points, square_model_input
from finesam.model import SAMConfig
from finesam.model.prompts import Prompts
from finesam.model.sam import SegmentAnything, build_sam
from finesam.model.sam2.config import HieraConfig, SAM2DecoderConfig
from finesam.model.sam2.processing import square_input
from finesam.model.sam2.sam2 import sam2_labelled_points
from finesam.onnx import OnnxPredictor
from finesam.onnx import interface as io
from finesam.onnx.export import export
from finesam.weights import save_sam
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.sam_keys import convert_state_dict

from conftest import photo
from helpers import finesam
from official_sam2 import SAM2Base, SAM2ImagePredictor, build_official_sam2, small_hiera

ONNX_TOLERANCE = 1e-3
RESIZE_TOLERANCE = 1e-5

SMALL_SAM2 = SAMConfig(
    HieraConfig(embed_dim=32, heads=1, stages=(1, 1, 2, 1), global_attention_blocks=(3,)), SAM2DecoderConfig()
)


def cases(image: Image.Image) -> dict[str, dict[str, Any]]:
    """A click, a box, a box with clicks, several clicks: as the official predictor takes them."""
    w, h = image.size
    points = np.array([[0.5 * w, 0.5 * h], [0.2 * w, 0.7 * h], [0.7 * w, 0.3 * h]])
    labels = np.array([1, 0, 1])
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h])
    return {
        "click": {"point_coords": points[:1], "point_labels": labels[:1]},
        "box": {"box": box},
        "box+clicks": {"point_coords": points[:2], "point_labels": labels[:2], "box": box},
        "clicks": {"point_coords": points, "point_labels": labels},
    }


def ours(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"points": kwargs.get("point_coords"), "labels": kwargs.get("point_labels"), "boxes": kwargs.get("box")}


def assert_close(actual: np.ndarray, expected: np.ndarray | torch.Tensor, what: str) -> float:
    expected = expected.numpy() if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shapes {actual.shape} vs {expected.shape}"
    diff = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert diff <= ONNX_TOLERANCE, f"{what}: max abs {diff}"
    return diff


def assert_matches_official(
    predictor: OnnxPredictor, official: SAM2Base, image: Image.Image, names: tuple[str, ...] | None = None
) -> None:
    """onnxruntime against `SAM2ImagePredictor.predict(..., return_logits=True)`: logits at the original size,
    IoU, low-resolution logits; then a mask input (the official low-res logits) with a click."""
    reference = SAM2ImagePredictor(official)
    reference.set_image(np.asarray(image))
    features: dict[str, Any] = reference._features  # pyright: ignore[reportAssignmentType]
    embedding = predictor.encode_image(image)
    assert_close(embedding.outputs[io.IMAGE_EMBED], features["image_embed"], "embedding")
    for level, name in enumerate(io.feature_names(2)):
        assert_close(embedding.outputs[name], features["high_res_feats"][level], name)
    multimask = predictor.multimask_output
    chosen = cases(image) if names is None else {name: cases(image)[name] for name in names}
    low_res = None
    for name, kwargs in chosen.items():
        logits, iou, low_res = reference.predict(**kwargs, multimask_output=multimask, return_logits=True)
        actual = predictor.predict(embedding, **ours(kwargs), return_logits=True)
        assert_close(actual.masks[0], logits, f"{name}: logits")
        assert_close(actual.iou_predictions[0], iou, f"{name}: iou")
        assert_close(actual.low_res_logits[0], low_res, f"{name}: low-res logits")
        assert actual.object_score_logits is not None and actual.object_score_logits.shape == (1, 1)
    assert low_res is not None
    kwargs = {**cases(image)["click"], "mask_input": low_res[:1]}
    logits, iou, _ = reference.predict(**kwargs, multimask_output=multimask, return_logits=True)
    actual = predictor.predict(
        embedding, **ours(kwargs), mask_input=kwargs["mask_input"], return_logits=True
    )  # a mask input: the low-resolution logits of an earlier prediction
    assert_close(actual.masks[0], logits, "mask input: logits")
    assert_close(actual.iou_predictions[0], iou, "mask input: iou")


@pytest.fixture(scope="module")
def official_small() -> SAM2Base:
    return build_official_sam2("sam2.1_hiera_tiny", small_hiera())


@pytest.fixture(scope="module")
def small_sam2(official_small: SAM2Base) -> SegmentAnything:
    model = build_sam(SMALL_SAM2)
    model.load_state_dict(convert_state_dict(official_small.state_dict(), model, ignore=is_memory_key))
    return model.eval()


# -- the predictor's numpy processing against the torch model's


@pytest.mark.parametrize(
    ("shape", "size"),
    [((1200, 1800), (1024, 1024)), ((300, 451), (1024, 1024)), ((534, 800), (64, 1000)), ((7, 5), (3, 11))],
)
def test_antialiased_resize_matches_torch(shape: tuple[int, int], size: tuple[int, int]) -> None:
    """Down- and upscaling, and both at once (one axis each): torch's antialiased bilinear in float32."""
    pixels = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    expected = F.interpolate(torch.from_numpy(pixels)[None], size, mode="bilinear", align_corners=False, antialias=True)
    diff = np.abs(antialiased_resize(pixels, size) - expected[0].numpy()).max()
    assert diff <= RESIZE_TOLERANCE, diff


@pytest.mark.parametrize("name", ["coffee", "chelsea"])
def test_square_input_matches_torch(name: str) -> None:
    image = photo(name)
    pixels, input_size = square_model_input(image, 1024)
    assert input_size == (1024, 1024) and pixels.dtype == np.float32
    diff = np.abs(pixels - square_input(image, 1024).numpy()).max()
    assert diff <= RESIZE_TOLERANCE * 5, diff  # normalised: the resize's 1e-5 divided by std (>= 0.224)


def test_prompt_order_matches_torch() -> None:
    points, labels, box = np.array([[3.0, 4.0], [5.0, 6.0]]), np.array([1, 0]), np.array([1.0, 2.0, 7.0, 8.0])
    for kwargs in (
        {"points": points, "labels": labels},
        {"boxes": box},
        {"points": points, "labels": labels, "boxes": box},
        {},
    ):
        coords, kinds = boxes_first_labelled_points(kwargs.get("points"), kwargs.get("labels"), kwargs.get("boxes"))
        prompts = Prompts(
            points=torch.tensor(points)[None] if "points" in kwargs else None,
            labels=torch.tensor(labels)[None] if "points" in kwargs else None,
            boxes=torch.tensor(box)[None] if "boxes" in kwargs else None,
            mask_input=None if kwargs else torch.zeros(1, 1, 4, 4),
        )
        expected_coords, expected_kinds = sam2_labelled_points(prompts)
        np.testing.assert_array_equal(coords, expected_coords[0].numpy())
        np.testing.assert_array_equal(kinds, expected_kinds[0].numpy())


# -- exports against the official predictor


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_small_export_matches_official(
    small_sam2: SegmentAnything, official_small: SAM2Base, tmp_path: Path, runtime: str
) -> None:
    """Single-mask output (with the stability fallback), exported in Python; run by both runtimes (OpenVINO f32)."""
    description = export(small_sam2, tmp_path).description
    assert description["processing"] == {
        "preprocessing": "square",
        "prompt_order": "boxes_first_padded",
        "postprocessing": "resize",
    }
    assert list(description["encoder_outputs"]) == ["image_embed", "high_res_feats_0", "high_res_feats_1"]
    assert list(description["decoder_inputs"])[:3] == ["image_embed", "high_res_feats_0", "high_res_feats_1"]
    assert list(description["decoder_outputs"]) == [*io.DECODER_OUTPUTS, "object_score_logits"]
    predictor = OnnxPredictor(tmp_path, runtime=runtime)
    for side in ("encoder", "decoder"):
        session = getattr(predictor, side)
        assert session.input_names == list(description[f"{side}_inputs"])
        assert session.output_names == list(description[f"{side}_outputs"])
    assert_matches_official(predictor, official_small, photo("coffee"))
    # the object score against the torch model's
    expected = small_sam2.predict(photo("coffee"), **ours(cases(photo("coffee"))["click"]))
    actual = predictor.predict(photo("coffee"), **ours(cases(photo("coffee"))["click"]))
    assert expected.object_score_logits is not None and actual.object_score_logits is not None
    assert_close(actual.object_score_logits, expected.object_score_logits, "object score")


def test_small_export_from_safetensors_multimask(
    small_sam2: SegmentAnything, official_small: SAM2Base, tmp_path: Path
) -> None:
    """`finesam export --multimask` on a converted .safetensors: three masks."""
    weights = save_sam(small_sam2, tmp_path / "small.safetensors")
    result = finesam("export", "--weights", weights, "--out", tmp_path / "out", "--multimask")
    assert result.returncode == 0, result.stderr
    predictor = OnnxPredictor(tmp_path / "out")
    assert predictor.multimask_output is True
    assert_matches_official(predictor, official_small, photo("chelsea"))


def test_hiera_tiny_official_checkpoint(tmp_path: Path) -> None:
    """SAM 2.1 Hiera-T at full size, from an official-format .pt, through `finesam export`."""
    official = build_official_sam2("sam2.1_hiera_tiny")
    torch.save({"model": official.state_dict()}, tmp_path / "sam2.1_hiera_tiny.pt")
    result = finesam("export", "--weights", tmp_path / "sam2.1_hiera_tiny.pt", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    description = json.loads((tmp_path / "out" / io.DESCRIPTION_FILE).read_text())
    assert description["model"]["image_features"] == ["high_res_s0", "high_res_s1"]
    predictor = OnnxPredictor(tmp_path / "out")
    assert_matches_official(predictor, official, photo("rocket"), names=("box+clicks",))


def test_sam_processing_names_are_the_version_1_defaults() -> None:
    """A version 1 model.json (no "processing") is read with SAM's processing: the names SAM declares."""
    assert SegmentAnything.processing_names == io.SAM_PROCESSING
