"""SAM 2.1 on images against Meta's sam2 1.1.0 in the same process, alternating: the image encoder (fp32, and
ours in bf16), one box prompt, 64 boxes in one call. Random weights of a release's shapes (the timings do not
depend on the values). Prints each median and the ratio ours / official.

    python benchmarks/bench_sam2.py --size tiny --repeats 3
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))

import numpy as np
import torch
import transformers  # noqa: F401  before the reference (its torchvision stand-in)

from finesam.weights.loading import sam_from_state_dict

from official_sam2 import SAM2ImagePredictor, build_official_sam2


def _median(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base_plus", "large"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    official = build_official_sam2(f"sam2.1_hiera_{args.size}")
    ours = sam_from_state_dict(official.state_dict())
    from finesam.fast import apply_fast_paths

    apply_fast_paths(ours)
    image = (np.random.default_rng(0).random((768, 1024, 3)) * 255).astype(np.uint8)
    predictor = SAM2ImagePredictor(official)
    box = np.array([100.0, 100.0, 600.0, 500.0])
    boxes = np.stack([box + i for i in range(64)])
    rows: list[tuple[str, float, float]] = []
    with torch.inference_mode():
        predictor.set_image(image)
        embedding = ours.encode_image(image)
        cases: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            ("encoder fp32", lambda: predictor.set_image(image), lambda: ours.encode_image(image)),
            (
                "one box",
                lambda: predictor.predict(box=box, multimask_output=False),
                lambda: ours.predict(embedding, boxes=box),
            ),
            (
                "64 boxes, one call",
                lambda: predictor.predict(box=boxes, multimask_output=False),
                lambda: ours.predict(embedding, boxes=boxes),
            ),
        ]
        for name, theirs, mine in cases:
            theirs()  # warm-up
            mine()
            a, b = [], []
            for _ in range(args.repeats):  # alternating
                a.append(_median(theirs, 1))
                b.append(_median(mine, 1))
            rows.append((name, statistics.median(a), statistics.median(b)))
        ours.set_encoder_dtype(torch.bfloat16)
        ours.encode_image(image)
        bf16 = _median(lambda: ours.encode_image(image), args.repeats)
        rows.append(("encoder bf16 (ours) vs official fp32", rows[0][1], bf16))
    print(f"SAM 2.1 Hiera-{args.size}, {torch.get_num_threads()} threads")
    print(f"{'case':40} {'official s':>11} {'finesam s':>10} {'ratio':>6}")
    for name, theirs_s, mine_s in rows:
        print(f"{name:40} {theirs_s:11.3f} {mine_s:10.3f} {mine_s / theirs_s:6.2f}")


if __name__ == "__main__":
    main()
