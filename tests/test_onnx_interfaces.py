"""The export options for other tools' conventions: `encoder_input="pixels"` (the resized RGB pixels in, normalised
and padded inside the graph: what samexporter's runners feed) and `hq_decoder="official"` (the official HQ-SAM ONNX
decoder's `interm_embeddings` instead of finesam's `hq_features`).

Proven with the third-party runner `segment-anything-onnx` 0.0.5 (PyPI; samexporter's conventions), against
`OnnxPredictor` on the default export, and against the official HQ-SAM `SamOnnxModel` (segment_anything_hq's
utils/onnx.py, exported as its scripts/export_onnx_model.py does) on the same random weights.

Tolerance: ONNX_TOLERANCE (1e-3) max abs on logits, IoU, low-resolution logits and encoder outputs, and the same mask
wherever |logit| >= it (tests/test_onnx.py's). Real photos.
"""

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from finesam.model import SAMConfig, ViTConfig
from finesam.onnx import OnnxPredictor
from finesam.onnx import interface as io
from finesam.onnx.export import export
from test_onnx import assert_close, assert_same_logits, official_decoder_feeds

from conftest import PHOTOS, SMALL, photo
from helpers import finesam, with_adapter
from official import build_official

# the runner is written for 1024-pixel models (its target size and 684 x 1024 frame are fixed): a ViT that small
# at SAM's full input size
RUNNER_CONFIG = SAMConfig(
    encoder=ViTConfig(dim=64, depth=2, heads=2, global_attention_blocks=(1,), window_size=14), image_size=1024
)
RUNNER_FRAME = (684, 1024)  # (height, width): segment_anything_onnx's SegmentAnythingONNX.input_size


@pytest.fixture(scope="module")
def official_hq_small():
    return build_official(SMALL, seed=0, hq=True)


@pytest.fixture(scope="module")
def official_runner_hq():
    return build_official(RUNNER_CONFIG, seed=4, hq=True)


@pytest.fixture(scope="module")
def runner_exports(official_runner_hq, tmp_path_factory):
    """The SAM and HQ-SAM exports of one model: default, and with both options."""
    model, adapter = with_adapter(official_runner_hq)
    folders = {}
    for name, options in (
        ("sam", {}),
        ("sam pixels", {"encoder_input": "pixels"}),
    ):
        folders[name] = tmp_path_factory.mktemp(name.replace(" ", "_"))
        export(model, folders[name], **options)
    adapter.inject()
    for name, options in (
        ("hq", {}),
        ("hq official", {"encoder_input": "pixels", "hq_decoder": "official"}),
    ):
        folders[name] = tmp_path_factory.mktemp(name.replace(" ", "_"))
        export(model, folders[name], **options)
    adapter.eject()
    return folders


def runner_photo() -> Image.Image:
    """A real photo at the runner's frame size, so that its own resize (an affine warp) is the identity and its
    prompts and masks are in the photo's pixels."""
    height, width = RUNNER_FRAME
    return photo("coffee").resize((width, height), Image.Resampling.BILINEAR)


PROMPTS = {
    "click": [{"type": "point", "data": [500, 300], "label": 1}],
    "clicks": [{"type": "point", "data": [500, 300], "label": 1}, {"type": "point", "data": [200, 500], "label": 0}],
    "box": [{"type": "rectangle", "data": [150, 100, 800, 600]}],
    "box and click": [
        {"type": "rectangle", "data": [150, 100, 800, 600]},
        {"type": "point", "data": [400, 350], "label": 1},
    ],
}


def as_predictor_prompt(prompt: list[dict]) -> dict[str, np.ndarray | None]:
    points = [mark["data"] for mark in prompt if mark["type"] == "point"]
    labels = [mark["label"] for mark in prompt if mark["type"] == "point"]
    boxes = [mark["data"] for mark in prompt if mark["type"] == "rectangle"]
    return {
        "points": np.array(points, dtype=np.float64) if points else None,
        "labels": np.array(labels) if labels else None,
        "boxes": np.array(boxes[0], dtype=np.float64) if boxes else None,
    }


def runner_inputs(prompt: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """The points and labels the runner feeds for `prompt` (in the order given, a box as its two corners), with the
    padding point (0, 0, -1) it always appends: also after a box, where the official predictor appends none."""
    points, labels = [], []
    for mark in prompt:
        if mark["type"] == "point":
            points.append(mark["data"])
            labels.append(mark["label"])
        else:
            points += [mark["data"][:2], mark["data"][2:]]
            labels += [2, 3]
    return np.array([*points, [0, 0]], np.float32), np.array([*labels, -1], np.float32)


def decoded(predictor: OnnxPredictor, embedding, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The logits of `predictor`'s decoder for exactly these points (pixels of the 1024 frame)."""
    low = predictor.mask_input_size
    feeds = {
        **embedding.outputs,
        io.POINT_COORDS: coords[None],
        io.POINT_LABELS: labels[None],
        io.MASK_INPUT: np.zeros((1, 1, low, low), np.float32),
        io.HAS_MASK_INPUT: np.zeros(1, np.float32),
        io.ORIG_IM_SIZE: np.array(embedding.original_size, np.float32),
    }
    return predictor.decoder.run(feeds)[0]


def test_the_third_party_runner_segments_with_the_pixels_encoder(runner_exports):
    """segment-anything-onnx feeds the raw pixels (H x W x 3) and finesam's SAM decoder: its embedding equals
    OnnxPredictor's on the default export, and its logits equal those of the default export's decoder for the same
    points; for clicks (where the runner's padding is the official predictor's) they equal `predict`'s too. With a
    box the runner still appends a padding point, which the official predictor does not: its box masks differ
    from `predict`'s (by up to 0.06 in logits here), a convention of that runner, whichever files it runs."""
    from segment_anything_onnx.sam_onnx import SegmentAnythingONNX

    folder = runner_exports["sam pixels"]
    runner = SegmentAnythingONNX(str(folder / io.ENCODER_FILE), str(folder / io.DECODER_FILE))
    image = runner_photo()
    embedding = runner.encode(np.asarray(image))
    reference = OnnxPredictor(runner_exports["sam"])
    expected_embedding = reference.encode_image(image)
    assert_close(embedding["image_embedding"], expected_embedding.outputs[io.IMAGE_EMBEDDINGS], "embedding")
    for name, prompt in PROMPTS.items():
        logits = runner.predict_masks(embedding, prompt)
        assert_same_logits(logits, decoded(reference, expected_embedding, *runner_inputs(prompt)), name)
        if name.startswith("click"):
            expected = reference.predict(expected_embedding, **as_predictor_prompt(prompt), return_logits=True)
            assert_same_logits(logits, expected.masks, f"{name}: predict")


def test_the_pixels_encoder_equals_the_tensor_encoder_on_any_image_size(runner_exports, small, tmp_path):
    """OnnxPredictor resizes (as the official predictor) and feeds the pixels: the same embedding and masks as the
    default export, on photos of several shapes, small and full size."""
    export(small, tmp_path / "pixels", encoder_input="pixels")
    export(small, tmp_path / "tensor")
    description = OnnxPredictor(tmp_path / "pixels").description
    assert description["encoder_inputs"] == {
        io.INPUT_IMAGE: {"shape": ["image_height", "image_width", 3], "dtype": "float32"}
    }
    assert description["interface"] == {"encoder_input": "pixels", "hq_decoder": None}
    for folders, names in (
        ((tmp_path / "pixels", tmp_path / "tensor"), ("landscape", "portrait", "square")),
        ((runner_exports["sam pixels"], runner_exports["sam"]), ("chelsea",)),
    ):
        for runtime in ("onnxruntime", "openvino"):
            pixels, tensor = (OnnxPredictor(folder, runtime=runtime) for folder in folders)
            for name in names:
                image = PHOTOS[name]() if name in PHOTOS else photo(name)
                a, b = pixels.encode_image(image), tensor.encode_image(image)
                assert_close(a.outputs[io.IMAGE_EMBEDDINGS], b.outputs[io.IMAGE_EMBEDDINGS], f"{name} embedding")
                box = [0.1 * image.width, 0.2 * image.height, 0.7 * image.width, 0.9 * image.height]
                actual = pixels.predict(a, boxes=box, return_logits=True)
                expected = tensor.predict(b, boxes=box, return_logits=True)
                assert_same_logits(actual.masks, expected.masks, f"{name} masks")


def test_the_official_hq_interface_runs_through_the_runner_and_equals_the_hq_export(runner_exports):
    """The HQ-SAM export with both options: OnnxPredictor gives the default HQ export's outputs; the runner's own
    encoder and prompt conventions run it once the encoder's second output, `interm_embeddings`, is passed on (the
    runner keeps the first output only and feeds the six SAM inputs by name: it runs no HQ-SAM decoder, official or
    finesam's, without that one line)."""
    from segment_anything_onnx.sam_onnx import SegmentAnythingONNX

    folder = runner_exports["hq official"]
    description = OnnxPredictor(folder).description
    assert list(description["encoder_outputs"]) == [io.IMAGE_EMBEDDINGS, io.INTERM_EMBEDDINGS]
    assert list(description["decoder_inputs"]) == [io.IMAGE_EMBEDDINGS, io.INTERM_EMBEDDINGS, *io.DECODER_PROMPT_INPUTS]
    assert description["encoder_outputs"][io.INTERM_EMBEDDINGS]["shape"] == [1, 1, 64, 64, 64]  # one global block
    image = runner_photo()
    ours, default = OnnxPredictor(folder), OnnxPredictor(runner_exports["hq"])
    a, b = ours.encode_image(image), default.encode_image(image)
    for name, prompt in PROMPTS.items():
        kwargs = as_predictor_prompt(prompt)
        actual, expected = (p.predict(e, **kwargs, return_logits=True) for p, e in ((ours, a), (default, b)))
        assert_same_logits(actual.masks, expected.masks, name)
        assert_close(actual.iou_predictions, expected.iou_predictions, f"{name} iou")
        assert_close(actual.low_res_logits, expected.low_res_logits, f"{name} low-res logits")

    runner = SegmentAnythingONNX(str(folder / io.ENCODER_FILE), str(folder / io.DECODER_FILE))
    interm = runner.encoder_session.run([io.INTERM_EMBEDDINGS], {io.INPUT_IMAGE: np.asarray(image, np.float32)})[0]
    run = runner.decoder_session.run
    runner.decoder_session.run = lambda names, feeds: run(names, {**feeds, io.INTERM_EMBEDDINGS: interm})  # type: ignore[method-assign]
    embedding = runner.encode(np.asarray(image))
    for name, prompt in PROMPTS.items():
        logits = runner.predict_masks(embedding, prompt)
        assert_same_logits(logits, decoded(default, b, *runner_inputs(prompt)), f"runner {name}")


def official_hq_decoder(official, path, hq_only: bool, multimask: bool, interm_shape: list[int]) -> None:
    """The official HQ-SAM ONNX decoder, exported as the official scripts/export_onnx_model.py does (its inputs,
    dummy shapes, output names, dynamic point axes, opset 17)."""
    from segment_anything_hq.utils.onnx import SamOnnxModel

    onnx_model = SamOnnxModel(official, hq_token_only=hq_only, multimask_output=multimask)
    grid, low = SMALL.embedding_size, SMALL.mask_input_size
    dummy = {
        io.IMAGE_EMBEDDINGS: torch.randn(1, SMALL.decoder.prompt_dim, grid, grid),
        io.INTERM_EMBEDDINGS: torch.randn(*interm_shape),
        io.POINT_COORDS: torch.randint(0, SMALL.image_size, (1, 5, 2), dtype=torch.float),
        io.POINT_LABELS: torch.randint(0, 4, (1, 5), dtype=torch.float),
        io.MASK_INPUT: torch.randn(1, 1, low, low),
        io.HAS_MASK_INPUT: torch.tensor([1.0]),
        io.ORIG_IM_SIZE: torch.tensor([1500.0, 2250.0]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            onnx_model,
            tuple(dummy.values()),
            str(path),
            opset_version=17,
            input_names=list(dummy),
            output_names=list(io.DECODER_OUTPUTS),
            dynamic_axes={io.POINT_COORDS: {1: "num_points"}, io.POINT_LABELS: {1: "num_points"}},
            dynamo=False,
        )


@pytest.mark.parametrize(("hq_only", "multimask"), [(False, False), (True, False), (False, True)])
def test_the_official_hq_interface_equals_the_official_hq_onnx_decoder(official_hq_small, tmp_path, hq_only, multimask):
    """Our encoder's `interm_embeddings` equal the official HQ-SAM encoder's (stacked, (K, 1, E, E, C)); fed the same
    inputs, our decoder and the official HQ-SAM ONNX decoder give the same three outputs."""
    model, adapter = with_adapter(official_hq_small, hq_mask_only=hq_only)
    adapter.inject()
    description = export(model, tmp_path / "ours", multimask_output=multimask, hq_decoder="official").description
    interm_shape = description["encoder_outputs"][io.INTERM_EMBEDDINGS]["shape"]
    assert interm_shape == [len(SMALL.encoder.global_attention_blocks), 1, 16, 16, SMALL.encoder.dim]
    official_hq_decoder(official_hq_small, tmp_path / "official.onnx", hq_only, multimask, interm_shape)
    official = ort.InferenceSession(str(tmp_path / "official.onnx"))
    assert [i.name for i in official.get_inputs()] == list(description["decoder_inputs"])
    predictor = OnnxPredictor(tmp_path / "ours")
    image = PHOTOS["portrait"]()
    embedding = predictor.encode_image(image)
    pixels, _ = predictor._preprocess(image, SMALL.image_size, SMALL.image_size)
    with torch.no_grad():
        _, interm = official_hq_small.image_encoder(torch.from_numpy(pixels))
    assert_close(embedding.outputs[io.INTERM_EMBEDDINGS], torch.stack(interm), "interm_embeddings")
    for labels, feeds in official_decoder_feeds(embedding.outputs, image):
        expected = official.run(None, feeds)
        actual = predictor.decoder.run(feeds)
        for a, e, name in zip(actual, expected, io.DECODER_OUTPUTS, strict=True):
            assert_close(a, e, f"{name} with labels {labels}")


def test_export_command_options_and_refusals(tmp_path, small):
    """`finesam export --encoder-input pixels --hq-decoder official` writes what model.json says; the options are
    refused where the model has no such interface."""
    from finesam.weights import save_sam

    weights = save_sam(small, tmp_path / "small.safetensors")
    result = finesam("export", "--weights", weights, "--out", tmp_path / "out", "--encoder-input", "pixels")
    assert result.returncode == 0, result.stderr
    session = ort.InferenceSession(str(tmp_path / "out" / io.ENCODER_FILE))
    assert [i.name for i in session.get_inputs()] == [io.INPUT_IMAGE]
    result = finesam("export", "--weights", weights, "--out", tmp_path / "hq", "--hq-decoder", "official")
    assert result.returncode == 2 and "--hq-decoder official is HQ-SAM's interface" in result.stderr
