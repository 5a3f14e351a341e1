"""The main job: find (or download) an official checkpoint, convert it, segment the example image.

Checkpoints are looked up in `$FINESAM_CHECKPOINT` (one file) or else in the cache directory
(`$FINESAM_HOME`, default `~/.cache/finesam`). Without one, Light HQ-SAM (about 40 MB) is downloaded there
(unless `$FINESAM_OFFLINE` is set); if that fails too, the demo says what to download and exits 1.
With an HQ-SAM checkpoint the picture shows SAM's masks and HQ-SAM's side by side.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from finesam.cli.common import check_output_folder, inference
from finesam.cli.example import HOUSE_BOX, SUN_POINT, example_image
from finesam.cli.options import Commands, add_command
from finesam.cli.overlay import overlay
from finesam.model import SegmentAnything
from finesam.model.config import describe
from finesam.weights import atomic_write, convert_checkpoint, load_hq, load_sam
from finesam.weights.download import CHECKPOINTS, DownloadError, download

# smallest first: the demo prefers it
DEMO_CHECKPOINTS = [
    CHECKPOINTS[name]
    for name in ("sam_hq_vit_tiny", "mobile_sam", "sam_hq_vit_b", "sam_vit_b", "sam_vit_l", "sam_vit_h")
]


def cache_dir() -> Path:
    return Path(os.environ.get("FINESAM_HOME") or Path.home() / ".cache" / "finesam")


def find_checkpoint() -> Path | None:
    """The checkpoint named by `$FINESAM_CHECKPOINT`, else the smallest official one in the cache directory."""
    if named := os.environ.get("FINESAM_CHECKPOINT"):
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FINESAM_CHECKPOINT={named} does not exist")
        return path
    for checkpoint in DEMO_CHECKPOINTS:
        name = checkpoint.filename
        for candidate in (cache_dir() / Path(name).with_suffix(".safetensors").name, cache_dir() / name):
            if candidate.is_file():
                return candidate
    return None


def instructions(command: str = "demo", again: str = "make demo") -> str:
    """What to download from where, for `finesam COMMAND` run without a checkpoint; `again` runs it again."""
    cache = cache_dir()
    first = DEMO_CHECKPOINTS[0]
    lines = [
        f"finesam {command}: no SAM checkpoint found.",
        f"Looked for $FINESAM_CHECKPOINT and for these files in {cache} (set $FINESAM_HOME to change it):",
        *(f"  {c.filename:24s} {c.description:24s} {c.url}" for c in DEMO_CHECKPOINTS),
        f"Download one (the smallest is enough), then run {command} again:",
        f"  .venv/bin/finesam download {first.name}      (verified and resumable), or",
        f"  mkdir -p {cache} && curl -L -o {cache / first.filename} {first.url}",
        f"  {again}",
    ]
    return "\n".join(lines)


def demo(out_dir: Path) -> int:
    try:
        checkpoint = find_checkpoint()
    except FileNotFoundError as e:
        print(f"finesam demo: {e}", file=sys.stderr)
        return 1
    if checkpoint is None and not os.environ.get("FINESAM_OFFLINE"):
        first = DEMO_CHECKPOINTS[0]
        print(f"no checkpoint found: downloading {first.description} to {cache_dir()} ...", file=sys.stderr)
        try:
            checkpoint = download(first, cache_dir(), progress=True)
        except DownloadError as e:
            print(f"finesam demo: {e}", file=sys.stderr)
    if checkpoint is None:
        print(instructions(), file=sys.stderr)
        return 1
    weights, hq_weights = converted_checkpoint(checkpoint)
    model = load_sam(weights)
    adapter = load_hq(model, hq_weights) if hq_weights.is_file() else None
    print(f"model: {describe(model.config)}{' + HQ-SAM adapter' if adapter else ''}")
    image = example_image()
    panels = [("SAM", _segment(model, image))]
    if adapter is not None:
        adapter.inject()
        panels.append(("HQ-SAM", _segment(model, image)))
        adapter.eject()
    picture = _side_by_side(
        [(title, overlay(image, masks, boxes=[HOUSE_BOX], points=[(*SUN_POINT, 1)])) for title, (masks, _) in panels]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, img in (("example.png", image), ("demo_overlay.png", picture)):
        print(atomic_write(out_dir / name, lambda tmp, img=img: img.save(tmp, format="PNG")))
    for title, (_, report) in panels:
        print(f"{title}: {report}")
    return 0


def converted_checkpoint(checkpoint: Path) -> tuple[Path, Path]:
    """The converted base file (converting the checkpoint into the cache if needed) and its `.hq` sibling path."""
    if checkpoint.suffix != ".safetensors":
        converted = cache_dir() / checkpoint.with_suffix(".safetensors").name
        if not converted.is_file():
            print(f"converting {checkpoint} ...", file=sys.stderr)
            converted = convert_checkpoint(checkpoint, cache_dir()).written[0]
        print(f"weights: {converted}", file=sys.stderr)
        checkpoint = converted
    return checkpoint, checkpoint.with_name(checkpoint.name.replace(".safetensors", ".hq.safetensors"))


def _segment(model: SegmentAnything, image: Image.Image) -> tuple[list[np.ndarray], str]:
    """The house from its box and the sun from a click, with a one-line report (time, size, predicted IoU)."""
    start = time.perf_counter()
    embedding = model.encode_image(image)
    encoded = time.perf_counter()
    house, house_score = model.predict(embedding, boxes=HOUSE_BOX).best()
    sun, sun_score = model.predict(embedding, points=[SUN_POINT], multimask_output=True).best()
    decoded = time.perf_counter()
    masks = [house[0].cpu().numpy(), sun[0].cpu().numpy()]
    shares = [100 * np.count_nonzero(mask) / mask.size for mask in masks]
    report = (
        f"encoded in {encoded - start:.2f} s, 2 prompts in {decoded - encoded:.2f} s; house (box) {shares[0]:.1f}% "
        f"of the image, predicted IoU {house_score.item():.3f}; sun (click) {shares[1]:.1f}%, predicted IoU "
        f"{sun_score.item():.3f}"
    )
    return masks, report


def _side_by_side(panels: list[tuple[str, Image.Image]]) -> Image.Image:
    """Pictures next to each other, each titled in its top-left corner."""
    width, height = panels[0][1].size
    canvas = Image.new("RGB", (width * len(panels), height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, picture) in enumerate(panels):
        canvas.paste(picture, (i * width, 0))
        draw.rectangle([(i * width, 0), (i * width + 12 + 9 * len(title), 24)], fill="black")
        draw.text((i * width + 6, 6), title, fill="white")
    return canvas


@inference
def run_demo(args: argparse.Namespace) -> None:
    check_output_folder(args.out_dir, "--out-dir")
    raise SystemExit(demo(args.out_dir))


def add_commands(commands: Commands) -> None:
    command = add_command(commands, "demo", "segment the example image (finds or downloads a checkpoint)")
    command.add_argument("--out-dir", type=Path, default=Path("out"), help="where the pictures go")
    command.set_defaults(run=run_demo, large_tensors=True)
