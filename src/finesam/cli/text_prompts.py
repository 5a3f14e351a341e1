"""`finesam segment --text`: masks of what phrases name, a zero-shot detector of HF transformers finding the
boxes (Grounded SAM; Grounded HQ-SAM with --hq), for one image or for a whole folder or list of images."""

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from finesam.cli.common import (
    DTYPES,
    UsageError,
    check_distinct_paths,
    load_model,
    write_json,
)
from finesam.cli.dataset_runs import Segmenter
from finesam.cli.labelling import run_labelling
from finesam.cli.options import positive_int
from finesam.cli.overlay import overlay
from finesam.cli.prompting import MaskWriter, mask_outputs
from finesam.detection import (
    DEFAULT_DETECTOR,
    Detection,
    DetectorError,
    TextDetector,
    check_detector_source,
    parse_phrases,
)
from finesam.devices import usable_device
from finesam.inputs import DECODER_BATCH, as_rgb, open_image
from finesam.labelling import ImageJob, SegmentedObject, images_of, is_image_file
from finesam.labelling.segmenters import text_objects
from finesam.model import SegmentAnything
from finesam.weights import atomic_write, check_output
from finesam.weights.download import sha256_of


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


def text_options() -> argparse.ArgumentParser:
    """--text, --detector, --box-threshold, --text-threshold, --max-detections, --detections."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("text prompts (pip install 'finesam[text]')")
    group.add_argument(
        "--text",
        metavar='"A DOG. A CAT."',
        help="segment what these phrases name (separated by dots): a zero-shot detector finds their boxes, one "
        "mask per box; with a folder or list of images, the phrases are the COCO categories",
    )
    group.add_argument(
        "--detector",
        metavar="HUB_ID|DIR",
        help="the detector: a Hub id or a local folder of any transformers zero-shot object detector (Grounding "
        f"DINO, OWLv2, OWL-ViT, ...; default: {DEFAULT_DETECTOR})",
    )
    group.add_argument(
        "--box-threshold",
        type=_threshold,
        metavar="T",
        help="keep boxes scored above T (the post-processing's threshold; default: the detector's own, 0.25 for "
        "Grounding DINO, 0.1 for OWL)",
    )
    group.add_argument(
        "--text-threshold",
        type=_threshold,
        metavar="T",
        help="Grounding DINO: a box is named by a phrase whose tokens score above T, else left out (default 0.25)",
    )
    group.add_argument(
        "--max-detections", type=positive_int, metavar="N", help="keep at most N boxes per image (the best scores)"
    )
    group.add_argument(
        "--detections",
        type=Path,
        metavar="FOUND.json",
        help="one image: write the detections (label, score, box, predicted_iou, mask file), in mask order",
    )
    return options


def load_detector(args: argparse.Namespace) -> TextDetector:
    """The detector of --detector on --device, in --dtype (float32 for int8, which is the encoder's only)."""
    try:
        device = usable_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device {args.device} {e}") from None
    dtype = DTYPES.get(args.dtype, torch.float32)
    try:
        detector = TextDetector.load(args.detector, device, dtype)
        detector.check_thresholds(args.box_threshold, args.text_threshold)
    except DetectorError as e:
        raise UsageError(f"--detector: {e}") from None
    return detector


def _phrases(args: argparse.Namespace) -> list[str]:
    try:
        return parse_phrases(args.text)
    except ValueError as e:
        raise UsageError(f"--text: {e}") from None


def _detect(
    detector: TextDetector, image: Image.Image, phrases: list[str], args: argparse.Namespace
) -> list[Detection]:
    return detector.detect(image, phrases, args.box_threshold, args.text_threshold, args.max_detections)


def is_dataset(source: Path) -> bool:
    """A folder, or a file that is not an image (a list of images)."""
    return source.is_dir() or (source.is_file() and not is_image_file(source))


def run_text(args: argparse.Namespace) -> None:
    """`segment IMAGE --text ...` or `segment DIR_OR_LIST --text ... --out DIR`."""
    given = [
        option
        for option, value in (
            ("--manifest", args.manifest),
            ("--prompts", args.prompts),
            ("--box", args.box),
            ("--point", args.point),
        )
        if value
    ]
    if given:
        raise UsageError(f"--text finds the boxes: drop {', '.join(given)}")
    if args.image is None:
        raise UsageError("give the IMAGE (or a folder or list of images) to segment with --text")
    phrases = _phrases(args)
    try:  # before anything loads or a dataset run records its folder
        args.detector = check_detector_source(args.detector or DEFAULT_DETECTOR)
    except DetectorError as e:
        raise UsageError(f"--detector: {e}") from None
    if is_dataset(args.image):
        run_text_dataset(args, phrases)
    else:
        run_text_image(args, phrases)


def run_text_image(args: argparse.Namespace, phrases: list[str]) -> None:
    if any((args.polygons, args.png, args.keep_empty, args.overwrite)):
        raise UsageError("--polygons, --png, --keep-empty, --overwrite: for a folder or list of images")
    image = as_rgb(open_image(args.image))
    _check_outputs(args, 1)  # the kinds and places of the outputs, before anything loads
    detector = load_detector(args)
    detections = _detect(detector, image, phrases, args)
    _check_outputs(args, len(detections))
    if not detections:
        box, text = detector.check_thresholds(args.box_threshold, args.text_threshold)
        thresholds = f"box threshold {box}" + (f", text threshold {text}" if text is not None else "")
        print(
            f"finesam segment: nothing found for {'. '.join(phrases)}. ({thresholds}): no mask written", file=sys.stderr
        )
    model = load_model(args) if detections else None
    records: list[dict[str, Any]] = []
    writer = MaskWriter(args, len(detections))
    if model is not None:
        embedding = model.encode_image(image)
        resize = (embedding.input_size, embedding.original_size)
        for start in range(0, len(detections), DECODER_BATCH):
            chosen = detections[start : start + DECODER_BATCH]
            low_res, iou = model.decode_prompts(
                embedding, boxes=[list(d.box) for d in chosen], multimask_output=args.multimask
            )
            scores, best = iou.max(dim=1)
            for j, detection in enumerate(chosen):  # upsampled one at a time, as `segment` does
                values = model.postprocess(low_res[j : j + 1, int(best[j]) : int(best[j]) + 1], *resize)
                said = f"{detection.label}\tscore {detection.score:.4f}\tpredicted IoU {scores[j].item():.4f}"
                mask_path = writer.write(values[0, 0].float().cpu().numpy(), said)
                records.append({**detection.as_json(), "predicted_iou": scores[j].item(), "mask": mask_path.name})
    if args.detections is not None:
        print(write_json(records, args.detections))
    if args.overlay is not None:
        boxes = [list(d.box) for d in detections]
        labels = [f"{d.label} {d.score:.2f}" for d in detections]
        picture = overlay(image, writer.drawn, boxes=boxes, labels=labels)
        print(atomic_write(args.overlay, lambda tmp: picture.save(tmp, format="PNG")))


def _check_outputs(args: argparse.Namespace, total: int) -> None:
    """Every file `segment IMAGE --text` writes for `total` detections: of the right kind, writable, and none of
    them an input or another output."""
    outputs = mask_outputs(args, max(total, 1))
    for option, path in (("--overlay", args.overlay), ("--detections", args.detections)):
        if path is not None:
            outputs.append((option, check_output(path)))
    inputs = [("IMAGE", args.image), ("--weights", args.weights)]
    inputs += [(option, path) for option, path in (("--hq", args.hq),) if path is not None]
    inputs += [("--lora", path) for path in args.lora]
    check_distinct_paths(outputs, inputs)


def detector_identity(source: str) -> dict[str, Any]:
    """What a dataset run's results depend on of the detector: its id, and for a local folder the SHA-256 of
    each of its files (a folder saved again with other weights is not the same detector)."""
    folder = Path(source)
    if not folder.is_dir():
        return {"detector": source}
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"detector": source, "detector_files": {p.name: sha256_of(p) for p in files}}


def run_text_dataset(args: argparse.Namespace, phrases: list[str]) -> None:
    """Every image of a folder or list into OUT/annotations.json, one category per phrase (see
    `finesam.cli.labelling`: resumable, shared out under torchrun)."""
    given = [
        option
        for option, value in (("--logits", args.logits), ("--overlay", args.overlay), ("--detections", args.detections))
        if value
    ]
    if given:
        raise UsageError(f"{', '.join(given)}: for one image; a folder or list is written as OUT/annotations.json")
    if args.image.is_dir() and args.image.resolve().is_relative_to(args.out.resolve()):
        raise UsageError(f"--out {args.out} is or holds the input folder {args.image}: give another --out")
    try:
        jobs = images_of(
            args.image, exclude=args.out, report=lambda line: print(f"finesam segment: {line}", file=sys.stderr)
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    options = {
        "text": phrases,
        **detector_identity(args.detector),
        "box_threshold": args.box_threshold,
        "text_threshold": args.text_threshold,
        "max_detections": args.max_detections,
        "multimask": args.multimask,
    }

    def segmenter(model: SegmentAnything) -> Segmenter:
        detector = load_detector(args)  # on the device this process of the run was given

        def segment(image: Image.Image, job: ImageJob) -> list[SegmentedObject]:
            return text_objects(
                model,
                detector,
                image,
                phrases,
                args.box_threshold,
                args.text_threshold,
                args.max_detections,
                args.multimask,
            )

        return segment

    categories = {i + 1: phrase for i, phrase in enumerate(phrases)}
    run_labelling(args, jobs, "segment", options, segmenter, categories)
