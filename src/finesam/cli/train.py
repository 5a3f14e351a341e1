"""`finesam train` and `finesam synth`: fine-tuning adapters, and a synthetic dataset to try it on."""

import argparse
from pathlib import Path

from finesam.cli.common import check_output_folder
from finesam.cli.options import Commands, add_command


def run_train(args: argparse.Namespace) -> None:
    from finesam.training.config import load_config
    from finesam.training.trainer import train

    config = load_config(args.config)
    check_output_folder(config.run.out, f"{args.config}: [run] out =")
    written = train(config, resume=args.resume, progress=not args.quiet)
    for path in written.values():
        print(path)


def run_synth(args: argparse.Namespace) -> None:
    from finesam.data.synthetic import write_dataset

    print(
        write_dataset(check_output_folder(args.out, "--out"), args.count, seed=args.seed, size=(args.size, args.size))
    )


def add_commands(commands: Commands) -> None:
    train_command = add_command(commands, "train", "fine-tune adapters (HQ, LoRA, a variant) on a frozen base")
    train_command.add_argument("--config", type=Path, required=True, metavar="CONFIG.toml", help="see configs/")
    train_command.add_argument("--resume", action="store_true", help="continue the run in [run] out")
    train_command.set_defaults(run=run_train, large_tensors=True)

    synth = add_command(commands, "synth", "write a synthetic thin-structure dataset (im/ + gt/)")
    synth.add_argument("out", type=Path, help="the dataset folder")
    synth.add_argument("--count", type=int, default=64, help="image / mask pairs")
    synth.add_argument("--seed", type=int, default=0, help="the same seed gives the same files")
    synth.add_argument("--size", type=int, default=256, help="side of the square images, in pixels")
    synth.set_defaults(run=run_synth)
