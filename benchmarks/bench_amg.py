"""Automatic mask generation speed: finesam against the official `SamAutomaticMaskGenerator`, same process, same
random weights, same photo, runs interleaved.

    python benchmarks/bench_amg.py [--size vit_b] [--points-per-side 16] [--crop-n-layers 0] [--repeats 1]
    python benchmarks/bench_amg.py --size sam2.1_hiera_tiny --points-per-side 32   # against SAM2AutomaticMaskGenerator

Prints the median time of each generator, their masks per second and the speed-up (official / finesam).
Random weights predict low IoUs and logits near 0, so the IoU and stability filters are off by default (every
candidate mask is upscaled and thresholded by both generators) and the decoder's transposed-convolution
kernels are made spatially constant (`official.structured`, as in tests/test_amg.py), so that the masks follow
the photo. Needs the official package (`make test` installs it) and the benchmark photos
(`$FINESAM_BENCH_IMAGES`, see bench.py); without them a random image is used.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference"), str(Path(__file__).resolve().parent)]
from finesam.amg import AutomaticMaskGenerator
from finesam.fast import apply_fast_paths
from finesam.weights.loading import sam_from_state_dict

from bench import photos
from official import random_official, segment_anything, structured
from official_sam2 import CONFIG_FILES, SAM2AutomaticMaskGenerator, build_official_sam2


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_b", choices=["vit_b", "vit_l", "vit_h", *CONFIG_FILES])
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--crop-n-layers", type=int, default=0)
    parser.add_argument("--pred-iou-thresh", type=float, default=0.0)
    parser.add_argument("--stability-score-thresh", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each generator, interleaved")
    args = parser.parse_args()

    sam2 = args.size in CONFIG_FILES
    official: Any
    if sam2:
        official = build_official_sam2(args.size, seed=2)
        with torch.no_grad():  # as `structured` does for SAM (the SAM 2 decoder has its own name)
            for module in official.sam_mask_decoder.modules():
                if isinstance(module, torch.nn.ConvTranspose2d):
                    module.weight.copy_(module.weight[:, :, :1, :1].expand_as(module.weight))
    else:
        official = structured(random_official(args.size, seed=2))
    ours = sam_from_state_dict(official.state_dict())
    apply_fast_paths(ours)  # as load_sam gives it
    pixels = np.asarray(photos()[0])  # truck.jpg, or a random image without the benchmark photos
    options = dict(
        points_per_side=args.points_per_side,
        crop_n_layers=args.crop_n_layers,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
        stability_score_offset=0.01,
    )
    generators = {
        "official": (SAM2AutomaticMaskGenerator if sam2 else segment_anything.SamAutomaticMaskGenerator)(
            official, **options
        ).generate,
        "finesam": AutomaticMaskGenerator(ours, **options).generate,
    }
    times: dict[str, list[float]] = {name: [] for name in generators}
    counts: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, generate in generators.items():
            start = time.perf_counter()
            counts[name] = len(generate(pixels))
            times[name].append(time.perf_counter() - start)
    height, width = pixels.shape[:2]
    print(
        f"SAM {args.size} automatic masks, {width}x{height} image, {args.points_per_side}x{args.points_per_side} "
        f"points, crop_n_layers {args.crop_n_layers}, pred_iou_thresh {args.pred_iou_thresh}, stability_score_thresh "
        f"{args.stability_score_thresh}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"fp32 CPU, median of {args.repeats}"
    )
    print(f"{'generator':10s} {'seconds':>9s} {'masks':>6s} {'masks/s':>8s}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, seconds in medians.items():
        print(f"{name:10s} {seconds:9.2f} {counts[name]:6d} {counts[name] / seconds:8.2f}")
    print(f"speed-up (official / finesam): {medians['official'] / medians['finesam']:.2f}x")


if __name__ == "__main__":
    main()
