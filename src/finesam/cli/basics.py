"""What the sub-commands share that needs no torch: errors, argument types, output checks and writes (the
torch-free `finesam segment --onnx` runs on these; `finesam.cli.common` re-exports them)."""

import argparse
import io
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from finesam.files import atomic_write, check_output


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and action.option_strings and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class UsageError(Exception):
    """A problem with the command line or its inputs, reported without a traceback."""


def floats(text: str, counts: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if len(values) not in counts:
        raise argparse.ArgumentTypeError(f"{what} takes {' or '.join(map(str, counts))} numbers, got {text!r}")
    return values


def suffixed(path: Path, index: int, count: int) -> Path:
    """`path` itself for a single output, else `stem_<index>` + suffix."""
    return path if count == 1 else path.with_name(f"{path.stem}_{index}{path.suffix}")


def check_output_folder(folder: Path, option: str) -> Path:
    """A folder a command writes into: refused when it exists and is not a folder, or cannot be written in."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{option} {folder}: exists and is not a folder")
    try:
        check_output(folder / ".finesam-output")  # the first existing ancestor must be a writable folder
    except ValueError as e:
        raise UsageError(f"{option} {folder}: {str(e).split(': ', 1)[-1]}") from None
    return folder


LOSSLESS_MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".gif", ".pgm", ".ppm")


def check_mask_output(path: Path) -> Path:
    """`check_output`, and a lossless image format: a JPEG (or WebP) mask would not be binary."""
    if path.suffix.lower() not in LOSSLESS_MASK_SUFFIXES:
        raise UsageError(
            f"{path}: masks are written in lossless formats only ({', '.join(LOSSLESS_MASK_SUFFIXES)}); "
            f"{path.suffix or 'no suffix'} would blur the 0/255 values"
        )
    return check_output(path)


def check_logits_output(path: Path) -> Path:
    """`check_output`, and the `.npy` suffix: the logits are a NumPy array, never bytes in an image file."""
    check_output(path)
    if path.suffix.lower() != ".npy":
        raise UsageError(f"{path}: logits are written as NumPy arrays (.npy), not {path.suffix or 'no suffix'}")
    return path


def file_identity(path: Path) -> tuple[object, ...]:
    """What makes two paths one file: device and inode where the file exists (symbolic and hard links
    included), else the resolved path (an output that does not exist yet may still be another's path)."""
    resolved = path.resolve()  # `missing/../file` is `file`, which the kernel's own lookup would not find
    try:
        found = os.stat(resolved)
    except (OSError, ValueError):
        return ("path", str(resolved))
    return ("file", found.st_dev, found.st_ino)


def check_distinct_paths(outputs: Sequence[tuple[str, Path]], inputs: Sequence[tuple[str, Path]]) -> None:
    """The one rule for the files a command writes: none of them is an input or another output. Call it before
    any work (the model loads).

    Args:
        outputs: (what, path) of every file the command will write, e.g. ("--out", Path("mask.png")).
        inputs: (what, path) of every file it reads.

    Raises:
        UsageError: an output is an input or another output; the message names both.
    """
    seen = {file_identity(path): (option, path) for option, path in inputs}
    for option, path in outputs:
        identity = file_identity(path)
        if identity in seen:
            other_option, other = seen[identity]
            raise UsageError(
                f"{option} {path} is the same file as {other_option} {other}: give each output its own path"
            )
        seen[identity] = (option, path)


def save_mask(mask: np.ndarray, path: Path) -> Path:
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt))


def save_array(array: np.ndarray, path: Path) -> Path:
    def write(tmp: Path) -> None:
        # through a buffer: numpy's own file writes report a full disk without its errno ("N requested and M
        # written"); Python's file object raises the OSError that names the cause
        encoded = io.BytesIO()
        np.save(encoded, array)
        with open(tmp, "wb") as f:
            f.write(encoded.getbuffer())

    return atomic_write(path, write)


def write_json(data: Any, path: Path) -> Path:
    text = json.dumps(data, indent=1)

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    return atomic_write(path, write)


# options whose values may start with '-' (a point left of the image): argparse would read `--point -1,5` as an
# unknown option, so such values are joined to their option (`--point=-1,5`) before parsing
SIGNED_VALUES = ("--point", "--box")


def join_signed_values(argv: Sequence[str]) -> list[str]:
    joined: list[str] = []
    for arg in argv:
        if joined and joined[-1] in SIGNED_VALUES and re.fullmatch(r"-[\d.][\d.,eE+-]*", arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return joined


Number = TypeVar("Number", int, float)


def _parsed(text: str, convert: Callable[[str], Number], noun: str) -> Number:
    """`convert(text)`, or the argparse error that says what was expected."""
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _parsed(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value
