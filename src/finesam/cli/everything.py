"""`finesam everything`: automatic mask generation."""

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from finesam.amg import AutomaticMaskGenerator, rle_to_mask, to_coco
from finesam.cli.common import (
    UsageError,
    check_distinct_paths,
    check_output_folder,
    inference,
    load_model,
    save_mask,
    write_json,
)
from finesam.cli.dataset_runs import Segmenter, labelling_options, refuse_labelling_options
from finesam.cli.labelling import run_labelling
from finesam.cli.options import (
    Commands,
    add_command,
    generator_arguments,
    generator_options,
    lora_options,
    model_options,
)
from finesam.cli.overlay import distinct_colours, overlay
from finesam.inputs import as_rgb, open_image
from finesam.labelling import images_of, is_image_file
from finesam.labelling.segmenters import everything_objects
from finesam.model import SegmentAnything
from finesam.weights import atomic_write, check_output


@inference
def run_everything(args: argparse.Namespace) -> None:
    options = {**generator_arguments(args), "use_m2m": args.use_m2m}
    AutomaticMaskGenerator.check_options(**options)  # before the model loads
    if args.source.is_dir() or (args.source.is_file() and not is_image_file(args.source)):
        run_everything_on_dataset(args, options)
        return
    refuse_labelling_options(args, "use --format")
    image = as_rgb(open_image(args.source))
    check_output_folder(args.out, "--out")
    outputs = [("--out", check_output(args.out / name)) for name in ("masks.json", "overlay.png")]
    check_distinct_paths(outputs, [("IMAGE", args.source), ("--weights", args.weights)])  # before the model loads
    if args.source.resolve().is_relative_to((args.out / "masks").resolve()):
        raise UsageError(f"{args.source} is in {args.out / 'masks'}, where the masks are written: use another --out")
    model = load_model(args)
    records = AutomaticMaskGenerator(model, **options, output_mode="uncompressed_rle").generate(
        image, progress=not args.quiet
    )
    annotations: list[dict[str, Any]] = []
    masks: list[np.ndarray] = []
    for i, record in enumerate(records):
        rle = record["segmentation"]
        assert not isinstance(rle, np.ndarray)  # output_mode="uncompressed_rle"
        masks.append(rle_to_mask(rle))
        annotation: dict[str, Any] = {"id": i, **{k: v for k, v in record.items() if k != "segmentation"}}
        if args.format in ("png", None):
            name = f"masks/{i:04d}.png"
            save_mask(masks[-1], args.out / name)
            annotation["file"] = name
        else:
            annotation["segmentation"] = to_coco(rle)
        annotations.append(annotation)
    _remove_stale_masks(args.out, {a["file"] for a in annotations if "file" in a})
    document = {
        "image": {"file_name": args.source.name, "height": image.height, "width": image.width},
        "annotations": annotations,
    }
    print(f"{write_json(document, args.out / 'masks.json')}\t{len(records)} masks")
    order = sorted(range(len(records)), key=lambda i: -records[i]["area"])  # small masks drawn on top
    colours = distinct_colours(len(records))
    picture = overlay(image, [masks[i] for i in order], alpha=0.6, colours=[colours[i] for i in order])
    print(atomic_write(args.out / "overlay.png", lambda tmp: picture.save(tmp, format="PNG")))


def run_everything_on_dataset(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """Every image of a folder or list into OUT/annotations.json (see `finesam.cli.labelling`)."""
    if args.format is not None:
        raise UsageError("--format is for one image; a folder or list is written as OUT/annotations.json (COCO)")
    if args.source.is_dir() and args.source.resolve().is_relative_to(args.out.resolve()):
        # the scan leaves the output folder out (its mask PNGs are not inputs): nothing would be left
        where = "is" if args.source.resolve() == args.out.resolve() else "holds"
        raise UsageError(
            f"--out {args.out} {where} the input folder {args.source}: give another --out (a folder inside the "
            "input is fine: the scan leaves it out)"
        )
    try:
        jobs = images_of(
            args.source, exclude=args.out, report=lambda line: print(f"finesam everything: {line}", file=sys.stderr)
        )
    except ValueError as e:
        raise UsageError(str(e)) from None

    def segmenter(model: SegmentAnything) -> Segmenter:
        generator = AutomaticMaskGenerator(model, **options, output_mode="uncompressed_rle")
        return lambda image, job: everything_objects(generator, image)

    run_labelling(args, jobs, "everything", options, segmenter)


def _remove_stale_masks(out: Path, written: set[str]) -> None:
    """The mask files an earlier run recorded in `out/masks.json` that this run did not write again; files
    that no masks.json of ours names are never touched."""
    try:
        earlier = json.loads((out / "masks.json").read_text())["annotations"]
        recorded = {a["file"] for a in earlier if isinstance(a, dict) and isinstance(a.get("file"), str)}
    except (OSError, ValueError, KeyError, TypeError):
        return
    for name in recorded - written:
        path = out / name
        if re.fullmatch(r"masks/\d{4,}\.png", name) and path.is_file():
            path.unlink()


def add_commands(commands: Commands) -> None:
    everything = add_command(
        commands,
        "everything",
        "segment everything: automatic masks from a grid of points (official SamAutomaticMaskGenerator, or "
        "SAM2AutomaticMaskGenerator with a SAM 2 model, each with its defaults)",
        (model_options(), lora_options(), generator_options(), labelling_options()),
    )
    everything.add_argument(
        "source",
        type=Path,
        metavar="IMAGE|DIR|LIST",
        help="an image (any format PIL reads), a folder of images (recursive) or a text file of image paths",
    )
    everything.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    everything.add_argument(
        "--use-m2m",
        action="store_true",
        help="refine every mask once, fed back as a mask input with its point (SAM2AutomaticMaskGenerator's "
        "use_m2m; any model)",
    )
    everything.add_argument(
        "--format",
        choices=["png", "coco"],
        help="one image: png (DIR/masks/0000.png ... and DIR/masks.json, the default) or coco (DIR/masks.json "
        "with COCO RLE); folders and lists: always DIR/annotations.json",
    )
    everything.set_defaults(run=run_everything)
