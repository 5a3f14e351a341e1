"""EfficientViT-SAM against the official code (`efficientsam` 1.0.0) in the same process, alternating: the image
encoder through each predictor (preprocessing included) in fp32 and bf16 (ours: `set_encoder_dtype`; the
official model under CPU autocast, when it runs), and one box prompt. Random weights of a release's shapes (the
timings do not depend on the values), the same in both. Prints each median and the ratios ours / official fp32.

    python benchmarks/bench_efficientvit.py --size l0 --repeats 3
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference"), str(Path(__file__).resolve().parent)]

import numpy as np
import torch

from finesam.fast import apply_fast_paths
from finesam.model import PRESETS
from finesam.weights.loading import sam_from_state_dict

from bench import alternating_median_ms
from official_efficientvit import EfficientViTSamPredictor, build_official_efficientvit


def _alternating_s(*runs: Callable[[], object], repeats: int) -> list[float]:
    """Median seconds of the runs, taken in turn (`bench.alternating_median_ms`)."""
    return [ms / 1000 for ms in alternating_median_ms(*runs, repeats=repeats)]


def _official_bf16_runs(predictor: EfficientViTSamPredictor, image: np.ndarray) -> Callable[[], object] | None:
    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predictor.set_image(image)

    try:
        run()
    except RuntimeError as e:  # the official model mixes float32 resampling into bf16 layers
        print(f"the official encoder does not run under bf16 autocast: {str(e).splitlines()[0]}")
        return None
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="l0", choices=["l0", "l1", "l2", "xl0", "xl1"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    name = f"efficientvit_sam_{args.size}"
    official = build_official_efficientvit(PRESETS[name], release=name)
    ours = sam_from_state_dict(official.state_dict()).eval()
    apply_fast_paths(ours)  # as load_sam gives it
    bf16 = sam_from_state_dict(official.state_dict()).eval()
    apply_fast_paths(bf16)
    bf16.set_encoder_dtype(torch.bfloat16)
    image = (np.random.default_rng(0).random((768, 1024, 3)) * 255).astype(np.uint8)
    box = np.array([100.0, 100.0, 600.0, 500.0])
    predictor = EfficientViTSamPredictor(official)
    rows: list[tuple[str, float | None, float]] = []
    with torch.inference_mode():
        official_bf16 = _official_bf16_runs(predictor, image)
        predictor.set_image(image)
        embedding = ours.encode_image(image)
        theirs_fp32, mine_fp32 = _alternating_s(
            lambda: predictor.set_image(image), lambda: ours.encode_image(image), repeats=args.repeats
        )
        rows.append(("encoder fp32", theirs_fp32, mine_fp32))
        official_bf16_runs = [] if official_bf16 is None else [official_bf16]
        *theirs_bf16, mine_bf16 = _alternating_s(
            *official_bf16_runs, lambda: bf16.encode_image(image), repeats=args.repeats
        )
        rows.append(("encoder bf16 (official: autocast)", next(iter(theirs_bf16), None), mine_bf16))
        predictor.set_image(image)
        theirs_box, mine_box = _alternating_s(
            lambda: predictor.predict(box=box, multimask_output=False),
            lambda: ours.predict(embedding, boxes=box),
            repeats=args.repeats,
        )
        rows.append(("one box", theirs_box, mine_box))
    print(f"EfficientViT-SAM-{args.size.upper()}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print(f"{'case':36} {'official s':>10} {'finesam s':>10} {'/official':>9} {'/official fp32':>15}")
    for case, theirs_s, mine_s in rows:
        theirs_text = f"{theirs_s:10.3f}" if theirs_s is not None else f"{'-':>10}"
        ratio = f"{mine_s / theirs_s:9.2f}" if theirs_s is not None else f"{'-':>9}"
        against_fp32 = f"{mine_s / theirs_fp32:15.2f}" if case.startswith("encoder") else f"{'-':>15}"
        print(f"{case:36} {theirs_text} {mine_s:10.3f} {ratio} {against_fp32}")


if __name__ == "__main__":
    main()
