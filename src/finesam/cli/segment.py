"""`finesam segment`: masks from box and point prompts, the image encoded once for all of them."""

import argparse
from pathlib import Path

from PIL import Image

from finesam.cli.common import (
    UsageError,
    check_distinct_paths,
    inference,
    load_model,
)
from finesam.cli.dataset_runs import Segmenter, check_one_image, labelling_options, manifest_jobs
from finesam.cli.labelling import run_labelling
from finesam.cli.onnx_segment import run_onnx_segment
from finesam.cli.options import Commands, add_command, lora_options, model_options
from finesam.cli.prompting import (
    MaskWriter,
    command_line_prompt,
    mask_outputs,
    onnx_options,
    prompt_options,
    read_prompt_file,
    save_prompts_overlay,
)
from finesam.cli.text_prompts import run_text, text_options
from finesam.inputs import as_rgb, open_image
from finesam.labelling import ImageJob, SegmentedObject
from finesam.labelling.segmenters import prompted_objects
from finesam.model import SegmentAnything
from finesam.model.prompts import prepare_prompts
from finesam.progress import progress
from finesam.weights import check_output


@inference
def run_segment(args: argparse.Namespace) -> None:
    if args.onnx is not None:  # here only where `finesam.cli.main` did not see it (an abbreviated --onnx)
        run_onnx_segment(args)  # which refuses --weights
        return
    if args.text is not None:
        run_text(args)
        return
    if args.detections is not None:
        raise UsageError("--detections lists what --text finds: give --text")
    if args.manifest is not None:
        run_segment_manifest(args)
        return
    check_one_image(args)
    prompts = read_prompt_file(args.prompts) if args.prompts is not None else [command_line_prompt(args)]
    image = as_rgb(open_image(args.image))
    size = (image.height, image.width)  # the checks below do not depend on the model's input size
    counts = []  # masks per prompt
    for i, prompt in enumerate(prompts):  # every prompt checked before the model loads and encodes the image
        try:
            checked = prepare_prompts(
                **prompt.objects.as_arrays(), original_size=size, input_size=size, mask_input_size=0
            )
        except ValueError as e:
            raise UsageError(f"prompt {i}: {e}" if args.prompts is not None else str(e)) from None
        counts.append(checked.batch_size)
    _check_outputs(args, sum(counts))  # before the model loads
    model = load_model(args)
    embedding = model.encode_image(image)  # once, for every prompt
    resize = (embedding.input_size, embedding.original_size)
    writer = MaskWriter(args, sum(counts))
    # masks are written as they come: memory holds one mask's float logits at full size, not every mask's
    for prompt in progress(prompts, "prompts", quiet=args.quiet or len(prompts) == 1):
        multimask = args.multimask if prompt.multimask is None else prompt.multimask
        low_res, iou = model.decode_prompts(embedding, **prompt.objects.as_arrays(), multimask_output=multimask)
        scores, best = iou.max(dim=1)  # each box's best mask (its only one without multimask)
        for j in range(len(scores)):  # upsampled one at a time: never a float copy of every mask at full size
            chosen = low_res[j : j + 1, int(best[j]) : int(best[j]) + 1]
            values = model.postprocess(chosen, *resize)[0, 0].float().cpu().numpy()
            writer.write(values, f"predicted IoU {scores[j].item():.4f}")
    if args.overlay is not None:
        print(save_prompts_overlay(args.overlay, image, writer.drawn, prompts))


def _check_outputs(args: argparse.Namespace, total: int) -> None:
    """Every file `segment IMAGE` will write: writable, of the right kind, and none of them an input or another
    output (`check_distinct_paths`)."""
    outputs = mask_outputs(args, total)
    if args.overlay is not None:
        outputs.append(("--overlay", check_output(args.overlay)))
    inputs = [("IMAGE", args.image), ("--weights", args.weights)]
    inputs += [(option, path) for option, path in (("--hq", args.hq), ("--prompts", args.prompts)) if path is not None]
    inputs += [("--lora", path) for path in args.lora]
    check_distinct_paths(outputs, inputs)


def run_segment_manifest(args: argparse.Namespace) -> None:
    """One mask per box or point list of every image of a manifest into OUT/annotations.json."""
    jobs = manifest_jobs(args)

    def segmenter(model: SegmentAnything) -> Segmenter:
        def segment(image: Image.Image, job: ImageJob) -> list[SegmentedObject]:
            assert job.prompts is not None  # every manifest line has prompts
            return prompted_objects(model, image, job.prompts, multimask=args.multimask)

        return segment

    run_labelling(args, jobs, "segment", {"multimask": args.multimask}, segmenter)


def add_commands(commands: Commands) -> None:
    segment = add_command(
        commands,
        "segment",
        "segment an image with box and point prompts, or by name (--text)",
        (model_options(), lora_options(), text_options(), labelling_options(), prompt_options(), onnx_options()),
    )
    segment.add_argument(
        "image",
        type=Path,
        nargs="?",
        metavar="IMAGE",
        help="the image (any format PIL reads); with --text also a folder of images or a text file of image paths",
    )
    segment.add_argument(
        "--compile", action="store_true", help="torch.compile the image encoder (slow first call; for many images)"
    )
    segment.set_defaults(run=run_segment)
