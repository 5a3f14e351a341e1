"""The `finesam` command: one module per group of sub-commands."""

import argparse
import sys
from collections.abc import Sequence

from finesam.allocator import reuse_freed_memory
from finesam.cli import convert, demo, eval, everything, segment, train
from finesam.cli.common import UsageError
from finesam.weights import CheckpointError

COMMAND_GROUPS = (convert, segment, everything, demo, train, eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finesam", description="High-Quality Segment Anything (SAM / HQ-SAM) on Refiners."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    reuse_freed_memory()  # a process of our own: large tensors without fresh pages (see finesam.allocator)
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"finesam {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
