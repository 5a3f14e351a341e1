"""Prompt latency of `finesam serve` over HTTP, as the page sees it: p50 / p95 of one box (and one click) per
request on a cached image, with and without HQ-SAM, for ViT-B and TinyViT (Light HQ-SAM).

    python benchmarks/bench_serve.py [--prompts 60] [--sizes vit_b,vit_tiny] [--soak 500]

Random weights converted from the official package (the speed does not depend on their values); a real server
subprocess on 127.0.0.1; the first request of an image (which encodes it) is reported apart. `--soak N` sends N
more prompts and reports the server's RSS growth.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference")]
from finesam.model.config import SAM_VIT_B
from finesam.weights import convert_checkpoint

from official import build_official, build_official_tiny
from served import Served


def photo() -> Image.Image:
    shared = Path(__file__).resolve().parents[2] / "shared" / "images"
    found = sorted(p for p in shared.glob("*.jp*g")) if shared.is_dir() else []
    if found:
        return Image.open(found[0]).convert("RGB")
    from skimage import data

    return Image.fromarray(data.coffee()).resize((1800, 1200))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--sizes", default="vit_b,vit_tiny")
    parser.add_argument("--soak", type=int, default=0)
    args = parser.parse_args()
    image = photo()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes.split(","):
            official = build_official(SAM_VIT_B, seed=0, hq=True) if size == "vit_b" else build_official_tiny(seed=0)
            checkpoint = Path(folder) / f"{size}.pth"
            torch.save(official.state_dict(), checkpoint)
            del official
            base, hq = convert_checkpoint(checkpoint, folder).written
            server = Served("--weights", base, "--hq", hq)
            try:
                buffer = Path(folder) / "photo.png"
                image.save(buffer)
                status, answer = server.upload(buffer.read_bytes(), "photo.png")
                assert status == 200, answer
                path = f"/api/images/{answer['id']}/masks"
                width, height = image.size
                box = [0.2 * width, 0.2 * height, 0.7 * width, 0.8 * height]
                start = time.perf_counter()
                first = server.call("POST", path, {"box": box})[1]
                rows.append((size, "first prompt (encodes)", 1000 * (time.perf_counter() - start), first["encode_ms"]))
                for hq_on in (False, True):
                    for kind in ("box", "click"):
                        times = []
                        for i in range(args.prompts):
                            moved = i % 7  # a new prompt each time, as a person's clicks are
                            if kind == "box":
                                shifted: dict = {"box": [v + moved for v in box]}
                            else:
                                shifted = {"points": [[width / 2 + moved, height / 2 + moved]]}
                            start = time.perf_counter()
                            status, answer = server.call("POST", path, {**shifted, "hq": hq_on})
                            times.append(1000 * (time.perf_counter() - start))
                            assert status == 200, answer
                        times.sort()
                        p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                        name = f"{kind}, {'HQ-SAM' if hq_on else 'SAM'}"
                        rows.append((size, name, statistics.median(times), p95))
                if args.soak:
                    before = rss_mb(server.process.pid)
                    for i in range(args.soak):
                        server.call("POST", path, {"box": [b + i % 11 for b in box], "hq": bool(i % 2)})
                    print(
                        f"{size}: soak of {args.soak} prompts, server RSS {before:.0f} -> "
                        f"{rss_mb(server.process.pid):.0f} MB"
                    )
            finally:
                server.close()
    print("| model | request | p50 ms | p95 ms (first prompt: encode ms) |")
    print("|---|---|---:|---:|")
    for size, name, p50, p95 in rows:
        print(f"| {size} | {name} | {p50:.1f} | {p95:.1f} |")
    print(json.dumps({"image": list(image.size), "prompts": args.prompts}))


if __name__ == "__main__":
    main()
