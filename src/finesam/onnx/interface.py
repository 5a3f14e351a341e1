"""The exported files and their inputs and outputs, declared once: the exporter writes them, `model.json`
describes them, the ONNX predictor reads them. No torch here.

The decoder has the official SAM ONNX interface (segment_anything/utils/onnx.py); HQ-SAM adds one input,
`hq_features`, which the encoder computes once per image.
"""

from typing import Any

FORMAT = "finesam-onnx"
FORMAT_VERSION = 1

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


def encoder_outputs(hq: bool) -> tuple[str, ...]:
    return (IMAGE_EMBEDDINGS, HQ_FEATURES) if hq else (IMAGE_EMBEDDINGS,)


def decoder_inputs(hq: bool) -> tuple[str, ...]:
    return (IMAGE_EMBEDDINGS, *DECODER_PROMPT_INPUTS, *((HQ_FEATURES,) if hq else ()))


def tensors(
    image_size: int, embedding_dim: int, embedding_size: int, hq: bool, masks: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """Shapes (ints, or names of dynamic axes) and types of every input and output, for `model.json`."""
    low = 4 * embedding_size
    embeddings = {"shape": [1, embedding_dim, embedding_size, embedding_size], "dtype": "float32"}
    hq_features = {"shape": [1, embedding_dim // 8, low, low], "dtype": "float32"}
    encoder_out = {IMAGE_EMBEDDINGS: embeddings, **({HQ_FEATURES: hq_features} if hq else {})}
    return {
        "encoder_inputs": {IMAGE: {"shape": [1, 3, image_size, image_size], "dtype": "float32"}},
        "encoder_outputs": encoder_out,
        "decoder_inputs": {
            IMAGE_EMBEDDINGS: embeddings,
            POINT_COORDS: {"shape": [1, "num_points", 2], "dtype": "float32"},
            POINT_LABELS: {"shape": [1, "num_points"], "dtype": "float32"},
            MASK_INPUT: {"shape": [1, 1, low, low], "dtype": "float32"},
            HAS_MASK_INPUT: {"shape": [1], "dtype": "float32"},
            ORIG_IM_SIZE: {"shape": [2], "dtype": "float32"},
            **({HQ_FEATURES: hq_features} if hq else {}),
        },
        "decoder_outputs": {
            MASKS: {"shape": [1, masks, "height", "width"], "dtype": "float32"},
            IOU_PREDICTIONS: {"shape": [1, masks], "dtype": "float32"},
            LOW_RES_MASKS: {"shape": [1, masks, low, low], "dtype": "float32"},
        },
    }
