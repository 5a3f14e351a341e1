"""Loading time and peak memory: finesam safetensors vs the official `.pth`, each in a fresh process.

    python benchmarks/bench_loading.py [--size vit_h] [--dir DIR]

Writes a random-weight official checkpoint of that size and its conversion into DIR (default: a temporary
folder), then times, in separate processes: `torch.load` of the `.pth`, the official builder loading it,
and `finesam.weights.load_sam` of the safetensors file; prints seconds, peak RSS and ratios.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REFERENCE = str(Path(__file__).resolve().parents[1] / "reference")  # official.py
sys.path[:0] = [REFERENCE]
from finesam.weights import convert_checkpoint

from official import OFFICIAL_BUILDERS, random_official

# VmHWM (this address space's peak RSS), not ru_maxrss: a child's ru_maxrss starts at its parent's peak
MEASURE = """
import json, sys, time
def peak_kb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
sys.path.insert(0, {reference!r})
import torch, official, finesam.weights
before = peak_kb()
start = time.perf_counter()
{body}
elapsed = time.perf_counter() - start
print(json.dumps({{"seconds": elapsed, "peak_mb": (peak_kb() - before) / 1024}}))
"""

# every path ends by reading one value per 4 KiB page of every tensor: memory-mapped weights count as loaded
# only once they are resident, as they must be before the model computes anything
TOUCH = "\nfor t in tensors:\n    t.detach().reshape(-1)[::1024].sum()"
BODIES = {
    "torch.load(.pth)": (
        "import torch\ntensors = torch.load({pth!r}, map_location='cpu', weights_only=True).values()" + TOUCH
    ),
    "official builder(.pth)": (
        "import official\ntensors = official.OFFICIAL_BUILDERS[{size!r}]({pth!r}).state_dict().values()" + TOUCH
    ),
    "finesam load_sam(.safetensors)": (
        "from finesam.weights import load_sam\ntensors = load_sam({safetensors!r}).state_dict().values()" + TOUCH
    ),
}


def measure(body: str, **values: str) -> dict[str, float]:
    """Seconds and peak RSS growth (MB, beyond the imports) of `body` in a fresh process."""
    script = MEASURE.format(reference=REFERENCE, body=body.format(**values))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def run(size: str, folder: Path) -> tuple[float, dict[str, dict[str, float]]]:
    """Writes a random `size` checkpoint and its conversion into `folder`; the weights' MB and, per path,
    seconds and peak MB."""
    pth = folder / f"random_{size}.pth"
    state = random_official(size).state_dict()
    weights_mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    torch.save(state, pth)
    del state
    safetensors = convert_checkpoint(pth, folder).written[0]
    paths = dict(pth=str(pth), safetensors=str(safetensors), size=size)
    return weights_mb, {name: measure(body, **paths) for name, body in BODIES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_h", choices=sorted(OFFICIAL_BUILDERS))
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        weights_mb, results = run(args.size, folder)
    print(f"SAM {args.size}: {weights_mb:.0f} MB of fp32 weights, torch {torch.__version__}")
    print(f"{'path':32s} {'seconds':>8s} {'peak MB':>9s} {'peak / weights':>15s}")
    for name, numbers in results.items():
        print(
            f"{name:32s} {numbers['seconds']:8.2f} {numbers['peak_mb']:9.0f} {numbers['peak_mb'] / weights_mb:14.2f}x"
        )
    ours, reference = results["finesam load_sam(.safetensors)"], results["torch.load(.pth)"]
    print(f"finesam / torch.load time: {ours['seconds'] / reference['seconds']:.2f}x")


if __name__ == "__main__":
    main()
