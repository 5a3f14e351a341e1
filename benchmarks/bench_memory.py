"""Memory of predictions: peak RSS of one prediction (fp32 and bf16) and RSS drift over many predictions.

    python benchmarks/bench_memory.py [--size vit_h] [--count 50] [--drift-size vit_tiny]

Each measurement runs in a fresh process on a converted random-weight model of that size (the memory does
not depend on the values); bf16 is the bf16 mode (image encoder in bf16). Peak = VmHWM growth over the
resident model during the prediction; drift = RSS after the last of `count` predictions on different
images minus RSS after the fifth.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference")]
from finesam.weights import save_sam
from finesam.weights.loading import sam_from_state_dict

from official import build_official_tiny, random_official

CHILD = """
import json, sys, numpy as np, torch
from PIL import Image
from finesam.weights import load_sam

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024

model = load_sam({weights!r}, dtype={dtype})
for tensor in model.state_dict().values():
    tensor.reshape(-1)[::1024].float().sum()  # resident, as after any first use
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM: the peak of loading is not the prediction's
loaded = status("VmRSS")
rng = np.random.default_rng(0)
rss = []
for i in range({count}):
    image = Image.fromarray(rng.integers(0, 256, (1200, 1800, 3), dtype=np.uint8))
    with torch.inference_mode():
        model.predict(image, boxes=[100 + i, 200, 1500, 1000], multimask_output=True)
    rss.append(status("VmRSS"))
print(json.dumps({{"weights_mb": loaded, "peak_mb": status("VmHWM") - loaded, "rss": rss}}))
"""


def run(weights: Path, dtype: str, count: int) -> dict:
    script = CHILD.format(weights=str(weights), dtype=dtype, count=count)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def converted(size: str, folder: Path) -> Path:
    official = build_official_tiny() if size == "vit_tiny" else random_official(size)
    return save_sam(sam_from_state_dict(official.state_dict()), folder / f"{size}.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_h", choices=["vit_b", "vit_l", "vit_h", "vit_tiny"])
    parser.add_argument("--count", type=int, default=50, help="predictions for the drift measurement")
    parser.add_argument("--drift-size", default="vit_tiny", choices=["vit_b", "vit_l", "vit_h", "vit_tiny"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        weights = converted(args.size, Path(tmp))
        print(f"one prediction (box, multimask, 1800x1200 image), SAM {args.size}, torch {torch.__version__}")
        for dtype in ("torch.float32", "torch.bfloat16"):
            numbers = run(weights, dtype, 1)
            print(f"  {dtype:15s} model {numbers['weights_mb']:7.0f} MB resident, peak +{numbers['peak_mb']:.0f} MB")
        drift_weights = weights if args.drift_size == args.size else converted(args.drift_size, Path(tmp))
        rss = run(drift_weights, "torch.float32", args.count)["rss"]
        print(
            f"{args.count} predictions on different images, SAM {args.drift_size}: RSS after #5 {rss[4]:.0f} MB, "
            f"after #{args.count} {rss[-1]:.0f} MB (drift {rss[-1] - rss[4]:+.0f} MB)"
        )


if __name__ == "__main__":
    main()
