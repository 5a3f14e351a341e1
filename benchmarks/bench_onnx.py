"""The exported ONNX models in onnxruntime (CPU) against finesam's torch model: encoder and one-box decoder,
fp32 and dynamically quantised int8, SAM and HQ-SAM, for each size asked.

    python benchmarks/bench_onnx.py [--sizes vit_b,vit_tiny] [--repeats 5] [--prompts 40]

Random weights converted from the official package (speed does not depend on their values), exported by
`finesam.onnx.export` (with `quantize=True`); the same threads for both sides (torch's count); torch and
onnxruntime runs alternate after a warm-up of each. Decoder rows include the postprocessing to the original
size on both sides (`predict(..., return_logits=True)` against `OnnxPredictor.predict`). The int8 rows also
give the mask IoU against fp32 and the largest predicted-IoU deviation over the photo's boxes.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference"), str(Path(__file__).resolve().parent)]
from finesam.adapters.hq import HQSAMAdapter
from finesam.fast import apply_fast_paths
from finesam.model.processing import preprocess_image
from finesam.onnx import OnnxPredictor
from finesam.onnx.export import export
from finesam.weights.hq import convert_hq_state_dict
from finesam.weights.loading import sam_from_state_dict

from bench import alternating_median_ms, photos
from official import build_official_tiny, random_official


def boxes_for(width: int, height: int) -> np.ndarray:
    return np.array(
        [[0.1 * width, 0.2 * height, 0.8 * width, 0.9 * height], [0.3 * width, 0.1 * height, 0.6 * width, 0.5 * height]]
    )


def rows_for(size: str, hq: bool, repeats: int, prompts: int, folder: Path) -> list[tuple[str, ...]]:
    official = build_official_tiny(seed=0) if size == "vit_tiny" else random_official(size, seed=0, hq=True)
    model = sam_from_state_dict(official.state_dict())
    name = f"{size} {'HQ-SAM' if hq else 'SAM'}"
    if hq:
        adapter = HQSAMAdapter(model)
        adapter.load_state_dict(convert_hq_state_dict(official.state_dict(), adapter))
        adapter.inject()
    apply_fast_paths(model)  # the torch side as load_sam gives it; the export runs the reference chains
    del official
    report = export(model, folder, quantize=True)
    print(f"{name}: {report.summary()}", file=sys.stderr)
    threads = torch.get_num_threads()
    fp32, int8 = OnnxPredictor(folder, threads=threads), OnnxPredictor(folder, quantized=True, threads=threads)
    image = photos()[0]
    pixels, _ = preprocess_image(image, model.config.image_size)
    onnx_pixels = pixels.numpy()
    rows = []
    box = boxes_for(*image.size)[:1]
    with torch.inference_mode():
        embedding = model.encode_image(image)
    for label, predictor in (("fp32", fp32), ("int8", int8)):
        encoder = predictor.encoder

        def torch_encoder() -> object:
            with torch.inference_mode():
                return model.encode(pixels)

        torch_ms, onnx_ms = alternating_median_ms(
            torch_encoder, lambda e=encoder: e.run({"image": onnx_pixels}), repeats=repeats
        )
        onnx_embedding = predictor.encode_image(image)
        reference = fp32.encode_image(image).outputs["image_embeddings"].ravel()
        ours = onnx_embedding.outputs["image_embeddings"].ravel()
        cos = float(ours @ reference / np.linalg.norm(ours) / np.linalg.norm(reference))
        rows.append(
            (
                f"{name} encoder, onnxruntime {label}",
                f"{torch_ms:.0f} ms",
                f"{onnx_ms:.0f} ms",
                f"{onnx_ms / torch_ms:.2f}x",
                f"cosine vs fp32 {cos:.5f}",
            )
        )

        def torch_box() -> object:
            with torch.inference_mode():
                return model.predict(embedding, boxes=box, return_logits=True)

        torch_ms, onnx_ms = alternating_median_ms(
            torch_box,
            lambda p=predictor, e=onnx_embedding: p.predict(e, boxes=box, return_logits=True),
            repeats=prompts,
        )
        deviation = "-"
        if label == "int8":
            boxes = boxes_for(*image.size)
            expected, actual = fp32.predict(image, boxes=boxes), int8.predict(image, boxes=boxes)
            union = (expected.masks | actual.masks).sum(axis=(1, 2, 3))
            iou = (expected.masks & actual.masks).sum(axis=(1, 2, 3)) / np.maximum(union, 1)
            shift = np.abs(expected.iou_predictions - actual.iou_predictions).max()
            deviation = f"mask IoU vs fp32 {iou.mean():.3f}, predicted IoU within {shift:.3f}"
        rows.append(
            (
                f"{name} one box, onnxruntime {label}",
                f"{torch_ms:.1f} ms",
                f"{onnx_ms:.1f} ms",
                f"{onnx_ms / torch_ms:.2f}x",
                deviation,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="vit_b,vit_tiny")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=40)
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        for hq in (False, True):
            with tempfile.TemporaryDirectory() as folder:
                rows += rows_for(size, hq, args.repeats, args.prompts, Path(folder))
    print("\n| figure | finesam torch | onnxruntime | onnxruntime / torch | deviation |")
    print("|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
