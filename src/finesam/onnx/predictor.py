"""`OnnxPredictor`: an exported encoder/decoder pair run with onnxruntime or OpenVINO, numpy and PIL; no torch.

It takes prompts as `SegmentAnything.predict` does (pixels of the original image, the same checks), so an
export can be checked end to end against the torch model, and used where torch is not installed.
"""

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finesam.inputs import (
    BICUBIC_RESIZE,
    BOXES_FIRST_FIXED_COUNT,
    BOXES_FIRST_PADDED,
    CROP_THEN_RESIZE,
    LONGEST_SIDE_PADDED,
    LONGEST_SIDE_PADDED_UNIT,
    MASK_THRESHOLD,
    POINTS_FIRST,
    RESIZE,
    SQUARE,
    STRETCH,
    ImageLike,
    as_rgb,
    boxes_first_labelled_points,
    check_prompts,
    fixed_count_labelled_points,
    labelled_points,
    model_input,
    resized_pixels,
    resized_shape,
    scale_coordinates,
    square_model_input,
    stretched_model_input,
    unit_model_input,
)
from finesam.onnx import interface as io
from finesam.onnx.runtimes import F32, ONNXRUNTIME, check_precision, open_session


@dataclass(frozen=True)
class OnnxEmbedding:
    """An image encoded by the exported encoder: its outputs by name, and the sizes decoding needs."""

    outputs: dict[str, np.ndarray]  # image_embeddings (hq_features for HQ-SAM); SAM 2: image_embed, high_res_feats_*
    original_size: tuple[int, int]  # (height, width)
    input_size: tuple[int, int]  # (height, width) inside the model input


@dataclass(frozen=True)
class OnnxPrediction:
    """As `finesam.model.Prediction`, in numpy: B prompts, C masks each."""

    masks: np.ndarray  # (B, C, H, W) bool, or float32 logits with return_logits=True
    iou_predictions: np.ndarray  # (B, C)
    low_res_logits: np.ndarray  # (B, C, 4E, 4E)
    object_score_logits: np.ndarray | None = None  # (B, 1) for SAM 2, None for SAM


# the numpy twins of the models' processing (`SegmentAnything.processing_names`), by the names model.json gives
# (each takes the image, the prompt-frame size and the encoder's input size; only EfficientViT-SAM L encodes at
# another size than the prompt frame)
PREPROCESSING: dict[str, Callable[[Image.Image, int, int], tuple[np.ndarray, tuple[int, int]]]] = {
    LONGEST_SIDE_PADDED: lambda image, size, _: model_input(image, size),
    SQUARE: lambda image, size, _: square_model_input(image, size),
    STRETCH: lambda image, size, _: stretched_model_input(image, size),
    LONGEST_SIDE_PADDED_UNIT: unit_model_input,
}
PROMPT_ORDERS = {
    POINTS_FIRST: labelled_points,
    BOXES_FIRST_PADDED: boxes_first_labelled_points,
    BOXES_FIRST_FIXED_COUNT: fixed_count_labelled_points,  # with model.json's point_count
}


def read_description(folder: str | Path) -> dict[str, Any]:
    """The `model.json` of an export folder, checked to be one this version reads.

    Raises:
        ValueError: no readable model.json, or one of another format or version.
    """
    path = Path(folder) / io.DESCRIPTION_FILE
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable finesam export description ({e})") from None
    if not isinstance(description, dict) or description.get("format") != io.FORMAT:
        raise ValueError(f'{path}: not a finesam ONNX export (no "format": "{io.FORMAT}")')
    if description.get("version") not in io.READABLE_VERSIONS:
        readable = " and ".join(map(str, io.READABLE_VERSIONS))
        raise ValueError(f"{path}: export format version {description.get('version')}; this finesam reads {readable}")
    processing = description.get("processing", io.SAM_PROCESSING)
    known = {
        "preprocessing": PREPROCESSING,
        "prompt_order": PROMPT_ORDERS,
        "postprocessing": (CROP_THEN_RESIZE, RESIZE, BICUBIC_RESIZE),  # inside the decoder graph
    }
    for field, names in known.items():
        if not isinstance(processing, dict) or processing.get(field) not in names:
            raise ValueError(f"{path}: unknown {field} {processing!r}: exported by a newer finesam?")
    return description


def check_multimask(description: dict[str, Any], multimask_output: bool) -> None:
    """Raises `ValueError` unless the export of `description` (its model.json) gives `multimask_output`'s masks:
    an export fixes it."""
    if multimask_output != description["multimask_output"]:
        raise ValueError(
            f"this export was made with multimask_output={description['multimask_output']}; export again with"
            f"{'' if multimask_output else 'out'} --multimask for the other"
        )


class OnnxPredictor:
    """The exported pair of `folder` (see `finesam.onnx.export`) behind a `predict` like the torch model's.

    Args:
        folder: an export folder (model.json, encoder.onnx, decoder.onnx).
        quantized: run the int8 models (`*.quant.onnx`, exported with `quantize=True`; onnxruntime only).
        providers: onnxruntime execution providers, in order of preference.
        threads: intra-op threads of each session (default: the runtime's choice).
        runtime: "onnxruntime" or "openvino" (`pip install 'finesam[openvino]'`): the same files, outputs and API.
        precision: the encoder's precision, "f32" or "bf16" (OpenVINO only, on a CPU whose OpenVINO plugin has
            bf16; refused with a ValueError elsewhere). The decoder always runs in f32, as the torch model's
            bf16 mode keeps it.
        cache_dir: OpenVINO only: a folder for its compiled models, so that a later start loads them instead
            of compiling again (created; keyed by file, options and OpenVINO version).

    Raises:
        ValueError: a folder that is no readable export, a missing file, or an option the runtime lacks.
    """

    def __init__(
        self,
        folder: str | Path,
        quantized: bool = False,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        runtime: str = ONNXRUNTIME,
        precision: str = F32,
        cache_dir: str | Path | None = None,
    ) -> None:
        check_precision(runtime, precision)
        if quantized and runtime != ONNXRUNTIME:
            raise ValueError("the int8 models are onnxruntime's dynamic quantisation: run them with onnxruntime")
        self.folder = Path(folder)
        self.runtime, self.precision = runtime, precision
        self.description = read_description(folder)
        files = self.description["files"]
        names = ("encoder_quantized", "decoder_quantized") if quantized else ("encoder", "decoder")
        if any(name not in files for name in names):
            raise ValueError(f"{self.folder}: this export has no quantised models (export with --quantize)")
        sessions = []
        for name, side in zip(names, ("encoder", "decoder"), strict=True):
            path = self.folder / files[name]
            if not path.is_file():
                raise ValueError(f"{path}: missing from the export folder")
            tensors = [*self.description[f"{side}_inputs"], *self.description[f"{side}_outputs"]]
            sessions.append(
                open_session(
                    path,
                    runtime,
                    tensors,
                    threads=threads,
                    precision=precision if side == "encoder" else F32,
                    cache_dir=None if cache_dir is None else Path(cache_dir),
                    providers=providers,
                    # onnxruntime's arena would keep the encoder's peak (the global attention scores) for the
                    # life of the session, about twice what one run needs; without it the encoder runs as fast
                    memory_arena=side != "encoder",
                )
            )
        self.encoder, self.decoder = sessions
        preprocessing = self.description["preprocessing"]
        self.image_size: int = preprocessing["image_size"]
        # the encoder's own input size, where it differs (EfficientViT-SAM L); files before it had none
        self.encoder_input_size: int = preprocessing.get("encoder_input_size", self.image_size)
        self.mask_input_size: int = self.description["decoder_outputs"][io.LOW_RES_MASKS]["shape"][-1]
        self.multimask_output: bool = self.description["multimask_output"]
        self._encoder_outputs = self.encoder.output_names
        self._decoder_inputs = self.decoder.input_names
        processing = self.description.get("processing", io.SAM_PROCESSING)  # version 1: SAM's
        self._preprocess = PREPROCESSING[processing["preprocessing"]]
        self._labelled_points = PROMPT_ORDERS[processing["prompt_order"]]
        if processing["prompt_order"] == BOXES_FIRST_FIXED_COUNT:
            count = preprocessing["point_count"]
            self._labelled_points = functools.partial(fixed_count_labelled_points, count=count)
        # EfficientSAM's decoder has no mask input
        self.takes_mask_input = io.MASK_INPUT in self._decoder_inputs
        # an encoder that takes the resized pixels (--encoder-input pixels) normalises and pads them itself
        self.pixels_input = io.interface_of(self.description)["encoder_input"] == io.PIXELS_INPUT

    def encode_image(self, image: ImageLike) -> OnnxEmbedding:
        """Encodes an image (PIL of any mode, or a numpy array, as `SegmentAnything.encode_image` takes it)."""
        rgb = as_rgb(image)
        if self.pixels_input:
            input_size = resized_shape(rgb.height, rgb.width, self.image_size)
            outputs = self.encoder.run({io.INPUT_IMAGE: resized_pixels(rgb, input_size)})
        else:
            pixels, input_size = self._preprocess(rgb, self.image_size, self.encoder_input_size)
            outputs = self.encoder.run({io.IMAGE: pixels})
        named = dict(zip(self._encoder_outputs, outputs, strict=True))
        return OnnxEmbedding(named, (rgb.height, rgb.width), input_size)

    def predict(
        self,
        image: ImageLike | OnnxEmbedding,
        *,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        mask_input: Any = None,
        multimask_output: bool | None = None,
        return_logits: bool = False,
    ) -> OnnxPrediction:
        """Masks for one image and B prompts, given as `SegmentAnything.predict` takes them.

        Args:
            image: an image or its `OnnxEmbedding`.
            points, labels, boxes, mask_input: in pixels of the original image (see `SegmentAnything.predict`).
            multimask_output: fixed by the export; when given, it must match it.
            return_logits: float logits at the original size instead of boolean masks.

        Returns:
            Masks (B, C, H, W), predicted IoUs (B, C) and low-resolution logits (B, C, 4E, 4E).

        Raises:
            ValueError: a malformed prompt, or `multimask_output` other than the export's.
        """
        if multimask_output is not None:
            check_multimask(self.description, multimask_output)
        if mask_input is not None and not self.takes_mask_input:
            raise ValueError("this export takes no mask input (its model has none): prompt it with points or boxes")
        embedding = image if isinstance(image, OnnxEmbedding) else self.encode_image(image)
        checked = check_prompts(
            points=points,
            labels=labels,
            boxes=boxes,
            mask_input=mask_input,
            original_size=embedding.original_size,
            mask_input_size=self.mask_input_size,
        )
        results = [self._decode(embedding, checked, i) for i in range(checked.batch)]
        masks, iou, low_res, *extra = (np.concatenate(parts) for parts in zip(*results, strict=True))
        scores = extra[0] if extra else None
        return OnnxPrediction(masks if return_logits else masks > MASK_THRESHOLD, iou, low_res, scores)

    def _decode(self, embedding: OnnxEmbedding, checked: Any, index: int) -> tuple[np.ndarray, ...]:
        def pick(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[index if len(array) > 1 else 0]

        sizes = (embedding.original_size, embedding.input_size)
        points, labels, box = pick(checked.points), pick(checked.labels), pick(checked.boxes)
        coords, kinds = self._labelled_points(  # the order of the model, padding point included
            None if points is None else scale_coordinates(points, *sizes),
            labels,
            None if box is None else scale_coordinates(box.reshape(2, 2), *sizes),
        )
        mask = pick(checked.mask_input)
        low = self.mask_input_size
        feeds = {
            io.POINT_COORDS: coords[None].astype(np.float32),
            io.POINT_LABELS: kinds[None].astype(np.float32),
            io.MASK_INPUT: np.zeros((1, 1, low, low), np.float32) if mask is None else mask[None].astype(np.float32),
            io.HAS_MASK_INPUT: np.array([0.0 if mask is None else 1.0], dtype=np.float32),
            io.ORIG_IM_SIZE: np.array(embedding.original_size, dtype=np.float32),
        }
        # the embedding and whatever else the encoder computed for the decoder (HQ-SAM's, SAM 2's features)
        feeds |= {name: embedding.outputs[name] for name in self._decoder_inputs if name in embedding.outputs}
        return tuple(self.decoder.run(feeds))
