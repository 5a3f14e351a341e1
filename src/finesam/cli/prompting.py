"""`finesam segment`'s prompts and outputs, and the options of its torch-free ONNX path, declared once (argparse
parents) for the torch model's command and for `segment --onnx` (finesam.cli.onnx_segment). No torch here."""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from finesam.cli.basics import (
    UsageError,
    check_logits_output,
    check_mask_output,
    floats,
    positive_int,
    save_array,
    save_mask,
    suffixed,
)
from finesam.cli.overlay import overlay
from finesam.files import atomic_write
from finesam.inputs import JSON_PROMPT_KEYS, MASK_THRESHOLD, JsonPrompts, parse_json_prompts, read_text_input
from finesam.onnx.runtimes import F32, ONNXRUNTIME, PRECISIONS, RUNTIMES


def _box(text: str) -> list[float]:
    return floats(text, (4,), "--box X1,Y1,X2,Y2")


def _point(text: str) -> list[float]:
    values = floats(text, (2, 3), "--point X,Y[,LABEL]")
    if len(values) == 3 and values[2] not in (0, 1):
        raise argparse.ArgumentTypeError(f"--point LABEL must be 1 (foreground) or 0 (background), got {text!r}")
    return values if len(values) == 3 else [*values, 1.0]


PROMPT_KEYS = JSON_PROMPT_KEYS | {"multimask"}


@dataclass(frozen=True)
class SegmentPrompt:
    """One prompt of the command line or of a prompts file: its objects (one mask each, or three with
    multimask) and its own multimask choice (None: the command's --multimask)."""

    objects: JsonPrompts
    multimask: bool | None = None


def read_prompt_file(path: Path) -> list[SegmentPrompt]:
    """Prompts from JSON: a list (or {"prompts": [...]}) of objects in the JSON prompt dialect
    (docs/prompting.md: "box" or "boxes", "points", "labels"), each with an optional "multimask": bool.

    Raises:
        UsageError: the file cannot be read, or a prompt is malformed (the message names it by its position).
    """
    try:
        data = json.loads(read_text_input(path, "prompts"))
    except ValueError as e:  # unreadable (its message names the file), or not JSON
        detail = str(e) if not isinstance(e, json.JSONDecodeError) else f"not JSON: {e}"
        raise UsageError(f"cannot read prompts from {path}: {detail}") from None
    prompts = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(prompts, list) or not prompts:
        raise UsageError(f'{path}: expected a non-empty list of prompts (or {{"prompts": [...]}})')
    read = []
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, dict):
            raise UsageError(f'{path}: prompt {i}: expected an object with "box" and/or "points"')
        if unknown := sorted(prompt.keys() - PROMPT_KEYS):
            raise UsageError(f"{path}: prompt {i}: unknown keys {unknown} (known: {sorted(PROMPT_KEYS)})")
        multimask = prompt.get("multimask")
        if multimask is not None and not isinstance(multimask, bool):
            raise UsageError(f'{path}: prompt {i}: "multimask" must be true or false, got {multimask!r}')
        try:
            read.append(SegmentPrompt(parse_json_prompts(prompt), multimask))
        except ValueError as e:
            raise UsageError(f"{path}: prompt {i}: {e}") from None
    return read


def command_line_prompt(args: argparse.Namespace) -> SegmentPrompt:
    """The prompt of --box and --point: every box, with the points (if any) shared by all of them."""
    objects = JsonPrompts(
        boxes=args.box or None,
        points=[[p[:2] for p in args.point]] if args.point else None,
        labels=[[int(p[2]) for p in args.point]] if args.point else None,
    )
    return SegmentPrompt(objects, args.multimask)


def save_prompts_overlay(path: Path, image: Image.Image, masks: list[np.ndarray], prompts: list[SegmentPrompt]) -> Path:
    """Writes (atomically) the image with the masks and every prompt's boxes and clicks drawn; returns the path."""
    boxes = [box for p in prompts for box in p.objects.boxes or []]
    points = [
        (x, y, label)
        for p in prompts
        for one, labels in zip(p.objects.points or [], p.objects.labels or [], strict=True)
        for (x, y), label in zip(one, labels, strict=True)
    ]
    picture = overlay(image, masks, boxes=boxes, points=points)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def mask_outputs(args: argparse.Namespace, total: int) -> list[tuple[str, Path]]:
    """The files `segment IMAGE` writes for `total` masks (`--out`, and `--logits` if given), each checked: of the
    right kind and writable (for `check_distinct_paths`)."""
    outputs = [("--out", check_mask_output(suffixed(args.out, i, total))) for i in range(total)]
    if args.logits is not None:
        outputs += [("--logits", check_logits_output(suffixed(args.logits, i, total))) for i in range(total)]
    return outputs


class MaskWriter:
    """Writes the masks of `segment IMAGE` as they come, `total` in all, numbered as `mask_outputs` checked them:
    each one's PNG (its path printed with what is said of it), its logits with `--logits`, and keeps it for the
    `--overlay` (`drawn`). Memory holds the masks only for an overlay."""

    def __init__(self, args: argparse.Namespace, total: int) -> None:
        self.out, self.logits, self.keep = args.out, args.logits, args.overlay is not None
        self.total, self.index = total, 0
        self.drawn: list[np.ndarray] = []

    def write(self, values: np.ndarray, said: str) -> Path:
        """Writes the next mask from its logits at the image's size; returns the PNG's path."""
        mask = values > MASK_THRESHOLD
        path = save_mask(mask, suffixed(self.out, self.index, self.total))
        print(f"{path}\t{said}")
        if self.logits is not None:
            print(save_array(values, suffixed(self.logits, self.index, self.total)))
        if self.keep:
            self.drawn.append(mask)
        self.index += 1
        return path


def prompt_options() -> argparse.ArgumentParser:
    """--box, --point, --prompts, --manifest, --multimask, --out, --logits, --overlay."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--box", type=_box, action="append", default=[], metavar="X1,Y1,X2,Y2", help="a box prompt; repeat for more"
    )
    options.add_argument(
        "--point",
        type=_point,
        action="append",
        default=[],
        metavar="X,Y[,LABEL]",
        help="a click, label 1 foreground (the default) or 0 background; repeat for more; goes with every box",
    )
    options.add_argument("--prompts", type=Path, metavar="PROMPTS.json", help="many prompts, the image encoded once")
    options.add_argument(
        "--manifest",
        type=Path,
        metavar="PROMPTS.jsonl",
        help='many images: one line each, {"image": path, "boxes": [...], "points": [...], "labels": [...], '
        '"category_ids": [...]}; --out is then a folder (annotations.json, COCO)',
    )
    options.add_argument("--multimask", action="store_true", help="predict 3 masks, keep the best by predicted IoU")
    options.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="MASK.png|DIR",
        help="the mask (255 = object; several: MASK_0.png, MASK_1.png, ...); with --manifest or a folder a folder",
    )
    options.add_argument("--logits", type=Path, metavar="LOGITS.npy", help="also save the float32 logits")
    options.add_argument("--overlay", type=Path, metavar="OVERLAY.png", help="the image with masks and prompts drawn")
    return options


def onnx_options() -> argparse.ArgumentParser:
    """--onnx and the options of its runtime."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("exported model (finesam export), run without torch")
    group.add_argument(
        "--onnx",
        type=Path,
        metavar="DIR",
        help="a `finesam export` folder: run it with onnxruntime or OpenVINO instead of the torch model (no torch "
        "imported; replaces --weights, --hq, --lora, --device, --dtype)",
    )
    group.add_argument("--runtime", choices=RUNTIMES, default=ONNXRUNTIME, help="with --onnx: the runtime")
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=F32,
        help="with --onnx: the encoder's precision; bf16 with OpenVINO on a CPU that has it",
    )
    group.add_argument("--threads", type=positive_int, metavar="N", help="with --onnx: threads of each graph")
    group.add_argument(
        "--cache-dir", type=Path, metavar="DIR", help="with --runtime openvino: keep compiled models there"
    )
    return options
