"""Labelling a whole dataset, shared by `finesam everything DIR_OR_LIST` and `finesam segment --manifest`: the
model loaded once, images decoded ahead, each image's result committed as it is done, the images shared out
between the processes of a torchrun job, and rank 0 merging everything into OUT/annotations.json."""

import argparse
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from finesam.cli.common import UsageError, check_distinct_paths, check_output_folder, load_model
from finesam.inputs import as_rgb, open_image
from finesam.labelling import ImageJob, LabellingRun, SegmentedObject
from finesam.labelling.coco import check_polygons_available
from finesam.labelling.prefetch import prefetched
from finesam.labelling.run import OUTPUTS
from finesam.model import SegmentAnything
from finesam.progress import progress_bar
from finesam.training.distributed import Distributed
from finesam.weights import OutputError, hq_weights_for
from finesam.weights.download import sha256_of

# how long a process waits for the others at the end (a resumed run can leave one process most of the work)
WAIT_FOR_OTHERS = timedelta(days=1)

Segmenter = Callable[[Image.Image, ImageJob], list[SegmentedObject]]


def labelling_options() -> argparse.ArgumentParser:
    """--png, --polygons, --overwrite: the outputs of a labelling run."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("datasets (a folder, a list of images or a manifest)")
    group.add_argument(
        "--polygons", action="store_true", help="polygon segmentations in annotations.json (scikit-image)"
    )
    group.add_argument("--png", action="store_true", help="also one mask PNG per object, under OUT/masks/")
    group.add_argument(
        "--keep-empty",
        action="store_true",
        help="keep empty masks as annotations (area 0); by default they are left out and counted in the summary",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an OUT made with other settings (removes only what the earlier run recorded), or "
        "replace an annotations.json / errors.jsonl that no run recorded",
    )
    return options


def refuse_labelling_options(args: argparse.Namespace, alternative: str) -> None:
    """The dataset options given to a single-image command: an error that says what to use instead."""
    given = [
        f"--{name.replace('_', '-')}" for name in ("polygons", "png", "keep_empty", "overwrite") if getattr(args, name)
    ]
    if given:
        raise UsageError(f"{', '.join(given)}: for folders, lists and manifests; for one image {alternative}")


def file_digest(path: Path, option: str) -> str:
    """The SHA-256 of a weights file, which a run's results depend on."""
    try:
        return sha256_of(path)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot read it ({e.strerror or e})") from None


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
    out: Path = check_output_folder(args.out, "--out")
    # the files of the folder itself are never an input (a manifest kept as OUT/errors.jsonl, say)
    sources = [
        (option, getattr(args, name, None)) for option, name in (("--manifest", "manifest"), ("SOURCE", "source"))
    ]
    inputs = [(option, path) for option, path in sources if path is not None]
    inputs += [("--weights", args.weights), *(("--hq", path) for path in [args.hq] if path is not None)]
    inputs += [("--lora", path) for path in args.lora]
    check_distinct_paths([("--out", out / name) for name in ("run.json", *OUTPUTS)], inputs)
    if args.polygons:
        check_polygons_available()
    hq = hq_weights_for(args.weights, args.hq)
    identity = {
        "command": command,
        **options,
        "dtype": args.dtype,
        "hq_only": args.hq_only,
        "weights": file_digest(args.weights, "--weights"),
        "hq": None if hq is None or hq == args.weights else file_digest(hq, "--hq"),
        "loras": [file_digest(path, "--lora") for path in args.lora],
    }
    run = LabellingRun(
        out, identity, polygons=args.polygons, png=args.png, keep_empty=args.keep_empty, categories=categories
    )
    # by every process: a refused run stops them all alike, before the model loads
    run.check_outputs(args.overwrite)
    if not args.overwrite:
        run.check()
    place = Distributed.from_environment()
    args.device = str(place.join(torch.device(args.device), timeout=WAIT_FOR_OTHERS))
    if place.main:
        run.start(args.overwrite)
    if place.world > 1:
        dist.barrier()  # the folder is ready (and cleared, with --overwrite) before anyone writes into it
    segment = segmenter(load_model(args))
    started = time.perf_counter()
    mine = jobs[place.rank :: place.world]
    pending = [job for job in mine if not run.done(job)]
    masks = 0
    quiet = args.quiet or not place.main
    with progress_bar(len(mine), "images", unit="img", initial=len(mine) - len(pending), quiet=quiet) as bar:
        try:
            for job, image in prefetched(pending, lambda job: as_rgb(open_image(job.path))):
                error = str(image) if isinstance(image, ValueError) else None  # its message names the file
                if not isinstance(image, ValueError):
                    try:
                        masks += run.commit(job, image, segment(image, job))
                    except ValueError as e:
                        error = f"{job.file_name}: {e}"
                if error is not None:
                    run.fail(job, error)
                    bar.write(f"finesam {command}: {error}", file=sys.stderr)
                bar.set_postfix_str(f"{masks} masks", refresh=False)
                bar.update(1)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"what is done is kept in {run.parts}: the same command resumes") from None
        except OutputError as e:  # the disk is full, say: every image after this one would fail the same way
            kept = f"{e.strerror}; what is done is kept in {run.parts}: the same command resumes"
            raise OutputError(e.errno, kept) from None
    if place.world > 1:
        dist.barrier()  # every part is written
    if not place.main:
        return
    summary = run.merge(jobs)
    elapsed = time.perf_counter() - started
    skipped = len(mine) - len(pending) if place.world == 1 else 0
    print(
        f"{out / 'annotations.json'}\t{summary.images} images, {summary.masks} masks, {summary.failures} failed, "
        f"{elapsed:.1f} s"
        + (f" ({skipped} done before)" if skipped else "")
        + (f"; {summary.empty} empty masks left out (--keep-empty keeps them)" if summary.empty else "")
    )
    if summary.failures:
        print(f"finesam {command}: {summary.failures} images failed: see {out / 'errors.jsonl'}", file=sys.stderr)
        raise SystemExit(1)
