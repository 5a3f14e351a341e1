"""The `finesam` command: one module per group of sub-commands (`finesam.cli.commands` builds the parser).

Importing this package imports no torch: `finesam segment IMAGE --onnx DIR` and `finesam segment --manifest M
--onnx DIR` run an export without it (`finesam.cli.onnx_segment`); every other command line loads
`finesam.cli.commands`, and torch with it.
"""

import argparse
import sys
from collections.abc import Sequence

from finesam.cli import onnx_segment


def build_parser() -> argparse.ArgumentParser:
    from finesam.cli.commands import build_parser as build

    return build()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if onnx_segment.requested(args):
        onnx_segment.main(args[1:])
        return
    if (refusal := onnx_segment.refusal(args)) is not None:  # `everything --onnx`: one line, before torch loads
        print(f"finesam {args[0]}: error: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    from finesam.cli.commands import main as run

    run(args)
