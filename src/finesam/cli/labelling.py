"""Labelling a whole dataset with the torch model, shared by `finesam everything DIR_OR_LIST` and
`finesam segment --manifest`: the run of `finesam.cli.dataset_runs` (torch-free, shared with `--onnx`) with the
weights' digests as its settings and the images shared out between the processes of a torchrun job."""

import argparse
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from finesam.cli.common import load_model
from finesam.cli.dataset_runs import Segmenter, Share, checked_run, file_digest, label_dataset
from finesam.labelling import ImageJob
from finesam.model import SegmentAnything
from finesam.training.distributed import Distributed
from finesam.weights import hq_weights_for

# how long a process waits for the others at the end (a resumed run can leave one process most of the work)
WAIT_FOR_OTHERS = timedelta(days=1)


def run_labelling(
    args: argparse.Namespace,
    jobs: list[ImageJob],
    command: str,
    options: dict[str, Any],
    segmenter: Callable[[SegmentAnything], Segmenter],
    categories: dict[int, str] | None = None,
) -> None:
    """Segments every job with the segmenter made for the loaded model and writes the run's outputs.

    Args:
        args: the parsed command line (model options, --out, --png, --polygons, --overwrite, --quiet).
        jobs: every image of the run, in output order (each process takes its share).
        command: the command's name, recorded with `options` (what the results depend on besides the images).
        options: the settings of the command that change its results.
        segmenter: makes the function from an image and its job to its objects, given the model.
        categories: the category names by id (all listed in annotations.json); None: the ids the objects use.
    """
    inputs = [("--weights", args.weights), *(("--hq", path) for path in [args.hq] if path is not None)]
    inputs += [("--lora", path) for path in args.lora]

    def identity() -> dict[str, Any]:
        hq = hq_weights_for(args.weights, args.hq)
        return {
            "command": command,
            **options,
            "dtype": args.dtype,
            "hq_only": args.hq_only,
            "weights": file_digest(args.weights, "--weights"),
            "hq": None if hq is None or hq == args.weights else file_digest(hq, "--hq"),
            "loras": [file_digest(path, "--lora") for path in args.lora],
        }

    run = checked_run(args, inputs, identity, categories)
    place = Distributed.from_environment()
    args.device = str(place.join(torch.device(args.device), timeout=WAIT_FOR_OTHERS))
    share = Share(place.rank, place.world, dist.barrier) if place.world > 1 else Share()
    label_dataset(args, run, jobs, command, lambda: segmenter(load_model(args)), share)
