"""What the sub-commands share: errors, argument types, loading the model, atomic outputs."""

import argparse
import functools
import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finesam.adapters.hq import HQAdapter
from finesam.adapters.order import inject_in_order
from finesam.devices import usable_device
from finesam.model import SegmentAnything
from finesam.weights import atomic_write, check_output, hq_weights_for, load_hq, load_lora, load_sam

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_base(args: argparse.Namespace) -> tuple[SegmentAnything, HQAdapter | None]:
    """The model of `--weights` on `--device` in `--dtype`, and the HQ adapter of `--hq` (or of an official
    HQ-SAM `.pth` given as `--weights`), not injected; `--hq-only` set on it."""
    try:
        device = usable_device(args.device)
    except ValueError as e:
        raise UsageError(f"--device {args.device} {e}") from None
    model = load_sam(args.weights, device)
    hq = hq_weights_for(args.weights, args.hq)
    adapter = None if hq is None else load_hq(model, hq, hq_mask_only=args.hq_only)
    if adapter is None and args.hq_only:
        raise UsageError("--hq-only needs HQ-SAM weights: --hq FILE, or an official HQ-SAM .pth as --weights")
    if args.dtype != "int8":
        model.set_encoder_dtype(DTYPES[args.dtype])
        return model, adapter
    try:
        model.quantize_encoder()
    except ValueError as e:
        raise UsageError(f"--dtype int8: {e}") from None
    return model, adapter


def load_model(args: argparse.Namespace) -> SegmentAnything:
    """The model of `load_base`, with the HQ adapter injected when there is one, then the LoRAs of `--lora` in
    order (where the command has the option), and compiled with --compile."""
    model, adapter = load_base(args)
    loras = [load_lora(model, path) for path in getattr(args, "lora", [])]  # every file checked before injecting
    inject_in_order(adapter, loras)
    if not getattr(args, "compile", False):
        return model
    print("compiling the image encoder: its first image takes about a minute longer", file=sys.stderr)
    return model.compile_encoder()


def inference(run: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], None]:
    """A command body that only infers: it runs under `torch.inference_mode()`."""

    @functools.wraps(run)
    def wrapped(args: argparse.Namespace) -> None:
        with torch.inference_mode():
            run(args)

    return wrapped
