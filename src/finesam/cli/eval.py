"""`finesam eval`: mIoU / boundary IoU of model configurations (base, + HQ, + LoRA, ...) side by side."""

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from finesam.cli.common import UsageError, check_output_folder, inference, load_base
from finesam.cli.options import Commands, add_command, model_options, positive_int
from finesam.evaluation import PROMPTS, adapter_configuration, evaluate, markdown_table, write_report
from finesam.model import SegmentAnything
from finesam.training.adapters import build_variant
from finesam.training.config import VariantConfig
from finesam.training.distributed import Distributed
from finesam.weights import load_lora

# the parts of --configs that an option brings, and that option
PART_OPTIONS = {"hq": "--hq HQ.safetensors (or an HQ-SAM checkpoint as --weights)", "variant": "--variant MODULE:CLASS"}


def evaluation_configurations(args: argparse.Namespace, model: SegmentAnything, hq: Any) -> list[Any]:
    """The named configurations of `--configs` (default: base, then each adapter added in turn)."""
    parts: dict[str, Any] = {}
    if hq is not None:
        parts["hq"] = hq
    for path in args.lora:
        lora = load_lora(model, path)
        if lora.name in parts or lora.name == "base":
            taken = (
                "the model without adapters"
                if lora.name == "base"
                else f"another part ({type(parts[lora.name]).__name__})"
            )
            raise UsageError(
                f"{path}: this LoRA is named {lora.name!r}, which already names {taken}; their rows would "
                "shadow each other: give it another name (load_lora(..., name=) and save_lora)"
            )
        parts[lora.name] = lora
    if args.variant is not None:
        options = json.loads(args.variant_options) if args.variant_options else {}
        parts["variant"] = build_variant(model, VariantConfig(args.variant, options, args.variant_weights))
    names = (
        args.configs.split(",")
        if args.configs
        else ["base", *("+".join(list(parts)[: i + 1]) for i in range(len(parts)))]
    )
    if duplicated := sorted({n for n in names if names.count(n) > 1}):
        raise UsageError(f"--configs names {', '.join(duplicated)} more than once")
    configurations = []
    for name in names:
        wanted = [] if name == "base" else name.split("+")
        if unknown := [w for w in wanted if w not in parts]:
            hints = [f"'{w}' needs {PART_OPTIONS[w]}" if w in PART_OPTIONS else f"unknown part '{w}'" for w in unknown]
            raise UsageError(
                f"--configs {name}: {'; '.join(hints)} (parts of this run: {', '.join(['base', *parts])}; a LoRA "
                "is named by its --lora file)"
            )
        configurations.append(adapter_configuration(name, [parts[w] for w in wanted], args.hq_only))
    return configurations


@inference
def run_eval(args: argparse.Namespace) -> None:
    check_output_folder(args.out, "--out")
    place = Distributed.from_environment()
    args.device = str(place.join(torch.device(args.device)))
    model, hq = load_base(args)
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
        progress=not args.quiet and place.main,
    )
    if place.main:
        details = {"data": str(args.data), "weights": str(args.weights), "prompt": args.prompt, "seed": args.seed}
        print(markdown_table(results), end="")
        for path in write_report(results, args.out, details):
            print(path)


def add_commands(commands: Commands) -> None:
    evaluate_command = add_command(
        commands,
        "eval",
        "mIoU / boundary IoU of configurations side by side",
        (model_options("HQ-SAM adapter weights"),),
    )
    evaluate_command.add_argument("data", type=Path, help="a folder with im/ and gt/")
    evaluate_command.add_argument(
        "--lora", type=Path, action="append", default=[], metavar="LORA.safetensors", help="a LoRA; repeat for more"
    )
    evaluate_command.add_argument("--variant", metavar="MODULE:CLASS", help="a decoder-variant adapter class")
    evaluate_command.add_argument("--variant-weights", type=Path, metavar="FILE.safetensors", help="its weights")
    evaluate_command.add_argument("--variant-options", metavar="JSON", help="keyword arguments for the variant class")
    evaluate_command.add_argument(
        "--configs", help="comma-separated, parts joined by +: e.g. base,hq,hq+lora (default: each part added in turn)"
    )
    evaluate_command.add_argument("--prompt", default="box", choices=PROMPTS, help="how each object is prompted")
    evaluate_command.add_argument("--box-noise", type=float, default=0.1, help="noise scale for --prompt noisy_box")
    evaluate_command.add_argument("--points", type=int, default=1, help="foreground points for --prompt points")
    evaluate_command.add_argument("--seed", type=int, default=0, help="seed of the noisy prompts")
    evaluate_command.add_argument("--limit", type=positive_int, help="only the first N samples")
    evaluate_command.add_argument(
        "--out", type=Path, required=True, help="writes eval.md, eval.json and per_image.csv here"
    )
    evaluate_command.set_defaults(run=run_eval)
