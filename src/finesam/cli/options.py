"""Options shared by several commands, declared once (argparse parents), and the help format of every command."""

import argparse
import inspect
import math
from pathlib import Path
from typing import Any, TypeAlias

from finesam.amg import GENERATOR_OPTIONS, AutomaticMaskGenerator
from finesam.cli.basics import HelpFormatter, _parsed, positive_int
from finesam.cli.common import DTYPES

Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def add_command(
    commands: Commands, name: str, help: str, parents: tuple[argparse.ArgumentParser, ...] = (), description: str = ""
) -> argparse.ArgumentParser:
    """A sub-command named `name` with the shared help format and option groups, and `--quiet`."""
    parser = commands.add_parser(
        name, help=help, description=description or help, parents=list(parents), formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bars (they are drawn only on a terminal anyway)"
    )
    return parser


def model_options(
    hq_help: str = "inject the HQ-SAM adapter with these weights", weights_required: bool = True
) -> argparse.ArgumentParser:
    """--weights, --hq, --hq-only, --device, --dtype, --max-pixels: the model a command runs."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("model")
    group.add_argument(
        "--weights",
        type=Path,
        required=weights_required,
        help="converted .safetensors, official .pth, or a Hugging Face SamModel / SamHQModel folder (an HQ-SAM "
        "checkpoint's HQ part is used without --hq)",
    )
    group.add_argument(
        "--hq", type=Path, metavar="HQ.safetensors", help=f"{hq_help} (or an official HQ-SAM .pth / HF SamHQModel)"
    )
    group.add_argument(
        "--hq-only", action="store_true", help="with HQ-SAM: the HQ mask alone instead of SAM's mask + the HQ mask"
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    group.add_argument(
        "--dtype",
        default="float32",
        choices=[*sorted(DTYPES), "int8"],
        help="image-encoder precision (the decoder stays fp32); int8: its linear layers in int8, CPU only",
    )
    group.add_argument(
        "--max-pixels",
        type=positive_int,
        metavar="N",
        help="refuse input images with more pixels (decompression bombs; default: PIL's limit, about 89 million)",
    )
    options.set_defaults(large_tensors=True)  # a model in this process: finesam.process.configure_command
    return options


def lora_options(
    help: str = "inject this LoRA (after HQ-SAM); repeat for more, injected in order",
) -> argparse.ArgumentParser:
    """--lora, repeatable."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--lora", type=Path, action="append", default=[], metavar="LORA.safetensors", help=help)
    return options


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0 (a size limit, a timeout)."""
    value = _parsed(text, float, "a number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 to 65535 (0: any free port)."""
    value = _parsed(text, int, "a port number")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {value}")
    return value


def generator_options() -> argparse.ArgumentParser:
    """The automatic mask generator's options, with its defaults."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("automatic mask generator")
    defaults = inspect.signature(AutomaticMaskGenerator).parameters
    for name, (kind, text) in GENERATOR_OPTIONS.items():
        group.add_argument(f"--{name.replace('_', '-')}", type=kind, default=defaults[name].default, help=text)
    return options


def generator_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The generator options of parsed arguments, as `AutomaticMaskGenerator` keyword arguments."""
    return {name: getattr(args, name) for name in GENERATOR_OPTIONS}
