"""The `finesam` command: convert, segment, demo."""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finesam.conversion import CheckpointError
from finesam.hq.weights import load_hq
from finesam.weights import atomic_write, convert_checkpoint, load_checkpoint


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback."""


def _floats(text: str, counts: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(values) not in counts:
        raise argparse.ArgumentTypeError(f"{what} takes {' or '.join(map(str, counts))} numbers, got {text!r}")
    return values


def _box(text: str) -> list[float]:
    return _floats(text, (4,), "--box X1,Y1,X2,Y2")


def _point(text: str) -> list[float]:
    values = _floats(text, (2, 3), "--point X,Y[,LABEL]")
    if len(values) == 3 and values[2] not in (0, 1):
        raise argparse.ArgumentTypeError(f"--point LABEL must be 1 (foreground) or 0 (background), got {text!r}")
    return values if len(values) == 3 else [*values, 1.0]


def suffixed(path: Path, index: int, count: int) -> Path:
    """`path` itself for a single output, else `stem_<index>` + suffix."""
    return path if count == 1 else path.with_name(f"{path.stem}_{index}{path.suffix}")


def save_mask(mask: np.ndarray, path: Path) -> Path:
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def save_array(array: np.ndarray, path: Path) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    return atomic_write(path, write)


def run_convert(args: argparse.Namespace) -> None:
    report = convert_checkpoint(args.checkpoint, args.out)
    for path in report.written:
        print(path)
    print(report.summary(), file=sys.stderr)


def run_segment(args: argparse.Namespace) -> None:
    if not args.box and not args.point:
        raise UsageError("give at least one --box or --point")
    try:
        image = Image.open(args.image)
        image.load()
    except OSError as e:
        raise UsageError(f"cannot read image {args.image}: {e}") from None
    model, adapter = load_checkpoint(args.weights)
    if args.hq is not None:
        adapter = load_hq(model, args.hq)
    if adapter is not None:
        adapter.hq_mask_only = args.hq_only
        adapter.inject()
    elif args.hq_only:
        raise UsageError("--hq-only needs HQ-SAM weights: --hq FILE, or an official HQ-SAM .pth as --weights")
    points = labels = None
    if args.point:
        points = np.array([p[:2] for p in args.point])
        labels = np.array([int(p[2]) for p in args.point])
    prediction = model.predict(
        image,
        points=points,
        labels=labels,
        boxes=np.array(args.box) if args.box else None,
        multimask_output=args.multimask,
        return_logits=True,
    )
    logits, scores = prediction.best()
    count = logits.shape[0]
    for i in range(count):
        mask_path = save_mask((logits[i] > 0).cpu().numpy(), suffixed(args.out, i, count))
        print(f"{mask_path}\tpredicted IoU {scores[i].item():.4f}")
        if args.logits is not None:
            print(save_array(logits[i].float().cpu().numpy(), suffixed(args.logits, i, count)))


def run_demo(args: argparse.Namespace) -> None:
    from finesam.demo import demo

    raise SystemExit(demo(args.out_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finesam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="official .pth checkpoint -> safetensors")
    convert.add_argument("checkpoint", type=Path)
    convert.add_argument("--out", type=Path, required=True, help="output directory")
    convert.set_defaults(run=run_convert)

    segment = commands.add_parser("segment", help="segment an image with box and point prompts")
    segment.add_argument("image", type=Path)
    segment.add_argument("--weights", type=Path, required=True, help="converted .safetensors or official .pth")
    segment.add_argument("--box", type=_box, action="append", default=[], metavar="X1,Y1,X2,Y2")
    segment.add_argument("--point", type=_point, action="append", default=[], metavar="X,Y[,LABEL]")
    segment.add_argument("--multimask", action="store_true", help="predict 3 masks, keep the best by predicted IoU")
    segment.add_argument("--out", type=Path, required=True, metavar="MASK.png")
    segment.add_argument("--logits", type=Path, metavar="LOGITS.npy", help="also save the float32 logits")
    segment.add_argument(
        "--hq", type=Path, metavar="HQ.safetensors", help="inject the HQ-SAM adapter with these weights"
    )
    segment.add_argument("--hq-only", action="store_true", help="with HQ-SAM: the HQ mask alone, not SAM's + HQ's")
    segment.set_defaults(run=run_segment)

    demo = commands.add_parser("demo", help="segment the example image with a local official checkpoint")
    demo.add_argument("--out-dir", type=Path, default=Path("out"))
    demo.set_defaults(run=run_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        with torch.inference_mode():
            args.run(args)
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"finesam {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
