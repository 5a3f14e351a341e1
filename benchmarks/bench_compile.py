"""Compiled mode: `SegmentAnything.compile_encoder()` (torch.compile, inductor with freezing) against the
official fp32 image encoder, same random weights, same process.

    python benchmarks/bench_compile.py [--size vit_b] [--repeats 3] [--dtypes bfloat16,float32]

Prints the compile time (the first call), the median latency of each compiled encoder next to the official
fp32 encoder (paired, alternating runs), the ratio finesam / official, and the deviation from our eager fp32
embedding (max abs difference and cosine similarity).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parent)]
from finesam.weights import build_from_official

from bench_sam import paired_median_ms
from official import random_official

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    args = parser.parse_args()

    official = random_official(args.size, seed=0)
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    reference = build_from_official(official.state_dict()).encode(pixels)
    print(f"SAM {args.size} image encoder 1024x1024, torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = ("mode", "compile s", "official ms", "finesam ms", "ratio", "max abs", "cos")
    print("{:22s} {:>10s} {:>12s} {:>11s} {:>6s} {:>9s} {:>9s}".format(*header))
    for name in args.dtypes.split(","):
        model = build_from_official(official.state_dict()).set_encoder_dtype(DTYPES[name]).compile_encoder()
        start = time.perf_counter()
        embedding = model.encode(pixels)  # compiles
        compile_s = time.perf_counter() - start
        theirs, ours = paired_median_ms(
            lambda: official.image_encoder(pixels), lambda m=model: m.encode(pixels), args.repeats
        )
        difference = (embedding - reference).abs().max().item()
        cosine = torch.nn.functional.cosine_similarity(embedding.flatten(), reference.flatten(), dim=0).item()
        print(
            f"{'compiled ' + name:22s} {compile_s:10.1f} {theirs:12.1f} {ours:11.1f} {ours / theirs:6.2f} "
            f"{difference:9.2e} {cosine:9.6f}"
        )


if __name__ == "__main__":
    main()
