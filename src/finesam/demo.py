"""The main job: find an official checkpoint, convert it, segment the example image.

Checkpoints are looked up in `$FINESAM_CHECKPOINT` (one file) or else in the cache directory
(`$FINESAM_HOME`, default `~/.cache/finesam`). Without one, the demo says what to download and exits 1.
"""

import os
import sys
from pathlib import Path

import numpy as np

from finesam.example import HOUSE_BOX, SUN_POINT, example_image
from finesam.overlay import overlay
from finesam.weights import atomic_write, convert_checkpoint, describe, load_sam

DOWNLOAD_ROOT = "https://dl.fbaipublicfiles.com/segment_anything/"
OFFICIAL_CHECKPOINTS = {  # smallest first: the demo prefers it
    "sam_vit_b_01ec64.pth": "SAM ViT-B, 375 MB",
    "sam_vit_l_0b3195.pth": "SAM ViT-L, 1.2 GB",
    "sam_vit_h_4b8939.pth": "SAM ViT-H, 2.4 GB",
}


def cache_dir() -> Path:
    return Path(os.environ.get("FINESAM_HOME") or Path.home() / ".cache" / "finesam")


def find_checkpoint() -> Path | None:
    """The checkpoint named by `$FINESAM_CHECKPOINT`, else the smallest official one in the cache directory."""
    if named := os.environ.get("FINESAM_CHECKPOINT"):
        path = Path(named).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"FINESAM_CHECKPOINT={named} does not exist")
        return path
    for name in OFFICIAL_CHECKPOINTS:
        for candidate in (cache_dir() / Path(name).with_suffix(".safetensors").name, cache_dir() / name):
            if candidate.is_file():
                return candidate
    return None


def instructions() -> str:
    cache = cache_dir()
    first = next(iter(OFFICIAL_CHECKPOINTS))
    lines = [
        "finesam demo: no SAM checkpoint found.",
        f"Looked for $FINESAM_CHECKPOINT and for these files in {cache} (set $FINESAM_HOME to change it):",
        *(f"  {name:24s} {what:20s} {DOWNLOAD_ROOT}{name}" for name, what in OFFICIAL_CHECKPOINTS.items()),
        "Download one (the smallest is enough), then run the demo again:",
        f"  mkdir -p {cache}",
        f"  curl -L -o {cache / first} {DOWNLOAD_ROOT}{first}",
        "  make demo",
    ]
    return "\n".join(lines)


def demo(out_dir: Path) -> int:
    try:
        checkpoint = find_checkpoint()
    except FileNotFoundError as e:
        print(f"finesam demo: {e}", file=sys.stderr)
        return 1
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
