"""`finesam convert` and `finesam download`: official (and Hugging Face) checkpoints to finesam files."""

import argparse
import sys
from pathlib import Path

from finesam.cli.common import UsageError, check_output_folder
from finesam.cli.demo import cache_dir
from finesam.cli.options import Commands, add_command
from finesam.weights import convert_checkpoint
from finesam.weights.download import CHECKPOINTS, DownloadError, download


def run_convert(args: argparse.Namespace) -> None:
    check_output_folder(args.out, "--out")
    report = convert_checkpoint(args.checkpoint, args.out, decoder=args.decoder)
    for path in report.written:
        print(path)
    print(report.summary(), file=sys.stderr)


def run_download(args: argparse.Namespace) -> None:
    if args.name not in CHECKPOINTS:
        raise UsageError(f"unknown checkpoint {args.name!r}; one of: {', '.join(CHECKPOINTS)}")
    directory = check_output_folder(args.dir if args.dir is not None else cache_dir(), "--dir")
    try:
        path = download(CHECKPOINTS[args.name], directory, progress=not args.quiet)
    except DownloadError as e:
        raise UsageError(str(e)) from None
    print(path)
    if CHECKPOINTS[args.name].decoder:  # a decoder alone: it becomes a model with an encoder of the user's choice
        print(f"a decoder alone: convert it with an encoder, finesam convert ENCODER --decoder {path}", file=sys.stderr)
        return
    report = convert_checkpoint(path, directory)
    for written in report.written:
        print(written)
    print(report.summary(), file=sys.stderr)


def add_commands(commands: Commands) -> None:
    convert = add_command(commands, "convert", "official .pth or Hugging Face checkpoint -> safetensors")
    convert.add_argument(
        "checkpoint",
        type=Path,
        help="an official checkpoint of a registered family (SAM, HQ-SAM, MobileSAM, SlimSAM, ...: finesam models), "
        "or a Hugging Face SamModel / SamHQModel folder (config.json + model.safetensors, or its model.safetensors)",
    )
    convert.add_argument("--out", type=Path, required=True, help="output directory")
    convert.add_argument(
        "--decoder",
        type=Path,
        metavar="FILE",
        help="MobileSAMv2's prompt-guided decoder (Prompt_guided_Mask_Decoder.pt): pairs it with CHECKPOINT's image "
        "encoder (or a file of the encoder alone) into one model, OUT/mobilesamv2_NAME.safetensors",
    )
    convert.set_defaults(run=run_convert, large_tensors=True)

    listing = "\n".join(f"  {name:16s} {c.description}" for name, c in CHECKPOINTS.items())
    download_command = add_command(
        commands,
        "download",
        "download an official checkpoint (verified, resumable) and convert it",
        description=f"download an official checkpoint (verified, resumable) and convert it\n\ncheckpoints:\n{listing}",
    )
    download_command.add_argument("name", metavar="NAME", help="one of the checkpoints listed above")
    download_command.add_argument(
        "--dir", type=Path, help="where to put it (default: $FINESAM_HOME or ~/.cache/finesam)"
    )
    download_command.set_defaults(run=run_download)
