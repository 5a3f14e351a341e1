"""Speed of finesam against the official `segment_anything`, same random weights, same process.

    python benchmarks/bench_sam.py [--size vit_b] [--repeats 3]

Prints, per stage, the median time of each implementation and the speed-up (official / finesam), the
TinyViT encoder (MobileSAM / Light HQ-SAM, against `segment_anything_hq`'s) next to the ViT's.
Needs the official package (installed by `make test`); its torchvision import is stubbed as in the tests.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parent)]
from finesam.weights import build_from_official

from official import SamPredictor, build_official_tiny, random_official

Stage = tuple[str, Callable[[], object], Callable[[], object], int]  # name, official, finesam, timed runs


def report(title: str, stages: list[Stage]) -> list[float]:
    """Times each stage for both implementations, prints the table, returns finesam's times (ms)."""
    print(f"{title}, torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU")
    print(f"{'stage':40s} {'official ms':>12s} {'finesam ms':>12s} {'speed-up':>9s}")
    times = []
    for name, run_official, run_ours, repeats in stages:
        reference, candidate = paired_median_ms(run_official, run_ours, repeats)
        print(f"{name:40s} {reference:12.1f} {candidate:12.1f} {reference / candidate:8.2f}x")
        times.append(candidate)
    return times


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def paired_median_ms(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median times of two functions run alternately (after a warm-up of each), so both see the same load."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for run, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            run()
            bucket.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[0]), 1000 * statistics.median(times[1])


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the image encoder")
    args = parser.parse_args()

    official = random_official(args.size, seed=0)
    ours = build_from_official(official.state_dict())
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1200, 1800, 3), dtype=np.uint8)
    from PIL import Image

    pil = Image.fromarray(image)
    predictor = SamPredictor(official)
    predictor.set_image(image)
    embedding = ours.encode_image(pil)
    pixels = torch.randn(1, 3, 1024, 1024)
    box = np.array([100.0, 200.0, 1500.0, 1000.0])
    boxes = np.stack([box + i for i in range(64)])
    official_boxes = torch.as_tensor(predictor.transform.apply_boxes(boxes, predictor.original_size)).float()

    official_tiny = build_official_tiny(seed=0)
    ours_tiny = build_from_official(official_tiny.state_dict())  # Light HQ-SAM's base: TinyViT, no adapter
    stages: list[Stage] = [
        (
            f"image encoder {args.size}, 1024x1024",
            lambda: official.image_encoder(pixels),
            lambda: ours.image_encoder(pixels),
            args.repeats,
        ),
        (
            "image encoder TinyViT, 1024x1024",
            lambda: official_tiny.image_encoder(pixels),
            lambda: ours_tiny.image_encoder(pixels),
            max(args.repeats, 5),
        ),
        (
            "prompt + decoder, 1 box",
            lambda: predictor.predict_torch(None, None, official_boxes[:1], multimask_output=False),
            lambda: ours.decode(embedding.embedding, boxes=official_boxes[:1]),
            20,
        ),
        (
            "prompt + decoder, 64 boxes batched",
            lambda: predictor.predict_torch(None, None, official_boxes, multimask_output=False),
            lambda: ours.decode(embedding.embedding, boxes=official_boxes),
            3,
        ),
        (
            "predict (1 box, masks at 1800x1200)",
            lambda: predictor.predict(box=box, multimask_output=False),
            lambda: ours.predict(embedding, boxes=box),
            10,
        ),
    ]
    times = report(f"SAM {args.size}", stages)
    print(f"finesam TinyViT encoder vs {args.size}: {times[0] / times[1]:.1f}x faster")


if __name__ == "__main__":
    main()
