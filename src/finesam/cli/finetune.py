"""`finesam train`, `eval`, `synth`: fine-tuning and evaluation."""

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from finesam.cli.common import UsageError
from finesam.model import SegmentAnything
from finesam.training.distributed import Distributed
from finesam.weights import holds_hq, load_hq, load_lora, load_sam


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
    from finesam.evaluation import evaluate, markdown_table, write_report

    place = Distributed.from_environment()
    model = load_sam(args.weights, place.join(torch.device(args.device)))
    hq_weights = args.hq if args.hq is not None else (args.weights if holds_hq(args.weights) else None)
    hq = None if hq_weights is None else load_hq(model, hq_weights)
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
    if place.main:
        details = {"data": str(args.data), "weights": str(args.weights), "prompt": args.prompt, "seed": args.seed}
        print(markdown_table(results), end="")
        for path in write_report(results, args.out, details):
            print(path)


def run_synth(args: argparse.Namespace) -> None:
    from finesam.data.synthetic import write_dataset

    print(write_dataset(args.out, args.count, seed=args.seed, size=(args.size, args.size)))


def add_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
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
