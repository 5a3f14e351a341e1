"""Image encoders with and without `finesam.reuse_freed_memory()`, for finesam and the official package.

    python benchmarks/bench_allocator.py [--sizes vit_b,vit_tiny] [--repeats 3]

Each setting runs in a fresh process (the setting is process-wide): the official encoder and ours, same random
weights, one 1024x1024 input, alternating after a warm-up of each. Prints the median time and the minor page
faults per encoding of each side, and the process's peak RSS, for the default C allocator and with
`reuse_freed_memory()`.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

CHILD = """
import json, resource, statistics, sys, time
import torch
sys.path[:0] = [{reference!r}]
import finesam
if {reuse}:
    assert finesam.reuse_freed_memory()
from finesam.fast import apply_fast_paths
from finesam.weights.loading import sam_from_state_dict
from official import build_official_tiny, random_official

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

official = build_official_tiny(seed=0) if {size!r} == "vit_tiny" else random_official({size!r}, seed=0)
ours = sam_from_state_dict(official.state_dict())
apply_fast_paths(ours)
pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
sides = {{"official": lambda: official.image_encoder(pixels), "finesam": lambda: ours.encode(pixels)}}
runs = {{name: [] for name in sides}}
with torch.inference_mode():
    for run in sides.values():
        run()
    for _ in range({repeats}):
        for name, run in sides.items():
            start, before = time.perf_counter(), faults()
            run()
            runs[name].append((time.perf_counter() - start, faults() - before))
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
result = {{
    name: {{"ms": 1000 * statistics.median(t for t, _ in r), "faults": statistics.median(f for _, f in r)}}
    for name, r in runs.items()
}}
print(json.dumps({{**result, "peak_mb": peak}}))
"""


def measure(size: str, reuse: bool, repeats: int) -> dict:
    script = CHILD.format(reference=str(HERE.parent / "reference"), reuse=reuse, size=size, repeats=repeats)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="vit_b,vit_tiny", help="comma-separated, of vit_b,vit_l,vit_h,vit_tiny")
    parser.add_argument("--repeats", type=int, default=3, help="timed encodings of each side per process")
    args = parser.parse_args()
    print(f"image encoders, 1024x1024, torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("| encoder | allocator | official | finesam | finesam / official | page faults per encoding | peak RSS |")
    print("|---|---|---:|---:|---:|---|---:|")
    for size in args.sizes.split(","):
        default = None
        for reuse in (False, True):
            numbers = measure(size, reuse, args.repeats)
            theirs, ours = numbers["official"], numbers["finesam"]
            setting = "reuse_freed_memory()" if reuse else "default"
            if default is not None:  # each side against itself with the default allocator
                setting += f" (official {theirs['ms'] / default['official']['ms']:.2f}x, "
                setting += f"finesam {ours['ms'] / default['finesam']['ms']:.2f}x)"
            times = f"{theirs['ms']:.0f} ms | {ours['ms']:.0f} ms | {ours['ms'] / theirs['ms']:.2f}x"
            faults = f"official {theirs['faults']:.0f}, finesam {ours['faults']:.0f}"
            print(f"| {size} | {setting} | {times} | {faults} | {numbers['peak_mb']:.0f} MB |", flush=True)
            default = numbers


if __name__ == "__main__":
    main()
