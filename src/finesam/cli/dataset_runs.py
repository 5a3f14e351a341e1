"""The dataset runs' command-line half that needs no torch, shared by the torch model's runs
(`finesam.cli.labelling`: `finesam everything DIR_OR_LIST`, `finesam segment --manifest`) and the exported
model's (`finesam segment --manifest --onnx DIR`): the options, the checks before any model loads, and the run
itself (images decoded ahead, each image's result committed as it is done, this process's share of the images,
the merge into OUT/annotations.json by the first process)."""

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from finesam.cli.basics import UsageError, check_distinct_paths, check_output_folder
from finesam.files import OutputError, sha256_of
from finesam.inputs import as_rgb, open_image
from finesam.labelling import ImageJob, LabellingRun, SegmentedObject, read_manifest
from finesam.labelling.coco import check_polygons_available
from finesam.labelling.prefetch import prefetched
from finesam.labelling.run import OUTPUTS
from finesam.progress import progress_bar

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


def check_one_image(args: argparse.Namespace) -> None:
    """The checks of a one-image `segment` command line (torch or `--onnx`) before anything loads: an image,
    no dataset options, prompts from a file or from the command line, not both."""
    if args.image is None:
        raise UsageError("give the IMAGE to segment (or --manifest PROMPTS.jsonl for many images)")
    refuse_labelling_options(args, "--out names the mask file")
    if args.prompts is not None and (args.box or args.point):
        raise UsageError("give prompts either with --prompts or with --box/--point, not both")
    if args.prompts is None and not args.box and not args.point:
        raise UsageError("give at least one --box or --point (or --prompts PROMPTS.json)")


def file_digest(path: Path, option: str) -> str:
    """The SHA-256 of an input file (weights, an export's model), which a run's results depend on."""
    try:
        return sha256_of(path)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot read it ({e.strerror or e})") from None


def manifest_jobs(args: argparse.Namespace) -> list[ImageJob]:
    """The images and prompts of `segment --manifest`, refused with the options that give them otherwise."""
    given = [
        option
        for option, value in (
            ("IMAGE", args.image),
            ("--prompts", args.prompts),
            ("--box", args.box),
            ("--point", args.point),
            ("--logits", args.logits),
            ("--overlay", args.overlay),
        )
        if value
    ]
    if given:
        raise UsageError(f"--manifest gives the images and prompts: drop {', '.join(given)}")
    try:
        return read_manifest(args.manifest)
    except ValueError as e:
        raise UsageError(str(e)) from None


@dataclass(frozen=True)
class Share:
    """This process's share of a run: the images `rank::world` of the list, and how to wait until every process
    of the run has come to the same point (one process: nothing to wait for)."""

    rank: int = 0
    world: int = 1
    wait_for_others: Callable[[], object] = lambda: None

    @property
    def main(self) -> bool:
        return self.rank == 0


def checked_run(
    args: argparse.Namespace,
    inputs: list[tuple[str, Path]],
    identity: Callable[[], dict[str, Any]],
    categories: dict[int, str] | None = None,
) -> LabellingRun:
    """The run of `args.out`, checked before any model loads: the folder writable, no output an input, what an
    earlier run left there resumable with these settings (or `--overwrite`).

    Args:
        args: the parsed command line (--out, --png, --polygons, --keep-empty, --overwrite, the source).
        inputs: the model's files, as (option, path).
        identity: what the results depend on besides the images (the command, its options, the model's
            digests), computed after the cheaper checks.
        categories: the category names by id (all listed in annotations.json); None: the ids the objects use.
    """
    out: Path = check_output_folder(args.out, "--out")
    # the files of the folder itself are never an input (a manifest kept as OUT/errors.jsonl, say)
    sources = [
        (option, getattr(args, name, None)) for option, name in (("--manifest", "manifest"), ("SOURCE", "source"))
    ]
    given = [(option, path) for option, path in sources if path is not None]
    check_distinct_paths([("--out", out / name) for name in ("run.json", *OUTPUTS)], [*given, *inputs])
    if args.polygons:
        check_polygons_available()
    run = LabellingRun(
        out, identity(), polygons=args.polygons, png=args.png, keep_empty=args.keep_empty, categories=categories
    )
    # by every process: a refused run stops them all alike, before the model loads
    run.check_outputs(args.overwrite)
    if not args.overwrite:
        run.check()
    return run


def label_dataset(
    args: argparse.Namespace,
    run: LabellingRun,
    jobs: list[ImageJob],
    command: str,
    load: Callable[[], Segmenter],
    share: Share | None = None,
) -> None:
    """Segments this process's share of `jobs` with the segmenter `load` makes (the model loaded once, after
    the folder is ready) and writes the run's outputs; the first process merges them and prints the summary.

    Args:
        args: the parsed command line (--overwrite, --quiet).
        run: from `checked_run`.
        jobs: every image of the run, in output order (each process takes its share).
        command: the command's name, for messages.
        load: loads the model and returns the function from an image and its job to its objects.
        share: this process's place among the run's processes (None: the only one).
    """
    share = share or Share()
    if share.main:
        run.start(args.overwrite)
    share.wait_for_others()  # the folder is ready (and cleared, with --overwrite) before anyone writes into it
    segment = load()
    started = time.perf_counter()
    mine = jobs[share.rank :: share.world]
    pending = [job for job in mine if not run.done(job)]
    masks = 0
    quiet = args.quiet or not share.main
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
    share.wait_for_others()  # every part is written
    if not share.main:
        return
    summary = run.merge(jobs)
    elapsed = time.perf_counter() - started
    skipped = len(mine) - len(pending) if share.world == 1 else 0
    print(
        f"{run.out / 'annotations.json'}\t{summary.images} images, {summary.masks} masks, {summary.failures} "
        f"failed, {elapsed:.1f} s"
        + (f" ({skipped} done before)" if skipped else "")
        + (f"; {summary.empty} empty masks left out (--keep-empty keeps them)" if summary.empty else "")
    )
    if summary.failures:
        print(f"finesam {command}: {summary.failures} images failed: see {run.out / 'errors.jsonl'}", file=sys.stderr)
        raise SystemExit(1)
