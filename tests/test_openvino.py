"""OpenVINO as a runtime of the ONNX export (`OnnxPredictor(folder, runtime="openvino")`): the options of that
runtime. Its f32 parity with the official predictors is in the parity tests of tests/test_onnx.py and
tests/test_sam2_onnx.py, which run through both runtimes.

Tolerances: bf16 (encoder in bf16, decoder in f32, as the torch model's bf16 mode) as tests/test_precision.py states
them for torch's bf16 encoder: embedding cosine >= BF16_COSINE to f32 and mask IoU >= BF16_MASK_IOU (small
random-weight model, real photos). f32 from the compiled-model cache: bit for bit the outputs of a fresh compile.
"""

from typing import Any

import numpy as np
import pytest

from finesam.onnx import OnnxPredictor, runtimes
from finesam.onnx import interface as io
from finesam.onnx.export import export

from conftest import photo

BF16_COSINE, BF16_MASK_IOU = 0.9999, 0.98


@pytest.fixture(scope="module")
def small_export(small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    export(small, folder)
    return folder


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_bf16_where_the_cpu_has_it_else_a_clear_refusal(small_export):
    """Both branches exist; this machine takes one (OpenVINO's CPU plugin lists BF16 in its optimisation
    capabilities, or not), and the test says which: bf16 within the torch bf16 mode's tolerances, or the refusal.
    The other branch is forced in the next test."""
    if "BF16" not in runtimes.openvino_capabilities():
        with pytest.raises(ValueError, match=r"has no bf16 on this CPU .*use precision='f32'"):
            OnnxPredictor(small_export, runtime="openvino", precision="bf16")
        return
    f32 = OnnxPredictor(small_export, runtime="openvino")
    bf16 = OnnxPredictor(small_export, runtime="openvino", precision="bf16")
    assert bf16.encoder.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "bf16"  # type: ignore[attr-defined]
    # the decoder stays f32, as the torch model's bf16 mode keeps it; f32 is asked for explicitly (the plugin's
    # own default on a bf16 CPU is bf16)
    assert bf16.decoder.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"  # type: ignore[attr-defined]
    assert f32.encoder.compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"  # type: ignore[attr-defined]
    for name in ("coffee", "chelsea", "astronaut", "rocket"):
        image = photo(name)
        reference, candidate = f32.encode_image(image), bf16.encode_image(image)
        embedding = candidate.outputs[io.IMAGE_EMBEDDINGS]
        assert embedding.dtype == np.float32
        assert not np.array_equal(embedding, reference.outputs[io.IMAGE_EMBEDDINGS])  # bf16 did run
        assert cosine(embedding, reference.outputs[io.IMAGE_EMBEDDINGS]) >= BF16_COSINE, name
        w, h = image.size
        box, point = [0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h], [[0.5 * w, 0.5 * h]]
        prompts: list[dict[str, Any]] = [{"boxes": box}, {"points": point}]
        for prompt in prompts:
            expected, actual = f32.predict(reference, **prompt).masks, bf16.predict(candidate, **prompt).masks
            assert (expected & actual).sum() / (expected | actual).sum() >= BF16_MASK_IOU, (name, prompt)


def test_bf16_refused_with_the_reason_on_a_cpu_without_it(small_export, monkeypatch):
    """The refusal branch, forced (a CPU whose plugin lists FP32 and INT8 only): a ValueError naming the CPU and
    what to ask for instead, before anything is compiled; f32 still opens."""
    monkeypatch.setattr(runtimes, "openvino_capabilities", lambda: ("FP32", "INT8", "EXPORT_IMPORT"))
    with pytest.raises(ValueError, match=r"no bf16 on this CPU \(.*capabilities: FP32, INT8, EXPORT_IMPORT\)"):
        OnnxPredictor(small_export, runtime="openvino", precision="bf16")
    OnnxPredictor(small_export, runtime="openvino", precision="f32")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"precision": "bf16"}, "onnxruntime runs the export in f32 only"),
        ({"runtime": "tensorrt"}, "unknown runtime 'tensorrt'"),
        ({"runtime": "openvino", "precision": "fp16"}, "unknown precision 'fp16'"),
        ({"runtime": "openvino", "quantized": True}, "run them with onnxruntime"),
        ({"cache_dir": "cache"}, "cache_dir is OpenVINO's"),
    ],
)
def test_options_a_runtime_lacks_are_refused(small_export, options, message):
    with pytest.raises(ValueError, match=message):
        OnnxPredictor(small_export, **options)


def test_the_compiled_model_cache_serves_a_second_start(small_export, tmp_path):
    """With cache_dir the first start compiles and writes the cache, a second loads it (both graphs) and gives
    the same outputs bit for bit; the cached models are precision-independent (bf16 asked for after f32 is
    still bf16, not the cached f32)."""
    image = photo("coffee")
    first = OnnxPredictor(small_export, runtime="openvino", cache_dir=tmp_path / "cache", threads=1)
    assert not first.encoder.loaded_from_cache  # type: ignore[attr-defined]
    assert any((tmp_path / "cache").iterdir())
    second = OnnxPredictor(small_export, runtime="openvino", cache_dir=tmp_path / "cache", threads=1)
    assert second.encoder.loaded_from_cache and second.decoder.loaded_from_cache  # type: ignore[attr-defined]
    box = [50, 60, 400, 300]
    expected = first.predict(image, boxes=box, return_logits=True)
    actual = second.predict(image, boxes=box, return_logits=True)
    assert np.array_equal(expected.masks, actual.masks) and np.array_equal(
        expected.low_res_logits, actual.low_res_logits
    )
    if "BF16" in runtimes.openvino_capabilities():
        bf16 = OnnxPredictor(small_export, runtime="openvino", precision="bf16", cache_dir=tmp_path / "cache")
        fresh = OnnxPredictor(small_export, runtime="openvino", precision="bf16")
        cached, compiled = bf16.encode_image(image), fresh.encode_image(image)
        assert np.array_equal(cached.outputs[io.IMAGE_EMBEDDINGS], compiled.outputs[io.IMAGE_EMBEDDINGS])
        assert not np.array_equal(
            cached.outputs[io.IMAGE_EMBEDDINGS], first.encode_image(image).outputs[io.IMAGE_EMBEDDINGS]
        )
