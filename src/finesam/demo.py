"""The main job: find (or download) an official checkpoint, convert it, segment the example image.

Checkpoints are looked up in `$FINESAM_CHECKPOINT` (one file) or else in the cache directory
(`$FINESAM_HOME`, default `~/.cache/finesam`). Without one, SAM ViT-B is downloaded there (unless
`$FINESAM_OFFLINE` is set); if that fails too, the demo says what to download and exits 1.
"""

import os
import sys
from pathlib import Path

import numpy as np

from finesam.download import CHECKPOINTS, DownloadError, download
from finesam.example import HOUSE_BOX, SUN_POINT, example_image
from finesam.overlay import overlay
from finesam.weights import atomic_write, convert_checkpoint, describe, load_sam

# smallest first: the demo prefers it
DEMO_CHECKPOINTS = [CHECKPOINTS[name] for name in ("sam_vit_b", "sam_vit_l", "sam_vit_h")]


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


def instructions() -> str:
    cache = cache_dir()
    first = DEMO_CHECKPOINTS[0]
    lines = [
        "finesam demo: no SAM checkpoint found.",
        f"Looked for $FINESAM_CHECKPOINT and for these files in {cache} (set $FINESAM_HOME to change it):",
        *(
            f"  {c.filename:24s} {c.description:10s} {c.size / 1e6:6.0f} MB  {c.url}"
            for c in DEMO_CHECKPOINTS
            if c.size
        ),
        "Download one (the smallest is enough), then run the demo again:",
        f"  .venv/bin/finesam download {first.name}      (verified and resumable), or",
        f"  mkdir -p {cache} && curl -L -o {cache / first.filename} {first.url}",
        "  make demo",
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
    if checkpoint.suffix != ".safetensors":
        converted = cache_dir() / checkpoint.with_suffix(".safetensors").name
        if not converted.is_file():
            print(f"converting {checkpoint} ...")
            converted = convert_checkpoint(checkpoint, cache_dir()).written[0]
        print(f"weights: {converted}")
        checkpoint = converted
    model = load_sam(checkpoint)
    print(f"model: {describe(model)}")
    image = example_image()
    embedding = model.encode_image(image)
    by_box = model.predict(embedding, boxes=HOUSE_BOX)
    by_point = model.predict(embedding, points=[SUN_POINT], multimask_output=True)
    house, house_score = by_box.best()
    sun, sun_score = by_point.best()
    masks = [house[0].cpu().numpy(), sun[0].cpu().numpy()]
    picture = overlay(image, masks, boxes=[HOUSE_BOX], points=[(*SUN_POINT, 1)])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, img in (("example.png", image), ("demo_overlay.png", picture)):
        print(atomic_write(out_dir / name, lambda tmp, img=img: img.save(tmp, format="PNG")))
    for what, mask, score in (("house (box)", masks[0], house_score), ("sun (click)", masks[1], sun_score)):
        share = 100 * np.count_nonzero(mask) / mask.size
        print(f"{what}: {share:.1f}% of the image, predicted IoU {score.item():.3f}")
    return 0
