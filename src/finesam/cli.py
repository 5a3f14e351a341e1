"""The `finesam` command: convert, segment, everything, download, demo, train, eval, synth."""

import argparse
import inspect
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finesam.amg import AutomaticMaskGenerator, rle_to_mask, to_coco
from finesam.conversion import CheckpointError
from finesam.demo import cache_dir, demo
from finesam.download import CHECKPOINTS, DownloadError, download
from finesam.hq.weights import load_hq
from finesam.model import SegmentAnything
from finesam.overlay import distinct_colours, overlay
from finesam.processing import as_rgb
from finesam.weights import atomic_write, convert_checkpoint, load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


PROMPT_KEYS = {"box", "points", "labels", "multimask"}


def read_prompt_file(path: Path) -> list[dict[str, Any]]:
    """Prompts from JSON: a list (or {"prompts": [...]}) of {"box": [x1, y1, x2, y2], "points": [[x, y], ...],
    "labels": [1, 0, ...], "multimask": bool}, each with a box and/or points."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read prompts from {path}: {e}") from None
    prompts = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(prompts, list) or not prompts:
        raise UsageError(f'{path}: expected a non-empty list of prompts (or {{"prompts": [...]}})')
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, dict) or not ({"box", "points"} & prompt.keys()):
            raise UsageError(f'{path}: prompt {i}: expected an object with "box" and/or "points"')
        if unknown := sorted(prompt.keys() - PROMPT_KEYS):
            raise UsageError(f"{path}: prompt {i}: unknown keys {unknown} (known: {sorted(PROMPT_KEYS)})")
    return prompts


def command_line_prompt(args: argparse.Namespace) -> dict[str, Any]:
    prompt: dict[str, Any] = {"multimask": args.multimask}
    if args.box:
        prompt["box"] = args.box
    if args.point:
        prompt["points"] = [p[:2] for p in args.point]
        prompt["labels"] = [int(p[2]) for p in args.point]
    return prompt


def load_model(args: argparse.Namespace) -> SegmentAnything:
    """The model of `--weights` on `--device` in `--dtype`, with the HQ adapter injected when there is one."""
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"--device {args.device} is not usable here: {str(e).splitlines()[0]}") from None
    model, adapter = load_checkpoint(args.weights, device)
    if args.hq is not None:
        adapter = load_hq(model, args.hq)
    if adapter is not None:
        adapter.hq_mask_only = args.hq_only
        adapter.inject()
    elif args.hq_only:
        raise UsageError("--hq-only needs HQ-SAM weights: --hq FILE, or an official HQ-SAM .pth as --weights")
    model.set_encoder_dtype(DTYPES[args.dtype])
    return model.compile_encoder() if getattr(args, "compile", False) else model


def run_segment(args: argparse.Namespace) -> None:
    if args.prompts is not None and (args.box or args.point):
        raise UsageError("give prompts either with --prompts or with --box/--point, not both")
    if args.prompts is None and not args.box and not args.point:
        raise UsageError("give at least one --box or --point (or --prompts PROMPTS.json)")
    prompts = read_prompt_file(args.prompts) if args.prompts is not None else [command_line_prompt(args)]
    try:
        image = as_rgb(Image.open(args.image))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read image {args.image}: {e}") from None
    model = load_model(args)
    embedding = model.encode_image(image)  # once, for every prompt
    results: list[tuple[torch.Tensor, float]] = []
    for i, prompt in enumerate(prompts):
        try:
            prediction = model.predict(
                embedding,
                points=prompt.get("points"),
                labels=prompt.get("labels"),
                boxes=prompt.get("box"),
                multimask_output=bool(prompt.get("multimask", args.multimask)),
                return_logits=True,
            )
        except ValueError as e:
            raise UsageError(f"prompt {i}: {e}" if args.prompts is not None else str(e)) from None
        logits, scores = prediction.best()
        results += [(logits[j].float().cpu(), scores[j].item()) for j in range(len(scores))]
    for i, (logits, score) in enumerate(results):
        mask_path = save_mask(logits.numpy() > 0, suffixed(args.out, i, len(results)))
        print(f"{mask_path}\tpredicted IoU {score:.4f}")
        if args.logits is not None:
            print(save_array(logits.numpy(), suffixed(args.logits, i, len(results))))
    if args.overlay is not None:
        boxes = [b for p in prompts for b in np.asarray(p.get("box", []), dtype=float).reshape(-1, 4).tolist()]
        points = [
            (x, y, int(label))
            for p in prompts
            for (x, y), label in zip(
                p.get("points", []), p.get("labels") or [1] * len(p.get("points", [])), strict=False
            )
        ]
        picture = overlay(image, [logits.numpy() > 0 for logits, _ in results], boxes=boxes, points=points)
        print(atomic_write(args.overlay, lambda tmp: picture.save(tmp, format="PNG")))


def write_json(data: Any, path: Path) -> Path:
    text = json.dumps(data, indent=1)

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    return atomic_write(path, write)


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


def run_download(args: argparse.Namespace) -> None:
    if args.name not in CHECKPOINTS:
        raise UsageError(f"unknown checkpoint {args.name!r}; one of: {', '.join(CHECKPOINTS)}")
    directory = args.dir if args.dir is not None else cache_dir()
    try:
        path = download(CHECKPOINTS[args.name], directory, progress=True)
    except DownloadError as e:
        raise UsageError(str(e)) from None
    print(path)
    report = convert_checkpoint(path, directory)
    for written in report.written:
        print(written)
    print(report.summary(), file=sys.stderr)


def run_demo(args: argparse.Namespace) -> None:
    raise SystemExit(demo(args.out_dir))


def run_train(args: argparse.Namespace) -> None:
    from finesam.training.config import load_config
    from finesam.training.trainer import train

    with torch.inference_mode(False):
        written = train(load_config(args.config), resume=args.resume, progress=not args.quiet)
    for path in written.values():
        print(path)


def evaluation_configurations(args: argparse.Namespace, model: SegmentAnything, hq: Any) -> list[Any]:
    """The named configurations of `--configs` (default: base, then each adapter added in turn)."""
    from finesam.evaluation import adapter_configuration
    from finesam.lora import load_lora
    from finesam.training.adapters import build_variant
    from finesam.training.config import VariantConfig

    parts: dict[str, Any] = {}
    if hq is not None:
        parts["hq"] = hq
    for path in args.lora:
        lora = load_lora(model, path)
        parts[lora.name] = lora
    if args.variant is not None:
        options = json.loads(args.variant_options) if args.variant_options else {}
        parts["variant"] = build_variant(model, VariantConfig(args.variant, options, args.variant_weights))
    names = (
        args.configs.split(",")
        if args.configs
        else ["base", *("+".join(list(parts)[: i + 1]) for i in range(len(parts)))]
    )
    configurations = []
    for name in names:
        wanted = [] if name == "base" else name.split("+")
        if unknown := [w for w in wanted if w not in parts]:
            raise UsageError(f"--configs {name}: unknown part(s) {unknown} (available: base, {', '.join(parts)})")
        configurations.append(adapter_configuration(name, [parts[w] for w in wanted], args.hq_only))
    return configurations


def run_eval(args: argparse.Namespace) -> None:
    from finesam.evaluation import distributed_from_environment, evaluate, markdown_table, write_report

    distributed = distributed_from_environment()
    model, hq = load_checkpoint(args.weights, args.device)
    if args.hq is not None:
        hq = load_hq(model, args.hq)
    configurations = evaluation_configurations(args, model, hq)
    results = evaluate(
        model,
        configurations,
        args.data,
        prompt=args.prompt,
        box_noise=args.box_noise,
        points=args.points,
        seed=args.seed,
        limit=args.limit,
    )
    if not distributed or torch.distributed.get_rank() == 0:
        details = {"data": str(args.data), "weights": str(args.weights), "prompt": args.prompt, "seed": args.seed}
        print(markdown_table(results), end="")
        for path in write_report(results, args.out, details):
            print(path)


def run_synth(args: argparse.Namespace) -> None:
    from finesam.synthetic import write_dataset

    print(write_dataset(args.out, args.count, seed=args.seed, size=(args.size, args.size)))


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
    segment.add_argument("--prompts", type=Path, metavar="PROMPTS.json", help="many prompts, the image encoded once")
    segment.add_argument("--point", type=_point, action="append", default=[], metavar="X,Y[,LABEL]")
    segment.add_argument("--multimask", action="store_true", help="predict 3 masks, keep the best by predicted IoU")
    segment.add_argument("--out", type=Path, required=True, metavar="MASK.png")
    segment.add_argument("--logits", type=Path, metavar="LOGITS.npy", help="also save the float32 logits")
    segment.add_argument(
        "--hq", type=Path, metavar="HQ.safetensors", help="inject the HQ-SAM adapter with these weights"
    )
    segment.add_argument("--hq-only", action="store_true", help="with HQ-SAM: the HQ mask alone, not SAM's + HQ's")
    segment.add_argument("--overlay", type=Path, metavar="OVERLAY.png", help="the image with masks and prompts drawn")
    segment.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ... (default: cpu)")
    segment.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="image-encoder precision (the decoder stays fp32)"
    )
    segment.add_argument(
        "--compile", action="store_true", help="torch.compile the image encoder (slow first call; for many images)"
    )
    segment.set_defaults(run=run_segment)

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

    listing = "\n".join(f"  {name:16s} {c.description}" for name, c in CHECKPOINTS.items())
    fetch = commands.add_parser(
        "download",
        help="download an official checkpoint (verified, resumable) and convert it",
        description=f"checkpoints:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument("name", metavar="NAME", help="one of the checkpoints listed above")
    fetch.add_argument("--dir", type=Path, help="where to put it (default: $FINESAM_HOME or ~/.cache/finesam)")
    fetch.set_defaults(run=run_download)

    demo_command = commands.add_parser("demo", help="segment the example image (finds or downloads a checkpoint)")
    demo_command.add_argument("--out-dir", type=Path, default=Path("out"))
    demo_command.set_defaults(run=run_demo)

    train_command = commands.add_parser("train", help="fine-tune adapters (HQ, LoRA, a variant) on a frozen base")
    train_command.add_argument("--config", type=Path, required=True, metavar="CONFIG.toml", help="see configs/")
    train_command.add_argument("--resume", action="store_true", help="continue the run in [run] out")
    train_command.add_argument("--quiet", action="store_true", help="no progress line")
    train_command.set_defaults(run=run_train)

    evaluate = commands.add_parser("eval", help="mIoU / boundary IoU of configurations side by side")
    evaluate.add_argument("data", type=Path, help="a folder with im/ and gt/")
    evaluate.add_argument("--weights", type=Path, required=True, help="base weights (.safetensors or official .pth)")
    evaluate.add_argument("--hq", type=Path, metavar="HQ.safetensors", help="HQ-SAM adapter weights")
    evaluate.add_argument("--hq-only", action="store_true", help="with HQ-SAM: the HQ mask alone")
    evaluate.add_argument("--lora", type=Path, action="append", default=[], metavar="LORA.safetensors")
    evaluate.add_argument("--variant", metavar="MODULE:CLASS", help="a decoder-variant adapter class")
    evaluate.add_argument("--variant-weights", type=Path, metavar="FILE.safetensors")
    evaluate.add_argument("--variant-options", metavar="JSON", help="keyword arguments for the variant class")
    evaluate.add_argument("--configs", help="comma-separated, parts joined by +: e.g. base,hq,hq+lora")
    evaluate.add_argument("--prompt", default="box", choices=["box", "noisy_box", "points"])
    evaluate.add_argument("--box-noise", type=float, default=0.1, help="noise scale for --prompt noisy_box")
    evaluate.add_argument("--points", type=int, default=1, help="foreground points for --prompt points")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--limit", type=int, help="only the first N samples")
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--out", type=Path, required=True, help="writes eval.md and eval.json here")
    evaluate.set_defaults(run=run_eval)

    synth = commands.add_parser("synth", help="write a synthetic thin-structure dataset (im/ + gt/)")
    synth.add_argument("out", type=Path)
    synth.add_argument("--count", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256)
    synth.set_defaults(run=run_synth)
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
