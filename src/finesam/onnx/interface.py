"""The exported files and their inputs and outputs, declared once: the exporter writes them, `model.json`
describes them, the ONNX predictor reads them. No torch here.

The decoder has the official SAM ONNX interface (segment_anything/utils/onnx.py); HQ-SAM adds one input,
`hq_features`, which the encoder computes once per image. A model whose encoder also writes features for the
decoder (SAM 2's high-resolution features) takes the community SAM 2 interface's names: encoder outputs
`image_embed`, `high_res_feats_0`, `high_res_feats_1`, ..., the same names as decoder inputs; the decoder's
extra outputs (SAM 2's `object_score_logits`) follow SAM's three. See docs/onnx.md.
"""

from typing import Any

from finesam.inputs import CROP_THEN_RESIZE, LONGEST_SIDE_PADDED, POINTS_FIRST

FORMAT = "finesam-onnx"
FORMAT_VERSION = 2  # 2: the processing names (SAM 2); a version 1 file (no names) is read as SAM's
READABLE_VERSIONS = (1, 2)

ENCODER_FILE, DECODER_FILE, DESCRIPTION_FILE = "encoder.onnx", "decoder.onnx", "model.json"
QUANTIZED_FILES = {ENCODER_FILE: "encoder.quant.onnx", DECODER_FILE: "decoder.quant.onnx"}
EXTERNAL_DATA_SUFFIX = ".data"  # encoder.onnx.data: the weights of a model over protobuf's 2 GB limit
ALL_FILES = (
    ENCODER_FILE,
    DECODER_FILE,
    *QUANTIZED_FILES.values(),
    *(name + EXTERNAL_DATA_SUFFIX for name in (ENCODER_FILE, *QUANTIZED_FILES.values())),
    DESCRIPTION_FILE,
)

IMAGE, IMAGE_EMBEDDINGS, HQ_FEATURES = "image", "image_embeddings", "hq_features"
IMAGE_EMBED = "image_embed"  # the embedding's name where the encoder outputs more features (SAM 2)
POINT_COORDS, POINT_LABELS, MASK_INPUT, HAS_MASK_INPUT, ORIG_IM_SIZE = (
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
MASKS, IOU_PREDICTIONS, LOW_RES_MASKS = "masks", "iou_predictions", "low_res_masks"

DECODER_PROMPT_INPUTS = (POINT_COORDS, POINT_LABELS, MASK_INPUT, HAS_MASK_INPUT, ORIG_IM_SIZE)
DECODER_OUTPUTS = (MASKS, IOU_PREDICTIONS, LOW_RES_MASKS)

OPSET, MIN_OPSET = 17, 14  # 17: LayerNormalization is one op; 14: the oldest the attention export supports


# the processing of a model, by name (`SegmentAnything.processing_names`): SAM's, for version 1 files
SAM_PROCESSING = {
    "preprocessing": LONGEST_SIDE_PADDED,
    "prompt_order": POINTS_FIRST,
    "postprocessing": CROP_THEN_RESIZE,
}


# the export options for other tools' conventions (model.json "interface"; absent in earlier files: the defaults)
ENCODER_INPUTS = TENSOR_INPUT, PIXELS_INPUT = ("tensor", "pixels")
HQ_DECODERS = HQ_FEATURES_DECODER, OFFICIAL_HQ_DECODER = ("features", "official")
INPUT_IMAGE = "input_image"  # the encoder's input with --encoder-input pixels (samexporter's name)
INTERM_EMBEDDINGS = "interm_embeddings"  # the official HQ-SAM decoder's early ViT features


def interface_of(description: dict[str, Any]) -> dict[str, str]:
    """The export options of a model.json (the defaults for files written before they existed)."""
    interface = description.get("interface", {})
    return {
        "encoder_input": interface.get("encoder_input", TENSOR_INPUT),
        "hq_decoder": interface.get("hq_decoder", HQ_FEATURES_DECODER),
    }


def with_interface(
    described: dict[str, dict[str, dict[str, Any]]],
    encoder_input: str,
    hq_decoder: str,
    interm_shape: list[int] | None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """`tensors(...)` changed for the export options: the encoder takes the resized RGB pixels, (H, W, 3) float32
    with the longest side the model's (normalised and padded inside the graph); the HQ decoder takes the
    official HQ-SAM ONNX interface's `interm_embeddings` (K, 1, E, E, C) after the embedding instead of
    `hq_features` (the encoder outputs them in its place)."""
    described = {side: dict(tensors) for side, tensors in described.items()}
    if encoder_input == PIXELS_INPUT:
        pixels = {"shape": ["image_height", "image_width", 3], "dtype": "float32"}
        described["encoder_inputs"] = {INPUT_IMAGE: pixels}
    if hq_decoder == OFFICIAL_HQ_DECODER and interm_shape is not None:
        interm = {"shape": interm_shape, "dtype": "float32"}
        outputs = {k: v for k, v in described["encoder_outputs"].items() if k != HQ_FEATURES}
        described["encoder_outputs"] = outputs | {INTERM_EMBEDDINGS: interm}
        inputs = [(k, v) for k, v in described["decoder_inputs"].items() if k != HQ_FEATURES]
        described["decoder_inputs"] = dict([inputs[0], (INTERM_EMBEDDINGS, interm), *inputs[1:]])
    return described


def feature_names(count: int) -> tuple[str, ...]:
    """The ONNX names of the encoder's extra features, in the model's order (SAM 2: strides 4 then 8)."""
    return tuple(f"high_res_feats_{i}" for i in range(count))


def embedding_name(features: int) -> str:
    return IMAGE_EMBED if features else IMAGE_EMBEDDINGS


def tensors(
    image_size: int,
    embedding_dim: int,
    embedding_size: int,
    hq_features: bool,
    masks: int,
    features: tuple[list[int], ...] = (),
    extra_outputs: tuple[str, ...] = (),
    mask_input: bool = True,
    encoder_input_size: int | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Shapes (ints, or names of dynamic axes) and types of every input and output, in order, for `model.json`
    (and the exporter's names of the traced inputs and outputs).
    `hq_features`: HQ-SAM's fused features (HQ-SAM 2 has none); `features`: the shapes of the encoder's extra
    features; `extra_outputs`: the decoder's, each (1, 1); `mask_input`: the decoder takes `mask_input` and
    `has_mask_input` (not EfficientSAM's, which has no mask input); `encoder_input_size`: the side of the encoder's
    input where it differs from the prompt frame `image_size` (EfficientViT-SAM L: 512)."""
    low = 4 * embedding_size
    side = image_size if encoder_input_size is None else encoder_input_size
    embeddings = {"shape": [1, embedding_dim, embedding_size, embedding_size], "dtype": "float32"}
    hq = {"shape": [1, embedding_dim // 8, low, low], "dtype": "float32"}
    extra = {
        name: {"shape": list(shape), "dtype": "float32"}
        for name, shape in zip(feature_names(len(features)), features, strict=True)
    }
    embedding = embedding_name(len(features))
    encoder_out = {embedding: embeddings, **({HQ_FEATURES: hq} if hq_features else {}), **extra}
    return {
        "encoder_inputs": {IMAGE: {"shape": [1, 3, side, side], "dtype": "float32"}},
        "encoder_outputs": encoder_out,
        "decoder_inputs": {
            embedding: embeddings,
            **extra,
            POINT_COORDS: {"shape": [1, "num_points", 2], "dtype": "float32"},
            POINT_LABELS: {"shape": [1, "num_points"], "dtype": "float32"},
            **(
                {
                    MASK_INPUT: {"shape": [1, 1, low, low], "dtype": "float32"},
                    HAS_MASK_INPUT: {"shape": [1], "dtype": "float32"},
                }
                if mask_input
                else {}
            ),
            ORIG_IM_SIZE: {"shape": [2], "dtype": "float32"},
            **({HQ_FEATURES: hq} if hq_features else {}),
        },
        "decoder_outputs": {
            MASKS: {"shape": [1, masks, "height", "width"], "dtype": "float32"},
            IOU_PREDICTIONS: {"shape": [1, masks], "dtype": "float32"},
            LOW_RES_MASKS: {"shape": [1, masks, low, low], "dtype": "float32"},
            **{name: {"shape": [1, 1], "dtype": "float32"} for name in extra_outputs},
        },
    }
