"""What the sub-commands share: errors, argument types, loading the model, atomic outputs."""

import argparse
import functools
import sys
from collections.abc import Callable

import torch

from finesam.adapters.hq import HQAdapter
from finesam.adapters.order import inject_in_order

# what needs no torch lives in basics (the torch-free `segment --onnx` runs on it); re-exported for the commands
from finesam.cli.basics import (  # noqa: F401
    LOSSLESS_MASK_SUFFIXES,
    UsageError,
    check_distinct_paths,
    check_logits_output,
    check_mask_output,
    check_output_folder,
    file_identity,
    floats,
    save_array,
    save_mask,
    suffixed,
    write_json,
)
from finesam.devices import usable_device
from finesam.model import SegmentAnything
from finesam.weights import hq_weights_for, load_hq, load_lora, load_sam

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
