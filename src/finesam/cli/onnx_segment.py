"""`finesam segment IMAGE --onnx DIR`: the masks of `finesam segment` from an export (`finesam export`), run by
onnxruntime or OpenVINO through `OnnxPredictor`, without torch; and `finesam segment --manifest M --onnx DIR
--out OUT`, the dataset run of `finesam.cli.dataset_runs` (the torch command's OUT folder, with the export's
digests as its settings).

`finesam.cli.main` sends a `segment` command line with `--onnx` here before anything imports torch; the options
are the torch command's own declarations (`finesam.cli.prompting`, `finesam.cli.dataset_runs`), so both read a
command line the same way. What needs the torch model is refused in one line: its options, text prompts (the
detector is torch), `everything --onnx` (the automatic generator is torch), and torchrun's several processes.
"""

import argparse
import os
import sys
from pathlib import Path

from PIL import Image

from finesam.cli.basics import (
    HelpFormatter,
    UsageError,
    check_distinct_paths,
    join_signed_values,
)
from finesam.cli.dataset_runs import (
    Segmenter,
    check_one_image,
    checked_run,
    file_digest,
    label_dataset,
    labelling_options,
    manifest_jobs,
)
from finesam.cli.prompting import (
    MaskWriter,
    command_line_prompt,
    mask_outputs,
    onnx_options,
    prompt_options,
    read_prompt_file,
    save_prompts_overlay,
)
from finesam.files import OutputError, check_output
from finesam.inputs import as_rgb, check_prompts, open_image
from finesam.labelling import ImageJob, SegmentedObject
from finesam.labelling.exported import exported_objects
from finesam.onnx.interface import DESCRIPTION_FILE, EXTERNAL_DATA_SUFFIX
from finesam.onnx.predictor import check_multimask, read_description
from finesam.onnx.runtimes import check_precision

# the torch model's options, which an export fixes (or has no use for)
TORCH_ONLY = ("--weights", "--hq", "--hq-only", "--lora", "--device", "--dtype", "--compile")
# text prompts (`finesam.cli.text_prompts`): their boxes come from a zero-shot detector, a torch model
TEXT_ONLY = ("--text", "--detector", "--box-threshold", "--text-threshold", "--max-detections", "--detections")
# the other commands that an `--onnx` is given to by mistake, and why they need the torch model
REFUSED = {
    "everything": "--onnx: the automatic mask generator (its point grid, crops and NMS) runs the torch model; "
    "drop --onnx and give --weights"
}


def _asks_for_onnx(argv: list[str]) -> bool:
    return any(a == "--onnx" or a.startswith("--onnx=") for a in argv)


def requested(argv: list[str]) -> bool:
    """A `segment` command line that asks for `--onnx` (as `--onnx DIR` or `--onnx=DIR`)."""
    return bool(argv) and argv[0] == "segment" and _asks_for_onnx(argv)


def refusal(argv: list[str]) -> str | None:
    """Why a command other than `segment` cannot take the `--onnx` it is given (None: not such a command line)."""
    return REFUSED.get(argv[0]) if argv and _asks_for_onnx(argv) else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finesam segment",
        description="segment an image with box and point prompts, or every image of a manifest, with an exported "
        "model (--onnx)",
        parents=[prompt_options(), onnx_options(), labelling_options()],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("image", type=Path, nargs="?", help="the image (any format PIL reads)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar (a manifest run's)")
    parser.add_argument(
        "--max-pixels", type=int, metavar="N", help="refuse input images with more pixels (PIL's limit otherwise)"
    )
    for option in (*TORCH_ONLY, *TEXT_ONLY):
        parser.add_argument(option, nargs="?", const=True, help=argparse.SUPPRESS)
    return parser


def run_onnx_segment(args: argparse.Namespace) -> None:
    """The masks of every prompt of `args` (parsed by `build_parser` or by the torch command's parser)."""
    given = [option for option in TORCH_ONLY if _given(args, option)]
    if given:
        raise UsageError(f"--onnx runs an export, which fixes the model: drop {', '.join(given)}")
    text = [option for option in TEXT_ONLY if _given(args, option)]
    if text:
        raise UsageError(f"{', '.join(text)}: text prompts find their boxes with a torch detector: drop --onnx")
    if args.runtime != "openvino" and args.cache_dir is not None:
        raise UsageError("--cache-dir keeps OpenVINO's compiled models: add --runtime openvino")
    if args.manifest is None:
        check_one_image(args)
    if not (args.onnx / DESCRIPTION_FILE).is_file():
        raise UsageError(f"--onnx {args.onnx}: no {DESCRIPTION_FILE} there; give a folder `finesam export` wrote")
    if args.max_pixels is not None:
        if args.max_pixels < 1:
            raise UsageError(f"--max-pixels must be at least 1, got {args.max_pixels}")
        Image.MAX_IMAGE_PIXELS = args.max_pixels
    if args.manifest is not None:
        run_onnx_manifest(args)
        return
    prompts = read_prompt_file(args.prompts) if args.prompts is not None else [command_line_prompt(args)]
    image = as_rgb(open_image(args.image))
    size = (image.height, image.width)
    counts = []
    for i, prompt in enumerate(prompts):  # every prompt checked before the model loads and encodes the image
        try:
            checked = check_prompts(**prompt.objects.as_arrays(), original_size=size, mask_input_size=0)
        except ValueError as e:
            raise UsageError(f"prompt {i}: {e}" if args.prompts is not None else str(e)) from None
        counts.append(checked.batch)
    total = sum(counts)
    outputs = mask_outputs(args, total)
    if args.overlay is not None:
        outputs.append(("--overlay", check_output(args.overlay)))
    inputs = [("IMAGE", args.image), *(("--onnx", path) for path in sorted(args.onnx.iterdir()) if path.is_file())]
    if args.prompts is not None:
        inputs.append(("--prompts", args.prompts))
    check_distinct_paths(outputs, inputs)

    from finesam.onnx import OnnxPredictor  # the runtime's import, after every check

    predictor = OnnxPredictor(
        args.onnx, runtime=args.runtime, precision=args.precision, threads=args.threads, cache_dir=args.cache_dir
    )
    embedding = predictor.encode_image(image)  # once, for every prompt
    writer = MaskWriter(args, total)
    for prompt in prompts:
        multimask = args.multimask if prompt.multimask is None else prompt.multimask
        prediction = predictor.predict(
            embedding, **prompt.objects.as_arrays(), multimask_output=multimask, return_logits=True
        )
        best = prediction.iou_predictions.argmax(axis=1)  # each box's best mask (its only one without multimask)
        for j, k in enumerate(best):
            writer.write(prediction.masks[j, k], f"predicted IoU {prediction.iou_predictions[j, k]:.4f}")
    if args.overlay is not None:
        print(save_prompts_overlay(args.overlay, image, writer.drawn, prompts))


def export_digests(folder: Path, description: dict) -> dict[str, str]:
    """The SHA-256 of every file of the export that the predictor reads (model.json, the encoder and the
    decoder, the weights of those over protobuf's limit), by name: a dataset run's results depend on them."""
    names = [DESCRIPTION_FILE, *(description["files"][side] for side in ("encoder", "decoder"))]
    names += [name + EXTERNAL_DATA_SUFFIX for name in names[1:] if (folder / (name + EXTERNAL_DATA_SUFFIX)).is_file()]
    return {name: file_digest(folder / name, "--onnx") for name in names}


def run_onnx_manifest(args: argparse.Namespace) -> None:
    """`segment --manifest M --onnx DIR --out OUT`: one mask per box or point list of every image of a manifest
    into OUT/annotations.json, as the torch command writes it (`prompted_objects`' choices, the same files,
    resumable), the export's digests and the encoder's precision recorded in run.json in place of the weights'
    digests and the dtype. One process: under torchrun (WORLD_SIZE > 1) it is refused."""
    if int(os.environ.get("WORLD_SIZE", "1") or "1") > 1:
        raise UsageError("--onnx runs in one process (the runtime uses every core; --threads): run it without torchrun")
    jobs = manifest_jobs(args)
    description = read_description(args.onnx)
    check_multimask(description, args.multimask)  # fixed by the export
    check_precision(args.runtime, args.precision)  # before run.json is written
    inputs = [("--onnx", path) for path in sorted(args.onnx.iterdir()) if path.is_file()]

    def identity() -> dict:
        digests = export_digests(args.onnx, description)
        return {"command": "segment", "multimask": args.multimask, "precision": args.precision, "onnx": digests}

    run = checked_run(args, inputs, identity)

    def load() -> Segmenter:
        from finesam.onnx import OnnxPredictor  # the runtime's import, after every check

        predictor = OnnxPredictor(
            args.onnx, runtime=args.runtime, precision=args.precision, threads=args.threads, cache_dir=args.cache_dir
        )

        def segment(image: Image.Image, job: ImageJob) -> list[SegmentedObject]:
            assert job.prompts is not None  # every manifest line has prompts
            return exported_objects(predictor, image, job.prompts, multimask=args.multimask)

        return segment

    label_dataset(args, run, jobs, "segment", load)


def main(argv: list[str]) -> None:
    """`finesam segment ARGS --onnx DIR` (ARGS without the command's name): errors as the other commands give
    them (one line, status 2; a failed write, status 1)."""
    args = build_parser().parse_args(join_signed_values(argv))
    try:
        run_onnx_segment(args)
    except (UsageError, ValueError) as e:
        print(f"finesam segment: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OutputError as e:
        print(f"finesam segment: error: {e.strerror}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as e:  # a dataset run says what it kept
        print("finesam segment: interrupted" + (f"; {e}" if str(e) else ""), file=sys.stderr)
        raise SystemExit(130) from None


def _given(args: argparse.Namespace, option: str) -> bool:
    value = getattr(args, option.removeprefix("--").replace("-", "_"), None)
    defaults = {"--device": "cpu", "--dtype": "float32"}  # the torch command's defaults are not a choice
    return value not in (None, False, [], defaults.get(option))
