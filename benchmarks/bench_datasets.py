"""Dataset throughput: `finesam everything DIR` and `finesam segment --manifest` in images per hour, one process
against two under torchrun, for ViT-B (SAM) and TinyViT (Light HQ-SAM); and `finesam eval` time per image at
DIS size (2048 x 1365), with the share of the metric.

    python benchmarks/bench_datasets.py [--models vit_b,tiny] [--images 6] [--points-per-side 32] [--skip eval]

The images are the benchmark photos (`$FINESAM_BENCH_IMAGES`, see bench.py), repeated to `--images`. Weights
are random (official builders, `official.structured` so that masks follow the photo); as in tests/test_amg.py
the IoU and stability thresholds are lowered so that masks survive (random weights predict low IoUs), which
makes the generator do the post-processing a trained model makes it do. The manifest holds 20 boxes per image of
random sizes and places (seeded), as an object detector would give.

The commands run as subprocesses, as a user runs them; the times are those of the summary line (model loaded
to annotations.json written), so process start-up and model loading are left out. Two processes get one
thread each (torchrun's default), one process gets both cores.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference"), str(Path(__file__).resolve().parent)]
from finesam.evaluation.evaluate import Configuration, adapter_configuration, evaluate
from finesam.evaluation.metrics import boundary_iou, mask_iou
from finesam.weights import load_hq, load_sam

from bench import median_ms, photos
from official import build_official_tiny, random_official, structured

GENERATOR = ["--pred-iou-thresh", "0.1", "--stability-score-thresh", "0.3", "--stability-score-offset", "0.01"]
BOXES_PER_IMAGE = 20
DIS_SIZE = (2048, 1365)
FINESAM = [sys.executable, "-m", "finesam.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "finesam.cli"]
SUMMARY = re.compile(r"(\d+) images, (\d+) masks, (\d+) failed, ([\d.]+) s")


def run(command: list[str], processes: int) -> tuple[int, int, float]:
    """(images, masks, seconds) of a labelling command's summary line."""
    launcher = FINESAM if processes == 1 else TORCHRUN
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if processes > 1 else dict(os.environ)
    result = subprocess.run([*launcher, *command, "--quiet"], capture_output=True, text=True, env=env)
    found = SUMMARY.search(result.stdout)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    return int(found[1]), int(found[2]), float(found[4])


def make_images(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True)
    available = photos()
    for i in range(count):
        available[i % len(available)].save(folder / f"{i:03d}.jpg", quality=95)
    return folder


def detector_manifest(images: Path, path: Path) -> Path:
    """BOXES_PER_IMAGE boxes per image, of random sizes and places (seeded): what an object detector gives."""
    rng = np.random.default_rng(0)
    lines = []
    for image in sorted(images.glob("*.jpg")):
        with Image.open(image) as opened:
            width, height = opened.size
        sizes = rng.uniform(0.1, 0.6, (BOXES_PER_IMAGE, 2)) * (width, height)
        corners = rng.uniform(0, 1, (BOXES_PER_IMAGE, 2)) * ((width, height) - sizes)
        boxes = np.concatenate([corners, corners + sizes], axis=1).round(1).tolist()
        lines.append(json.dumps({"image": image.name, "boxes": boxes}))
    path.write_text("\n".join(lines) + "\n")
    return path


def weights(model: str, folder: Path) -> Path:
    path = folder / f"{model}.pth"
    official = structured(random_official("vit_b") if model == "vit_b" else build_official_tiny())
    torch.save(official.state_dict(), path)
    return path


def throughput(model: str, images: Path, work: Path, points_per_side: int) -> None:
    checkpoint = weights(model, work)
    name = "ViT-B (SAM)" if model == "vit_b" else "TinyViT (Light HQ-SAM)"
    grid = ["--points-per-side", str(points_per_side), *GENERATOR]
    rows = []
    for processes in (1, 2):
        out = work / f"{model}-everything-{processes}"
        command = ["everything", str(images), "--weights", str(checkpoint), "--out", str(out), *grid]
        rows.append(("everything", processes, *run(command, processes)))
    manifest = detector_manifest(images, images / "boxes.jsonl")  # paths relative to the manifest
    for processes in (1, 2):
        out = work / f"{model}-manifest-{processes}"
        command = ["segment", "--manifest", str(manifest), "--weights", str(checkpoint), "--out", str(out)]
        rows.append(("manifest", processes, *run(command, processes)))
    one = {job: seconds for job, processes, _, _, seconds in rows if processes == 1}
    prompts = {"everything": points_per_side**2, "manifest": BOXES_PER_IMAGE}  # per image
    for job, processes, count, masks, seconds in rows:
        per_prompt = seconds / (count * prompts[job]) * 1000
        print(
            f"| {name} | {job} | {processes} | {count} | {masks} | {seconds:.1f} s | {count / seconds * 3600:.0f} | "
            f"{per_prompt:.0f} ms | {one[job] / seconds:.2f}x |",
            flush=True,
        )


def eval_at_dis_size(images: list[Image.Image], work: Path, count: int) -> None:
    """finesam eval (base and HQ, ViT-B, box prompts) on `count` images at 2048 x 1365 with one object each."""
    data = work / "dis"
    (data / "im").mkdir(parents=True)
    (data / "gt").mkdir()
    for i in range(count):
        image = images[i % len(images)].resize(DIS_SIZE, Image.Resampling.BICUBIC)
        image.save(data / "im" / f"{i:03d}.jpg", quality=95)
        silhouette = np.asarray(image.convert("L")) > 128
        Image.fromarray(np.where(silhouette, 255, 0).astype(np.uint8)).save(data / "gt" / f"{i:03d}.png")
    checkpoint = work / "vit_b_hq.pth"
    torch.save(random_official("vit_b", hq=True).state_dict(), checkpoint)
    model = load_sam(checkpoint)
    hq = load_hq(model, checkpoint)
    configurations: list[Configuration] = [
        adapter_configuration("base", []),
        adapter_configuration("hq", [hq]),
    ]
    started = time.perf_counter()
    with torch.inference_mode():
        evaluate(model, configurations, data)
    per_image = (time.perf_counter() - started) / count
    mask = torch.from_numpy(np.asarray(Image.open(data / "gt" / "000.png")) > 0)
    shifted = torch.roll(mask, (5, -7), dims=(0, 1))
    metric = median_ms(lambda: (boundary_iou(shifted, mask), mask_iou(shifted, mask)), 5)
    print(
        f"\nfinesam eval, ViT-B, configurations base + hq, {count} images at {DIS_SIZE[0]} x {DIS_SIZE[1]}: "
        f"{per_image:.1f} s per image (both configurations); IoU + boundary IoU of one mask pair: {metric:.0f} ms "
        f"({2 * metric / 1000 / per_image:.1%} of the time per image)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_b,tiny")
    parser.add_argument("--images", type=int, default=6, help="images per run (the photos repeated)")
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--eval-images", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated: throughput, eval")
    args = parser.parse_args()
    skipped = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="finesam-bench-datasets-"))
    try:
        images = make_images(work / "images", args.images)
        if "throughput" not in skipped:
            print(
                f"{args.images} photos, {args.points_per_side}x{args.points_per_side} points, CPU threads: 2\n",
                flush=True,
            )
            print("| model | job | processes | images | masks | time | images/hour | per prompt | vs 1 process |")
            print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
            for model in args.models.split(","):
                throughput(model, images, work, args.points_per_side)
        if "eval" not in skipped:
            eval_at_dis_size(photos(), work, args.eval_images)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
