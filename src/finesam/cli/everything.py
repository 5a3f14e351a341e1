"""`finesam everything`: automatic mask generation."""

import argparse
import inspect
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finesam.amg import AutomaticMaskGenerator, rle_to_mask, to_coco
from finesam.cli.common import DTYPES, UsageError, load_model, save_mask, write_json
from finesam.cli.overlay import distinct_colours, overlay
from finesam.model.processing import as_rgb
from finesam.weights import atomic_write


def run_everything(args: argparse.Namespace) -> None:
    try:
        image = as_rgb(Image.open(args.image))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read image {args.image}: {e}") from None
    options = {
        name: getattr(args, name)
        for name in (
            "points_per_side",
            "points_per_batch",
            "pred_iou_thresh",
            "stability_score_thresh",
            "stability_score_offset",
            "box_nms_thresh",
            "crop_n_layers",
            "crop_nms_thresh",
            "min_mask_region_area",
        )
    }
    AutomaticMaskGenerator.check_options(**options)  # before the model loads
    model = load_model(args)
    records = AutomaticMaskGenerator(model, **options, output_mode="uncompressed_rle").generate(image)
    annotations: list[dict[str, Any]] = []
    masks: list[np.ndarray] = []
    for i, record in enumerate(records):
        rle = record["segmentation"]
        assert not isinstance(rle, np.ndarray)  # output_mode="uncompressed_rle"
        masks.append(rle_to_mask(rle))
        annotation: dict[str, Any] = {"id": i, **{k: v for k, v in record.items() if k != "segmentation"}}
        if args.format == "png":
            name = f"masks/{i:04d}.png"
            save_mask(masks[-1], args.out / name)
            annotation["file"] = name
        else:
            annotation["segmentation"] = to_coco(rle)
        annotations.append(annotation)
    if args.format == "png":
        _remove_stale_masks(args.out / "masks", len(records))
    document = {
        "image": {"file_name": args.image.name, "height": image.height, "width": image.width},
        "annotations": annotations,
    }
    print(f"{write_json(document, args.out / 'masks.json')}\t{len(records)} masks")
    order = sorted(range(len(records)), key=lambda i: -records[i]["area"])  # small masks drawn on top
    colours = distinct_colours(len(records))
    picture = overlay(image, [masks[i] for i in order], alpha=0.6, colours=[colours[i] for i in order])
    print(atomic_write(args.out / "overlay.png", lambda tmp: picture.save(tmp, format="PNG")))


def _remove_stale_masks(directory: Path, count: int) -> None:
    """Mask files of an earlier run into the same directory that this run did not overwrite."""
    for path in directory.glob("[0-9][0-9][0-9][0-9]*.png"):
        if path.stem.isdigit() and int(path.stem) >= count:
            path.unlink()


def add_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    everything = commands.add_parser(
        "everything",
        help="segment everything: automatic masks from a grid of points (official SamAutomaticMaskGenerator)",
    )
    everything.add_argument("image", type=Path)
    everything.add_argument("--weights", type=Path, required=True, help="converted .safetensors or official .pth")
    everything.add_argument(
        "--hq", type=Path, metavar="HQ.safetensors", help="inject the HQ-SAM adapter with these weights"
    )
    everything.add_argument("--hq-only", action="store_true", help="with HQ-SAM: the HQ mask alone")
    everything.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    everything.add_argument(
        "--format",
        choices=["png", "coco"],
        default="png",
        help="png: DIR/masks/0000.png ... and DIR/masks.json; coco: DIR/masks.json with COCO RLE (default: png)",
    )
    for name, kind in (
        ("points_per_side", int),
        ("points_per_batch", int),
        ("pred_iou_thresh", float),
        ("stability_score_thresh", float),
        ("stability_score_offset", float),
        ("box_nms_thresh", float),
        ("crop_n_layers", int),
        ("crop_nms_thresh", float),
        ("min_mask_region_area", int),
    ):
        default = inspect.signature(AutomaticMaskGenerator).parameters[name].default
        everything.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"(default: {default:g})"
        )
    everything.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default: cpu)")
    everything.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="image-encoder precision (the decoder stays fp32)"
    )
    everything.set_defaults(run=run_everything)
