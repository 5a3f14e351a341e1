"""The `finesam` command's parser and its run: one module per group of sub-commands (`finesam.cli.main` comes
here for every command line but a torch-free `segment --onnx`)."""

import argparse
import sys
from collections.abc import Sequence

import torch

from finesam.cli import convert, demo, eval, everything, export, models, segment, serve, track, train
from finesam.cli.basics import join_signed_values
from finesam.cli.common import UsageError
from finesam.process import configure_command
from finesam.weights import CheckpointError, OutputError

COMMAND_GROUPS = (convert, segment, everything, track, demo, serve, export, train, eval, models)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finesam", description="High-Quality Segment Anything (SAM / HQ-SAM) on Refiners."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


MEMORY_HINT = "give fewer prompts per call, a smaller image, or --dtype bfloat16"


def _out_of_memory(error: BaseException) -> bool:
    # the CPU allocator raises a plain RuntimeError; which words it uses depends on the platform
    words = ("not enough memory", "out of memory", "can't allocate memory")
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or any(w in str(error) for w in words)


def _first_line(error: BaseException) -> str:
    # refiners appends a dump of the whole chain to errors raised inside it: keep the cause only
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(join_signed_values(sys.argv[1:] if argv is None else argv))
    # a process of our own, set once the arguments are valid (see finesam.process)
    configure_command(getattr(args, "large_tensors", False), getattr(args, "max_pixels", None))
    try:
        args.run(args)
    except (UsageError, CheckpointError, ValueError) as e:
        print(f"finesam {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OutputError as e:  # disk full, I/O error: the file and the cause; what was committed stays
        print(f"finesam {args.command}: error: {e.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(e):
            raise
        print(f"finesam {args.command}: error: out of memory ({_first_line(e)}); {MEMORY_HINT}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:  # Ctrl-C: one line (what was kept, if anything), the shell's status 130
        print(f"finesam {args.command}: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        raise SystemExit(130) from None
