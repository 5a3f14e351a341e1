"""ONNX export: onnxruntime (CPU) runs encoder.onnx -> decoder.onnx, compared with finesam's torch model and with
the official predictors on the same random weights, and with the official package's own ONNX decoder. The parity
tests run through both runtimes of `OnnxPredictor` (the `runtime` fixture: onnxruntime, and OpenVINO in f32).

Tolerance: ONNX_TOLERANCE (1e-3) max abs on logits, IoU and embeddings (reached: about 2e-5 on small
configurations, 1e-5 at full size); masks identical wherever |logit| >= ONNX_TOLERANCE. Quantised models:
mask IoU against fp32 >= QUANTIZED_MASK_IOU on average, predicted IoU within QUANTIZED_IOU_DEVIATION.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from finesam.adapters.lora import TARGETS, SAMLoraAdapter
from finesam.cli import main
from finesam.model import SAMConfig, SegmentAnything, ViTConfig
from finesam.onnx import OnnxPredictor
from finesam.onnx import export as export_module
from finesam.onnx import interface as io
from finesam.onnx.export import export
from finesam.weights import load_sam, save_hq, save_lora, save_sam

from conftest import PHOTOS, SMALL, photo
from helpers import FINESAM_COMMAND, finesam, prompts_for, with_adapter
from official import HQSamPredictor, SamPredictor, build_official, build_official_tiny, random_official

ONNX_TOLERANCE = 1e-3
QUANTIZED_MASK_IOU, QUANTIZED_IOU_DEVIATION = 0.9, 0.02


# point sets of the official SAM ONNX decoder's interface (1 / 0 clicks, 2 / 3 box corners, -1 padding), each
# with or without a mask input
DECODER_PROMPTS = [([1.0, -1.0], 0.0), ([1.0, 0.0, 1.0, -1.0], 1.0), ([0.0, 2.0, 3.0], 0.0), ([2.0, 3.0], 1.0)]


def official_decoder_feeds(
    image_side: dict[str, np.ndarray], image: Image.Image, seed: int = 0
) -> Iterator[tuple[list[float], dict[str, np.ndarray]]]:
    """The decoder feeds of `DECODER_PROMPTS` for `image` (SMALL's sizes) and its encoder outputs `image_side`:
    random points inside the resized image, a random mask input, the image's size."""
    rng = np.random.default_rng(seed)
    scale = SMALL.image_size / max(image.size)
    low = SMALL.mask_input_size
    for labels, has_mask in DECODER_PROMPTS:
        coords = rng.uniform(0, 1, (1, len(labels), 2)) * [image.width * scale, image.height * scale]
        yield (
            labels,
            {
                **image_side,
                io.POINT_COORDS: coords.astype(np.float32),
                io.POINT_LABELS: np.array([labels], dtype=np.float32),
                io.MASK_INPUT: rng.normal(0, 3, (1, 1, low, low)).astype(np.float32),
                io.HAS_MASK_INPUT: np.array([has_mask], dtype=np.float32),
                io.ORIG_IM_SIZE: np.array([image.height, image.width], dtype=np.float32),
            },
        )


def assert_close(actual: np.ndarray, expected: np.ndarray | torch.Tensor, what: str) -> float:
    expected = expected.numpy() if isinstance(expected, torch.Tensor) else expected
    assert actual.shape == expected.shape, f"{what}: shapes {actual.shape} vs {expected.shape}"
    diff = float(np.abs(actual - expected).max()) if actual.size else 0.0
    assert diff <= ONNX_TOLERANCE, f"{what}: max abs {diff}"
    return diff


def assert_same_logits(actual: np.ndarray, expected: np.ndarray | torch.Tensor, what: str) -> None:
    """Logits within the tolerance, and the same mask wherever the logit is not within it of the threshold."""
    expected = expected.numpy() if isinstance(expected, torch.Tensor) else expected
    assert_close(actual, expected, what)
    decided = np.abs(expected) >= ONNX_TOLERANCE
    assert ((actual > 0) == (expected > 0))[decided].all(), f"{what}: masks differ"


def many_points(image: Image.Image, count: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, (count, 2)) * [image.width, image.height]
    return {"point_coords": points, "point_labels": rng.integers(0, 2, count)}


def official_cases(image: Image.Image) -> dict[str, dict[str, np.ndarray]]:
    """Every prompt kind (points, box, points + box) and 1 to 16 points, as the official predictor takes them."""
    cases = prompts_for(image)
    cases |= {f"{n} points": many_points(image, n, seed=n) for n in (3, 8, 16)}
    return cases


def as_ours(kwargs: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    return {"points": kwargs.get("point_coords"), "labels": kwargs.get("point_labels"), "boxes": kwargs.get("box")}


def assert_matches_torch(predictor: OnnxPredictor, model: SegmentAnything, image: Image.Image, multimask: bool):
    """Embedding, every prompt kind, a mask input and 1-16 points: onnxruntime against the torch model."""
    embedding = model.encode_image(image)
    onnx_embedding = predictor.encode_image(image)
    assert_close(onnx_embedding.outputs[io.IMAGE_EMBEDDINGS], embedding.embedding, "embedding")
    cases = [as_ours(kwargs) for kwargs in official_cases(image).values()]
    for kwargs in cases:
        expected = model.predict(embedding, **kwargs, multimask_output=multimask, return_logits=True)
        actual = predictor.predict(onnx_embedding, **kwargs, return_logits=True)
        assert_same_logits(actual.masks, expected.masks, f"masks {kwargs}")
        assert_close(actual.iou_predictions, expected.iou_predictions, "iou")
        assert_close(actual.low_res_logits, expected.low_res_logits, "low-res logits")
    # a mask input (an earlier prediction's logits) with a point, and alone
    refine = model.predict(embedding, **cases[0], return_logits=True).low_res_logits[0, :1].numpy()
    for kwargs in ({**cases[0], "mask_input": refine}, {"mask_input": refine}):
        expected = model.predict(embedding, **kwargs, multimask_output=multimask, return_logits=True)
        actual = predictor.predict(onnx_embedding, **kwargs, return_logits=True)
        assert_same_logits(actual.masks, expected.masks, "masks with a mask input")
        assert_close(actual.iou_predictions, expected.iou_predictions, "iou with a mask input")


def assert_matches_official(
    predictor: OnnxPredictor, official_predictor, image: Image.Image, image_is_set: bool = False, **options
) -> None:
    """Every prompt kind and 1-16 points: onnxruntime against an official predictor (same weights), which is
    given `image` unless `image_is_set`."""
    if not image_is_set:
        official_predictor.set_image(np.asarray(image))
    onnx_embedding = predictor.encode_image(image)
    assert_close(onnx_embedding.outputs[io.IMAGE_EMBEDDINGS], official_predictor.features, "embedding")
    multimask = predictor.multimask_output
    for kwargs in official_cases(image).values():
        logits, iou, low_res = official_predictor.predict(
            **kwargs, multimask_output=multimask, return_logits=True, **options
        )
        actual = predictor.predict(onnx_embedding, **as_ours(kwargs), return_logits=True)
        assert_same_logits(actual.masks[0], logits, f"masks {sorted(kwargs)}")
        assert_close(actual.iou_predictions[0], iou, "iou")
        assert_close(actual.low_res_logits[0], low_res, "low-res logits")


@pytest.fixture(params=["onnxruntime", "openvino"])
def runtime(request) -> str:
    """The runtime of `OnnxPredictor` in the parity tests: each runs through both, OpenVINO at f32."""
    return request.param


@pytest.fixture(scope="module")
def official_hq_small():
    return build_official(SMALL, seed=0, hq=True)


# -- small configurations: SAM and HQ-SAM, single and multimask, against the torch model and the official package


@pytest.mark.parametrize("multimask", [False, True])
def test_sam_export_matches_torch_and_official(small, official_small, tmp_path, multimask, runtime):
    export(small, tmp_path, multimask_output=multimask)
    predictor = OnnxPredictor(tmp_path, runtime=runtime)
    assert predictor.multimask_output is multimask
    assert_matches_torch(predictor, small, PHOTOS["landscape"](), multimask)
    assert_matches_official(predictor, SamPredictor(official_small), PHOTOS["portrait"]())


@pytest.mark.parametrize(("hq_only", "multimask"), [(False, False), (True, False), (False, True)])
def test_hq_export_matches_torch_and_official(official_hq_small, tmp_path, hq_only, multimask, runtime):
    model, adapter = with_adapter(official_hq_small, hq_mask_only=hq_only)
    adapter.inject()
    description = export(model, tmp_path, multimask_output=multimask).description
    assert description["model"]["hq"] == {"hq_mask_only": hq_only}
    assert list(description["encoder_outputs"]) == [io.IMAGE_EMBEDDINGS, io.HQ_FEATURES]
    assert io.HQ_FEATURES in description["decoder_inputs"]
    predictor = OnnxPredictor(tmp_path, runtime=runtime)
    assert_matches_torch(predictor, model, PHOTOS["small landscape"](), multimask)
    official = HQSamPredictor(official_hq_small)
    assert_matches_official(predictor, official, PHOTOS["square"](), hq_token_only=hq_only)


def test_merged_lora_export_matches_the_injected_model_which_is_left_exactly_as_it_was(official_hq_small, tmp_path):
    model, adapter = with_adapter(official_hq_small, fast=True)  # exported as the reference, left fast
    adapter.inject()
    loras = [
        SAMLoraAdapter(model, "decoder", rank=4, scale=0.7),
        SAMLoraAdapter(model, "encoder", rank=2, scale=1.3, include=TARGETS["encoder_attention"]),
        SAMLoraAdapter(model, "both", rank=3, include=TARGETS["decoder_all"]),  # shares layers with the first
    ]
    generator = torch.Generator().manual_seed(3)
    for lora in loras:
        for layer in lora.loras:
            torch.nn.init.normal_(layer.up.weight, std=0.05, generator=generator)
        lora.inject()
    image = PHOTOS["landscape"]()
    box = np.array([200.0, 150.0, 1500.0, 1000.0])
    model.train()  # a model being fine-tuned, say: the export must not switch any module's mode
    model.mask_decoder.eval()
    modes = [m.training for m in model.modules()]
    before = (repr(model), {k: v.clone() for k, v in model.state_dict().items()})
    expected = model.predict(image, boxes=box, return_logits=True)
    description = export(model, tmp_path).description
    assert description["model"]["loras"] == [
        {"name": "both", "scale": 1.0},
        {"name": "decoder", "scale": 0.7},
        {"name": "encoder", "scale": 1.3},
    ]
    # nothing of the model changed: structure, weights, train / eval modes, outputs (bit for bit)
    assert repr(model) == before[0] and [m.training for m in model.modules()] == modes
    state = model.state_dict()
    assert state.keys() == before[1].keys() and all(torch.equal(state[k], before[1][k]) for k in state)
    again = model.predict(image, boxes=box, return_logits=True)
    assert torch.equal(again.masks, expected.masks)
    # the LoRAs are folded into the weights: no LoRA matrix products in the graphs
    for name in (io.ENCODER_FILE, io.DECODER_FILE):
        graph = onnx.load(str(tmp_path / name), load_external_data=False).graph
        assert not any("lora" in node.name.lower() for node in graph.node)
    actual = OnnxPredictor(tmp_path).predict(image, boxes=box, return_logits=True)
    assert_same_logits(actual.masks, expected.masks, "merged LoRA masks")
    # and they mattered: without them the output differs
    for lora in loras:
        lora.eject()
    without = model.predict(image, boxes=box, return_logits=True)
    assert float((without.masks - expected.masks).abs().max()) > 100 * ONNX_TOLERANCE


def test_decoder_matches_the_official_onnx_decoder(small, official_small, tmp_path):
    """The official `SamOnnxModel` (return_single_mask=False: all four mask tokens) exported from the same weights:
    ours gives its token 0 as the single mask, and its tokens 1-3 with --multimask."""
    from segment_anything.utils.onnx import SamOnnxModel

    official_file = tmp_path / "official.onnx"
    official_model = SamOnnxModel(official_small, return_single_mask=False)
    image = PHOTOS["portrait"]()
    predictor_inputs: dict[str, np.ndarray] = {}
    ours = {}
    for multimask in (False, True):
        export(small, tmp_path / str(multimask), multimask_output=multimask)
        ours[multimask] = ort.InferenceSession(str(tmp_path / str(multimask) / io.DECODER_FILE))
    predictor_inputs[io.IMAGE_EMBEDDINGS] = (
        OnnxPredictor(tmp_path / "False").encode_image(image).outputs[io.IMAGE_EMBEDDINGS]
    )
    low = SMALL.mask_input_size
    example = {
        io.IMAGE_EMBEDDINGS: torch.from_numpy(predictor_inputs[io.IMAGE_EMBEDDINGS]),
        io.POINT_COORDS: torch.rand(1, 3, 2) * SMALL.image_size,
        io.POINT_LABELS: torch.tensor([[1.0, 0.0, -1.0]]),
        io.MASK_INPUT: torch.zeros(1, 1, low, low),
        io.HAS_MASK_INPUT: torch.zeros(1),
        io.ORIG_IM_SIZE: torch.tensor([float(image.height), float(image.width)]),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            official_model,
            tuple(example.values()),
            str(official_file),
            input_names=list(example),
            output_names=list(io.DECODER_OUTPUTS),
            dynamic_axes={io.POINT_COORDS: {1: "num_points"}, io.POINT_LABELS: {1: "num_points"}},
            opset_version=17,
            dynamo=False,
        )
    official = ort.InferenceSession(str(official_file))
    for labels, feeds in official_decoder_feeds(predictor_inputs, image):
        expected = official.run(None, feeds)
        for multimask, tokens in ((False, slice(0, 1)), (True, slice(1, None))):
            actual = ours[multimask].run(None, feeds)
            for a, e, name in zip(actual, expected, io.DECODER_OUTPUTS, strict=True):
                assert_close(a, e[:, tokens], f"{name} with labels {labels}, multimask {multimask}")


def test_quantized_models_stay_close_to_float32(small, tmp_path):
    report = export(small, tmp_path, quantize=True)
    assert set(report.files) >= set(io.QUANTIZED_FILES.values())
    for name in io.QUANTIZED_FILES.values():
        graph = onnx.load(str(tmp_path / name)).graph
        assert any("Integer" in node.op_type or "Quant" in node.op_type for node in graph.node), name
    fp32, int8 = OnnxPredictor(tmp_path), OnnxPredictor(tmp_path, quantized=True)
    ious, deviations = [], []
    for name in ("landscape", "portrait"):
        image = PHOTOS[name]()
        w, h = image.size
        boxes = np.array([[0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h], [0.3 * w, 0.1 * h, 0.6 * w, 0.5 * h]])
        expected, actual = fp32.predict(image, boxes=boxes), int8.predict(image, boxes=boxes)
        union = (expected.masks | actual.masks).sum(axis=(1, 2, 3))
        ious += list((expected.masks & actual.masks).sum(axis=(1, 2, 3)) / np.maximum(union, 1))
        deviations += list(np.abs(expected.iou_predictions - actual.iou_predictions).ravel())
    assert np.mean(ious) >= QUANTIZED_MASK_IOU, ious
    assert max(deviations) <= QUANTIZED_IOU_DEVIATION, deviations
    # an export without quantize into the same folder leaves no stale quantised pair behind
    export(small, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([io.ENCODER_FILE, io.DECODER_FILE, io.DESCRIPTION_FILE])


def test_weights_over_the_inline_limit_go_to_one_external_data_file(small, tmp_path, monkeypatch, runtime):
    monkeypatch.setattr(export_module, "INLINE_LIMIT", 2**20)  # ViT-H's encoder is over protobuf's 2 GB
    report = export(small, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [io.ENCODER_FILE, io.ENCODER_FILE + ".data", io.DECODER_FILE, io.DECODER_FILE + ".data", io.DESCRIPTION_FILE]
    )
    assert (tmp_path / io.ENCODER_FILE).stat().st_size < 2**20 < (tmp_path / (io.ENCODER_FILE + ".data")).stat().st_size
    assert set(report.files) == {p.name for p in tmp_path.iterdir()}
    image = PHOTOS["portrait"]()
    expected = small.predict(image, boxes=[50, 60, 400, 700], return_logits=True)
    actual = OnnxPredictor(tmp_path, runtime=runtime).predict(image, boxes=[50, 60, 400, 700], return_logits=True)
    assert_same_logits(actual.masks, expected.masks, "masks of the external-data export")


def test_predictor_runs_without_torch(small, tmp_path):
    """The exported pair runs where torch cannot be imported at all: onnxruntime, numpy and PIL only."""
    export(small, tmp_path / "export")
    image = PHOTOS["small landscape"]()
    image.save(tmp_path / "photo.png")
    expected = small.predict(image, points=[[300, 200], [600, 400]], labels=[1, 0], return_logits=True)
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now fails
import numpy as np
from PIL import Image
from finesam.onnx import OnnxPredictor
predictor = OnnxPredictor({str(tmp_path / "export")!r})
prediction = predictor.predict(Image.open({str(tmp_path / "photo.png")!r}), points=[[300, 200], [600, 400]],
                               labels=[1, 0], return_logits=True)
np.save({str(tmp_path / "masks.npy")!r}, prediction.masks)
assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules if sys.modules[name])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_same_logits(np.load(tmp_path / "masks.npy"), expected.masks, "masks without torch")


def test_predictor_checks_prompts_and_its_export(small, tmp_path):
    export(small, tmp_path)
    predictor = OnnxPredictor(tmp_path)
    image = PHOTOS["portrait"]()
    with pytest.raises(ValueError, match="outside the 534x800 image"):
        predictor.predict(image, points=[[600, 10]])
    with pytest.raises(ValueError, match="labels must be 1"):
        predictor.predict(image, points=[[10, 10]], labels=[2])
    with pytest.raises(ValueError, match="multimask_output=False; export again with --multimask"):
        predictor.predict(image, boxes=[1, 2, 30, 40], multimask_output=True)
    with pytest.raises(ValueError, match="no quantised models"):
        OnnxPredictor(tmp_path, quantized=True)
    (tmp_path / io.DESCRIPTION_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a finesam ONNX export"):
        OnnxPredictor(tmp_path)


# -- full size in CI: ViT-B and TinyViT with HQ-SAM (the SAM decoder is full size in SMALL); ViT-L / ViT-H in
# `make test-slow`


def test_full_size_vit_b_hq_matches_official(official_vit_b_hq_square, tmp_path_factory):
    official, official_predictor = official_vit_b_hq_square  # the square photo is set (shared with test_hq)
    model, adapter = with_adapter(official)
    adapter.inject()
    folder = tmp_path_factory.mktemp("vit_b_hq")
    export(model, folder)
    for runtime in ("onnxruntime", "openvino"):  # one export (a minute on two cores), both runtimes
        predictor = OnnxPredictor(folder, runtime=runtime)
        assert_matches_official(
            predictor, official_predictor, PHOTOS["square"](), image_is_set=True, hq_token_only=False
        )


def test_full_size_light_hq_sam_matches_official(tmp_path, runtime):
    """TinyViT's encoder (its image embedding and HQ features), with the HQ mask alone; its BatchNorm layers
    are still in eval mode after the export."""
    tiny_hq = build_official_tiny(seed=22)
    model, adapter = with_adapter(tiny_hq, hq_mask_only=True)
    adapter.inject()
    modes = [m.training for m in model.modules()]
    assert not model.image_encoder.training  # its BatchNorm layers use their running statistics
    export(model, tmp_path)
    assert [m.training for m in model.modules()] == modes
    official = HQSamPredictor(tiny_hq)
    assert_matches_official(OnnxPredictor(tmp_path, runtime=runtime), official, photo("rocket"), hq_token_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
def test_full_size_large_encoders_match_official(name, tmp_path):
    official = random_official(name, seed=23, hq=True)
    model, adapter = with_adapter(official)
    adapter.inject()
    report = export(model, tmp_path, quantize=True)
    assert (io.ENCODER_FILE + ".data" in report.files) is (name == "vit_h")  # ViT-H's encoder is over 2 GB
    for runtime in ("onnxruntime", "openvino"):  # OpenVINO reads ViT-H's external data file too
        assert_matches_official(
            OnnxPredictor(tmp_path, runtime=runtime),
            HQSamPredictor(official),
            PHOTOS["portrait"](),
            hq_token_only=False,
        )
    image = PHOTOS["portrait"]()
    box = np.array([50.0, 100.0, 450.0, 700.0])
    expected = OnnxPredictor(tmp_path).predict(image, boxes=box)
    actual = OnnxPredictor(tmp_path, quantized=True).predict(image, boxes=box)
    assert (expected.masks & actual.masks).sum() / (expected.masks | actual.masks).sum() >= QUANTIZED_MASK_IOU


# -- the command


@pytest.fixture(scope="module")
def small_files(tmp_path_factory, official_hq_small) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    model, adapter = with_adapter(official_hq_small)
    lora = SAMLoraAdapter(model, "tuned", rank=2)
    torch.nn.init.normal_(lora.loras[0].up.weight, std=0.1, generator=torch.Generator().manual_seed(1))
    files = {"base": folder / "small.safetensors", "hq": folder / "small.hq.safetensors"}
    save_sam(model, files["base"])
    save_hq(adapter, files["hq"])
    files["lora"] = save_lora(lora, folder / "tuned.safetensors")
    # a base of another size (a wider ViT), which the HQ weights above do not fit
    other = SegmentAnything(
        SAMConfig(encoder=ViTConfig(dim=96, depth=2, heads=4, global_attention_blocks=(1,)), image_size=256)
    )
    files["other base"] = save_sam(other, folder / "other.safetensors")
    return files


def test_export_command_writes_what_model_json_describes(small_files, tmp_path):
    out = tmp_path / "onnx"
    result = finesam(
        "export", "--weights", small_files["base"], "--hq", small_files["hq"], "--hq-only", "--lora",
        small_files["lora"], "--out", out, "--multimask", "--quantize",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([io.ENCODER_FILE, io.DECODER_FILE, *io.QUANTIZED_FILES.values(), io.DESCRIPTION_FILE])
    assert sorted(Path(line).name for line in result.stdout.split()) == written
    description = json.loads((out / io.DESCRIPTION_FILE).read_text())
    assert description["model"]["hq"] == {"hq_mask_only": True}
    assert description["model"]["loras"] == [{"name": "tuned", "scale": 1.0}]
    assert description["multimask_output"] is True and description["opset"] == io.OPSET
    assert description["decoder_outputs"][io.MASKS]["shape"] == [1, 1, "height", "width"]  # HQ-SAM: one mask
    for session_file, side in ((io.ENCODER_FILE, "encoder"), (io.DECODER_FILE, "decoder")):
        session = ort.InferenceSession(str(out / session_file))
        assert [i.name for i in session.get_inputs()] == list(description[f"{side}_inputs"])
        assert [o.name for o in session.get_outputs()] == list(description[f"{side}_outputs"])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing weights", "no such file"),
        ("hq of another size", "HQ"),
        ("out is a file", "exists and is not a folder"),
        ("opset", "opset 9 is not supported: the exporter writes opsets 14 to"),
    ],
)
def test_export_command_refuses_bad_input_in_one_line_and_writes_nothing(small_files, tmp_path, case, message, capsys):
    out = tmp_path / "out"
    args = {
        "missing weights": ["--weights", tmp_path / "none.safetensors", "--out", out],
        "hq of another size": ["--weights", small_files["other base"], "--hq", small_files["hq"], "--out", out],
        "out is a file": ["--weights", small_files["base"], "--out", small_files["lora"]],
        "opset": ["--weights", small_files["base"], "--out", out, "--opset", "9"],
    }[case]
    lora_bytes = small_files["lora"].read_bytes()
    with pytest.raises(SystemExit) as exit_status:
        main(["export", *map(str, args)])
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finesam export: error:") and message in lines[0], lines
    assert not out.exists() or not any(out.iterdir())
    assert small_files["lora"].read_bytes() == lora_bytes


def test_killed_export_leaves_no_file_under_a_final_name(small_files, tmp_path):
    out = tmp_path / "out"
    command = [*FINESAM_COMMAND, "export", "--weights", small_files["base"], "--hq", small_files["hq"], "--out", out]
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any((out / ".").glob(".export-*/*/*.onnx")) and time.monotonic() < deadline:
        time.sleep(0.02)  # until the exporter writes its first graph
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not any(out.glob("*.onnx")) and not (out / io.DESCRIPTION_FILE).exists()
    assert any(out.glob(".export-*"))  # the dead export's staging folder ...
    export(load_sam(small_files["base"]), out)
    # ... is gone after the next export, which wrote every file
    assert sorted(p.name for p in out.iterdir()) == sorted([io.ENCODER_FILE, io.DECODER_FILE, io.DESCRIPTION_FILE])
