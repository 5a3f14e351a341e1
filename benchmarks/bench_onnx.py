"""The exported ONNX models in onnxruntime and OpenVINO (CPU) against finesam's torch model: the encoder and one
box (prompt + decoder + postprocessing to the original size), SAM and HQ-SAM, for each size asked.

    python benchmarks/bench_onnx.py [--sizes vit_b,vit_tiny] [--repeats 5] [--prompts 40]

Columns: finesam's torch model with its encoder in fp32, bf16 (`set_encoder_dtype`) and int8 (`quantize_encoder`),
onnxruntime fp32 and int8 (the `--quantize` files), OpenVINO f32 and bf16 (the encoder; OpenVINO's decoder is f32
in both, as torch's). Random weights converted from the official package (speed does not depend on their values),
exported by `finesam.onnx.export` (with `quantize=True`); one process, the same threads everywhere (torch's
count); all runs of a row alternate after a warm-up of each. OpenVINO bf16 is left out ("-") where its CPU plugin
has no bf16. Deviations: each encoder's embedding cosine to torch fp32's; the int8 decoder's mask IoU to fp32's.
"""

import argparse
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference"), str(Path(__file__).resolve().parent)]
from finesam.adapters.hq import HQSAMAdapter
from finesam.fast import apply_fast_paths
from finesam.model import SegmentAnything
from finesam.model.processing import preprocess_image
from finesam.onnx import OnnxPredictor
from finesam.onnx.export import export
from finesam.onnx.runtimes import openvino_capabilities, openvino_cpu_name, openvino_has_bf16
from finesam.weights.hq import convert_hq_state_dict
from finesam.weights.loading import sam_from_state_dict

from bench import alternating_median_ms, photos
from official import build_official_tiny, random_official


def boxes_for(width: int, height: int) -> np.ndarray:
    return np.array(
        [[0.1 * width, 0.2 * height, 0.8 * width, 0.9 * height], [0.3 * width, 0.1 * height, 0.6 * width, 0.5 * height]]
    )


TORCH_MODES = ("fp32", "bf16", "int8")


def torch_model(size: str, hq: bool, mode: str) -> SegmentAnything:
    """finesam's torch model as `load_sam` gives it (fast paths), HQ-SAM injected, its encoder in `mode`."""
    official = build_official_tiny(seed=0) if size == "vit_tiny" else random_official(size, seed=0, hq=True)
    model = sam_from_state_dict(official.state_dict())
    if hq:
        adapter = HQSAMAdapter(model)
        adapter.load_state_dict(convert_hq_state_dict(official.state_dict(), adapter))
        adapter.inject()
    apply_fast_paths(model)
    if mode == "bf16":
        model.set_encoder_dtype(torch.bfloat16)
    elif mode == "int8":
        model.quantize_encoder()
    return model


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def rows_for(size: str, hq: bool, repeats: int, prompts: int, folder: Path) -> tuple[list[str], list[str]]:
    """The encoder row and the one-box row of one model: every runtime and precision, timed in turn."""
    models = {mode: torch_model(size, hq, mode) for mode in TORCH_MODES}
    name = f"{size} {'HQ-SAM' if hq else 'SAM'}"
    report = export(models["fp32"], folder, quantize=True)  # the reference chains are exported
    print(f"{name}: {report.summary()}", file=sys.stderr)
    threads = torch.get_num_threads()
    predictors = {
        "onnxruntime fp32": OnnxPredictor(folder, threads=threads),
        "onnxruntime int8": OnnxPredictor(folder, quantized=True, threads=threads),
        "openvino f32": OnnxPredictor(folder, runtime="openvino", threads=threads),
    }
    if openvino_has_bf16():
        predictors["openvino bf16"] = OnnxPredictor(folder, runtime="openvino", precision="bf16", threads=threads)
    image = photos()[0]
    pixels, _ = preprocess_image(image, models["fp32"].config.image_size)
    onnx_pixels = pixels.numpy()

    def encode(model: SegmentAnything) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                return model.encode(pixels)

        return run

    runs = [encode(model) for model in models.values()]
    runs += [lambda p=p: p.encoder.run({"image": onnx_pixels}) for p in predictors.values()]
    times = dict(
        zip(
            [f"torch {m}" for m in TORCH_MODES] + list(predictors),
            alternating_median_ms(*runs, repeats=repeats),
            strict=True,
        )
    )
    with torch.inference_mode():
        reference = models["fp32"].encode_image(image).embedding.numpy()
    cosines = [
        f"{m} {cosine(models[m].encode_image(image).embedding.float().numpy(), reference):.5f}" for m in TORCH_MODES[1:]
    ]
    embeddings = {label: p.encode_image(image) for label, p in predictors.items()}
    cosines += [f"{label} {cosine(e.outputs['image_embeddings'], reference):.5f}" for label, e in embeddings.items()]
    encoder_row = [f"{name} encoder", *(_ms(times.get(c)) for c in COLUMNS), _ratios(times), "; ".join(cosines)]

    box = boxes_for(*image.size)[:1]
    with torch.inference_mode():
        embedding = models["fp32"].encode_image(image)

    def torch_box() -> object:
        with torch.inference_mode():
            return models["fp32"].predict(embedding, boxes=box, return_logits=True)

    decoders = {label: p for label, p in predictors.items() if label != "openvino bf16"}  # its decoder is f32
    runs = [
        torch_box,
        *(
            lambda p=p, e=embeddings[label]: p.predict(e, boxes=box, return_logits=True)
            for label, p in decoders.items()
        ),
    ]
    box_times = dict(zip(["torch fp32", *decoders], alternating_median_ms(*runs, repeats=prompts), strict=True))
    boxes = boxes_for(*image.size)
    expected = predictors["onnxruntime fp32"].predict(image, boxes=boxes)
    actual = predictors["onnxruntime int8"].predict(image, boxes=boxes)
    union = (expected.masks | actual.masks).sum(axis=(1, 2, 3))
    iou = (expected.masks & actual.masks).sum(axis=(1, 2, 3)) / np.maximum(union, 1)
    deviation = f"onnxruntime int8: mask IoU vs fp32 {iou.mean():.3f}"
    box_row = [f"{name} one box", *(_ms(box_times.get(c), 1) for c in COLUMNS), _ratios(box_times), deviation]
    return encoder_row, box_row


# the table's timing columns, in order; a decoder runs in fp32 in every torch mode and OpenVINO bf16 mode
COLUMNS = (
    "torch fp32",
    "torch bf16",
    "torch int8",
    "onnxruntime fp32",
    "onnxruntime int8",
    "openvino f32",
    "openvino bf16",
)


def _ms(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f} ms"


def _ratios(times: dict[str, float]) -> str:
    """OpenVINO against torch in the same precision, and the fastest torch mode against OpenVINO's fastest."""
    parts = []
    for ov, pt in (("openvino f32", "torch fp32"), ("openvino bf16", "torch bf16")):
        if ov in times and pt in times:
            parts.append(f"{ov} / {pt} {times[ov] / times[pt]:.2f}x")
    best_torch = min(v for k, v in times.items() if k.startswith("torch"))
    best_ov = min((v for k, v in times.items() if k.startswith("openvino")), default=None)
    if best_ov is not None and len([k for k in times if k.startswith("torch")]) > 1:
        parts.append(f"fastest torch / fastest openvino {best_torch / best_ov:.2f}x")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="vit_b,vit_tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=40)
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}; OpenVINO CPU: {openvino_cpu_name()}, capabilities "
        f"{', '.join(openvino_capabilities())}; torch threads {torch.get_num_threads()}",
        file=sys.stderr,
    )
    rows = []
    for size in args.sizes.split(","):
        for hq in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                rows += rows_for(size, hq, args.repeats, args.prompts, Path(folder))
    print(f"\n| figure | {' | '.join(COLUMNS)} | ratios | deviation (embedding cosine vs torch fp32) |")
    print("|---|" + "---:|" * len(COLUMNS) + "---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
