"""`export`: a `SegmentAnything` (with HQ-SAM and LoRAs injected or not) to encoder.onnx + decoder.onnx +
model.json, written so that no half-written file ever carries a final name.

torch's TorchScript-based exporter (`torch.onnx.export(dynamo=False)`) is used, as the official SAM script
does: the official decoder interface sizes its `masks` output from the *values* of `orig_im_size`, which
the tracer records as ONNX shape arithmetic; torch.export (the dynamo exporter) cannot express an output
shape that depends on input values. See docs/onnx.md.
"""

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from refiners.fluxion.adapters import LoraAdapter
from torch.jit import TracerWarning  # pyright: ignore[reportPrivateImportUsage]
from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET as MAX_OPSET

from finesam.adapters.hq.layers import HQFeatureFusion, HQOutputRule, HQRule
from finesam.fast import reference_paths
from finesam.inputs import (
    BOXES_FIRST_FIXED_COUNT,
    BOXES_FIRST_PADDED,
    FIXED_COUNT_PADDING_POINT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LONGEST_SIDE_PADDED,
    LONGEST_SIDE_PADDED_UNIT,
    MASK_THRESHOLD,
    PIXEL_MEAN,
    PIXEL_STD,
    SQUARE,
    STRETCH,
)
from finesam.model.config import preset_name
from finesam.model.sam import SegmentAnything
from finesam.onnx import interface as io
from finesam.onnx.graphs import DecoderGraph, EncoderGraph, interm_layers, loras_merged
from finesam.weights.io import process_running, process_umask

# protobuf cannot hold a file over 2 GB: above this the weights go to one external-data file beside it
INLINE_LIMIT = 2**31 - 2**24


@dataclass(frozen=True)
class ExportReport:
    folder: Path
    files: dict[str, int]  # file name -> bytes
    description: dict[str, Any]  # the content of model.json
    seconds: float

    def summary(self) -> str:
        sizes = ", ".join(f"{name} ({size / 2**20:.1f} MB)" for name, size in self.files.items())
        return f"exported to {self.folder} in {self.seconds:.0f} s: {sizes}"


def check_opset(opset: int) -> None:
    """Raises a `ValueError` unless the exporter writes `opset`."""
    if not io.MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset {opset} is not supported: the exporter writes opsets {io.MIN_OPSET} to {MAX_OPSET}")


def _adapters(model: SegmentAnything) -> dict[str, Any]:
    rule = model.find(HQRule)  # HQ-SAM (HQOutputRule) or HQ-SAM 2 (HQ2OutputRule): declared the same way
    loras: dict[str, float] = {}
    for adapter, _ in model.walk(LoraAdapter):
        loras.update(adapter.scales)
    return {
        "hq": None if rule is None else {"hq_mask_only": rule.hq_mask_only},
        "loras": [{"name": name, "scale": scale} for name, scale in sorted(loras.items())],
    }


def _interm_shape(model: SegmentAnything) -> list[int]:
    """The shape of the official HQ-SAM interface's `interm_embeddings`: (K, 1, E, E, C)."""
    config = model.config
    count = len(interm_layers(model))
    return [count, 1, config.embedding_size, config.embedding_size, config.encoder.early_embedding_dim]


def check_interface(model: SegmentAnything, encoder_input: str, hq_decoder: str) -> None:
    """Raises a `ValueError` unless `model` can be exported with these interface options."""
    if encoder_input not in io.ENCODER_INPUTS:
        raise ValueError(f"unknown encoder input {encoder_input!r}: one of {', '.join(io.ENCODER_INPUTS)}")
    if hq_decoder not in io.HQ_DECODERS:
        raise ValueError(f"unknown HQ decoder interface {hq_decoder!r}: one of {', '.join(io.HQ_DECODERS)}")
    preprocessing = model.processing_names["preprocessing"]
    if encoder_input == io.PIXELS_INPUT and preprocessing != LONGEST_SIDE_PADDED:
        raise ValueError(
            f"--encoder-input pixels is SAM's interface (longest side resized, then normalised and padded); this "
            f"model's preprocessing is {preprocessing!r}"
        )
    if hq_decoder == io.OFFICIAL_HQ_DECODER and model.find(HQFeatureFusion) is None:
        raise ValueError("--hq-decoder official is HQ-SAM's interface: export with HQ-SAM (--hq), on SAM 1 or TinyViT")


def _describe(
    model: SegmentAnything,
    multimask_output: bool,
    opset: int,
    quantized: bool,
    encoder_input: str = io.TENSOR_INPUT,
    hq_decoder: str = io.HQ_FEATURES_DECODER,
) -> dict[str, Any]:
    config = model.config
    adapters = _adapters(model)
    masks = 3 if multimask_output else 1
    rule = model.find(HQRule)
    # HQ-SAM outputs one mask per prompt; HQ-SAM 2 one per SAM mask (each plus the HQ mask), or the HQ mask alone
    if isinstance(rule, HQOutputRule) or (rule is not None and rule.hq_mask_only):
        masks = 1
    hq_features = model.find(HQFeatureFusion) is not None  # HQ-SAM's fused features; HQ-SAM 2 reads none
    features = tuple(list(shape) for shape in model.decoder_image_features().values())
    files = {"encoder": io.ENCODER_FILE, "decoder": io.DECODER_FILE}
    if quantized:
        files |= {"encoder_quantized": io.QUANTIZED_FILES[io.ENCODER_FILE]}
        files |= {"decoder_quantized": io.QUANTIZED_FILES[io.DECODER_FILE]}
    return {
        "format": io.FORMAT,
        "version": io.FORMAT_VERSION,
        "model": {
            "size": preset_name(config),
            "encoder": type(config.encoder).__name__,
            **adapters,
            # the model's names of the encoder's extra outputs, in order (high_res_feats_0, ...)
            "image_features": list(model.decoder_image_features()),
        },
        "multimask_output": multimask_output,
        "opset": opset,
        "exporter": f"torch.onnx TorchScript-based (torch {torch.__version__.split('+')[0]})",
        "files": files,
        "preprocessing": {
            "image_size": config.image_size,
            "encoder_input_size": model.encoder_input_size,
            **PREPROCESSING[model.processing_names["preprocessing"]],
        }
        | _prompts(model.processing_names["prompt_order"], model.fixed_prompt_points())
        | {"mask_threshold": MASK_THRESHOLD},
        # by name: the ONNX predictor runs the numpy twins of these (a version 1 file has none: SAM's)
        "processing": dict(model.processing_names),
        # the tensor conventions of other tools, where asked for (docs/onnx.md)
        "interface": {"encoder_input": encoder_input, "hq_decoder": hq_decoder if hq_features else None},
        **io.with_interface(
            io.tensors(
                config.image_size,
                config.decoder.prompt_dim,
                config.embedding_size,
                hq_features,
                masks,
                features,
                model.extra_decoder_outputs,
                model.takes_mask_input,
                model.encoder_input_size,
            ),
            encoder_input,
            hq_decoder,
            _interm_shape(model) if hq_features and hq_decoder == io.OFFICIAL_HQ_DECODER else None,
        ),
    }


# what each named preprocessing does, in words (model.json)
PREPROCESSING: dict[str, dict[str, Any]] = {
    LONGEST_SIDE_PADDED: {
        "resize": "longest side to image_size, PIL bilinear on 8-bit RGB, rounded half up",
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
        "padding": "zeros, bottom and right, after normalisation",
        "point_coords": "pixels of the resized image (x * resized_width / width, y * resized_height / height)",
    },
    LONGEST_SIDE_PADDED_UNIT: {
        "resize": "longest side to encoder_input_size, PIL bilinear on 8-bit RGB, rounded half up; the image's "
        "size in the prompt frame (point_coords, masks) is its longest side scaled to image_size, rounded half up",
        "pixel_mean": [m / 255 for m in PIXEL_MEAN],
        "pixel_std": [s / 255 for s in PIXEL_STD],
        "pixel_scale": "pixels divided by 255 before normalisation",
        "padding": "zeros, bottom and right, after normalisation, to encoder_input_size",
        "point_coords": "pixels of the image resized in the prompt frame (x * resized_width / width, ...)",
    },
    SQUARE: {
        "resize": "to image_size x image_size (aspect ratio not kept), bilinear with antialiasing on [0, 1] "
        "floats (torch's F.interpolate antialias=True, align_corners=False)",
        "pixel_mean": list(IMAGENET_MEAN),
        "pixel_std": list(IMAGENET_STD),
        "padding": "none",
        "point_coords": "pixels of the model input (x * image_size / width, y * image_size / height)",
    },
    STRETCH: {
        "resize": "to image_size x image_size (aspect ratio not kept), bilinear without antialiasing on [0, 1] "
        "floats (torch's F.interpolate, align_corners=False)",
        "pixel_mean": list(IMAGENET_MEAN),
        "pixel_std": list(IMAGENET_STD),
        "padding": "none",
        "point_coords": "pixels of the model input (x * image_size / width, y * image_size / height)",
    },
}

LABELS = {"-1": "padding", "0": "background", "1": "foreground", "2": "box top-left", "3": "box bottom-right"}


def _prompts(order: str, point_count: int | None) -> dict[str, Any]:
    if order == BOXES_FIRST_FIXED_COUNT:
        x, y = FIXED_COUNT_PADDING_POINT
        rule = f"box corners first, then the points, then ({x:g}, {y:g}) with label -1 up to point_count points"
        return {"point_labels": LABELS, "padding_point": rule, "point_count": point_count}
    if order == BOXES_FIRST_PADDED:
        rule = "box corners first, then the points, then (0, 0) with label -1 whenever there is either"
    else:
        rule = "points first, then (0, 0) with label -1 when there is no box, then the box corners"
    return {"point_labels": LABELS, "padding_point": rule}


def _example_inputs(model: SegmentAnything) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    config = model.config
    low = config.mask_input_size
    image = torch.zeros(1, 3, model.encoder_input_size, model.encoder_input_size)
    # one point and a padding point: the traced graph takes any number of points
    prompt = {
        io.POINT_COORDS: torch.tensor([[[10.0, 10.0], [0.0, 0.0]]]),
        io.POINT_LABELS: torch.tensor([[1.0, -1.0]]),
        io.MASK_INPUT: torch.zeros(1, 1, low, low),
        io.HAS_MASK_INPUT: torch.zeros(1),
        io.ORIG_IM_SIZE: torch.tensor([float(config.image_size), float(config.image_size)]),
    }
    return image, prompt


def _trace(module: torch.nn.Module, args: tuple[Any, ...], path: Path, opset: int, **names: Any) -> None:
    with warnings.catch_warnings():
        # the tracer's notes on values it records as constants: image size, token counts, chunk sizes; all
        # fixed by the interface (only the number of points and the original image size vary, and stay dynamic)
        warnings.simplefilter("ignore", TracerWarning)
        # the exporter's own notice that it is deprecated (see the module docstring), and its internals'
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, args, str(path), opset_version=opset, dynamo=False, **names)


def _settle(raw: Path, final: Path) -> None:
    """The traced file `raw` (alone in its folder unless the exporter spilled weights beside it) as `final`,
    with its weights in one `final.data` file when it is over protobuf's limit."""
    spilled = len(list(raw.parent.iterdir())) > 1
    if not spilled and raw.stat().st_size < INLINE_LIMIT:
        raw.replace(final)
        return
    proto = onnx.load(str(raw))
    location = final.name + io.EXTERNAL_DATA_SUFFIX
    onnx.save_model(proto, str(final), save_as_external_data=True, all_tensors_to_one_file=True, location=location)


def _quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = (source.parent / (source.name + io.EXTERNAL_DATA_SUFFIX)).exists()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime logs a generic hint on the root logger for every model
    try:
        # the matrix products with weights only: that is where the weights and the time are. Unsigned 8-bit
        # weights, as the official script: signed or per-channel ones moved the masks three times as much
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul", "Gemm"],
            weight_type=QuantType.QUInt8,
            use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        root.setLevel(level)
    if external:  # onnxruntime names the data file after the model; ours is NAME.data
        data = target.parent / (target.name + io.EXTERNAL_DATA_SUFFIX)
        if not data.exists():
            proto = onnx.load(str(target))
            onnx.save_model(proto, str(target), save_as_external_data=True, location=data.name)


def export(
    model: SegmentAnything,
    folder: str | Path,
    *,
    multimask_output: bool = False,
    opset: int = io.OPSET,
    quantize: bool = False,
    encoder_input: str = io.TENSOR_INPUT,
    hq_decoder: str = io.HQ_FEATURES_DECODER,
) -> ExportReport:
    """Writes `encoder.onnx`, `decoder.onnx` and `model.json` (and with `quantize` the int8 `*.quant.onnx`)
    into `folder`, for the model as it is: HQ-SAM or HQ-SAM 2, if injected, with its `hq_mask_only` setting;
    injected LoRAs folded into the weights they adapt. The model is left as it was.

    Everything is written in a temporary folder beside `folder` first, then renamed into place; our files of
    an earlier export that this one does not write (a quantised pair) are removed, so `model.json` always
    describes the folder.

    Args:
        model: a float32 model on the CPU.
        folder: the output folder (created).
        multimask_output: the decoder outputs the three candidate masks (SAM) instead of one; HQ-SAM always
            outputs one (with it, SAM's best mask plus the HQ mask, as `predict` does); HQ-SAM 2 outputs the
            three, each plus the HQ mask (one with `hq_mask_only`: the HQ mask, with the best of the three IoUs).
        opset: the ONNX opset.
        quantize: also write dynamically int8-quantised models (onnxruntime's `quantize_dynamic`).
        encoder_input: "tensor" (the model input, (1, 3, S, S), preprocessed by the caller) or "pixels" (the
            resized RGB image, (H, W, 3) float32 0-255, normalised and padded inside the graph: the convention of
            samexporter's runners); SAM's preprocessing only.
        hq_decoder: with HQ-SAM, "features" (the encoder outputs the fused `hq_features`, the decoder takes them)
            or "official" (the official HQ-SAM ONNX decoder's `interm_embeddings`, which the encoder outputs).

    Returns:
        What was written, with sizes and time.
    """
    check_opset(opset)
    check_interface(model, encoder_input, hq_decoder)
    parameters = list(model.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in parameters):
        raise ValueError("export a float32 model on the CPU (load it without --device / --dtype)")
    start = time.perf_counter()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    description = _describe(model, multimask_output, opset, quantize, encoder_input, hq_decoder)
    image, prompt = _example_inputs(model)
    pixels_input, official_hq = encoder_input == io.PIXELS_INPUT, hq_decoder == io.OFFICIAL_HQ_DECODER
    if pixels_input:  # a landscape image's resized pixels: height and width stay dynamic in the graph
        image = torch.zeros(model.encoder_input_size * 3 // 4, model.encoder_input_size, 3)
    _remove_dead_stagings(folder)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=folder))
    # the exporter switches the traced wrapper (and so the whole model) to eval mode and back to the wrapper's
    # mode afterwards, which would leave every module of the model in that one mode: restored one by one below
    modes = [(module, module.training) for module in model.modules()]
    try:
        # the reference chains: the fast paths' memories and shortcuts are not for a graph
        with torch.no_grad(), reference_paths(model), loras_merged(model):
            encoder_out = list(description["encoder_outputs"])
            encoder = EncoderGraph(model, pixels_input, official_hq)
            (staging / "encoder").mkdir()
            _trace(
                encoder,
                (image,),
                staging / "encoder" / io.ENCODER_FILE,
                opset,
                input_names=list(description["encoder_inputs"]),
                output_names=encoder_out,
                **({"dynamic_axes": {io.INPUT_IMAGE: {0: "image_height", 1: "image_width"}}} if pixels_input else {}),
            )
            # the decoder's example embeddings need only their shapes: not another encoder pass
            shapes = description["encoder_outputs"]
            decoder_in = list(description["decoder_inputs"])
            example = tuple(
                prompt[name] if name in prompt else torch.zeros(shapes[name]["shape"]) for name in decoder_in
            )
            decoder = DecoderGraph(model, multimask_output, official_hq)
            (staging / "decoder").mkdir()
            _trace(
                decoder,
                example,
                staging / "decoder" / io.DECODER_FILE,
                opset,
                input_names=decoder_in,
                output_names=list(description["decoder_outputs"]),
                dynamic_axes={
                    io.POINT_COORDS: {1: "num_points"},
                    io.POINT_LABELS: {1: "num_points"},
                    io.MASKS: {2: "height", 3: "width"},
                },
            )
        for name in (io.ENCODER_FILE, io.DECODER_FILE):
            _settle(staging / name.removesuffix(".onnx") / name, staging / name)
            onnx.checker.check_model(str(staging / name))
            shutil.rmtree(staging / name.removesuffix(".onnx"))
        if quantize:
            for source, target in io.QUANTIZED_FILES.items():
                _quantize(staging / source, staging / target)
        (staging / io.DESCRIPTION_FILE).write_text(json.dumps(description, indent=1))
        return _publish(staging, folder, description, time.perf_counter() - start)
    finally:
        for module, training in modes:
            module.training = training
        shutil.rmtree(staging, ignore_errors=True)


def _remove_dead_stagings(folder: Path) -> None:
    """Staging folders of exports whose process died (killed mid-export)."""
    for staging in folder.glob(".export-*-*"):
        pid = staging.name.split("-")[1]
        if pid.isdigit() and not process_running(int(pid)) and staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, folder: Path, description: Mapping[str, Any], seconds: float) -> ExportReport:
    """Renames the staged files into `folder`: data files before the models that name them, model.json last."""
    written = sorted(p.name for p in staging.iterdir() if p.is_file())
    order = sorted(written, key=lambda name: (name.endswith(".onnx"), name == io.DESCRIPTION_FILE))
    mode = 0o666 & ~process_umask()
    for name in order:
        os.chmod(staging / name, mode)
        with open(staging / name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staging / name, folder / name)
    for name in io.ALL_FILES:
        if name not in written:
            (folder / name).unlink(missing_ok=True)
    return ExportReport(folder, {name: (folder / name).stat().st_size for name in order}, dict(description), seconds)
