"""The `finesam` command: convert, segment, everything, download, demo, train, eval, synth."""

import argparse
import sys
from collections.abc import Sequence

import torch

from finesam.allocator import reuse_freed_memory
from finesam.cli import everything, finetune, prompting
from finesam.cli.common import UsageError
from finesam.weights import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finesam", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prompting.add_commands(commands)
    everything.add_command(commands)
    finetune.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    reuse_freed_memory()  # a process of our own: large tensors without fresh pages (see finesam.allocator)
    args = build_parser().parse_args(argv)
    try:
        with torch.inference_mode():
            args.run(args)
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"finesam {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
