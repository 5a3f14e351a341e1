"""One mask per prompted object from an exported model (`finesam.onnx.OnnxPredictor`), without torch: the
choices of `segmenters.prompted_objects` (the best of three by predicted IoU with multimask, the threshold of
the predictor, that IoU as the score, the objects' order), each object decoded alone (the exported decoder
takes one prompt set per call; memory holds one object's masks at full size)."""

from typing import Any, Protocol

import numpy as np
from PIL import Image

from finesam.inputs import check_prompts
from finesam.labelling.coco import SegmentedObject
from finesam.labelling.sources import ObjectPrompts
from finesam.rle import mask_to_rle


class ExportedPrediction(Protocol):
    @property
    def masks(self) -> np.ndarray: ...  # (B, C, H, W) bool

    @property
    def iou_predictions(self) -> np.ndarray: ...  # (B, C)


class ExportedModel(Protocol):
    """What is used of `OnnxPredictor` (labelling does not import the export's package)."""

    def encode_image(self, image: Image.Image) -> Any: ...

    def predict(
        self, image: Any, *, points: Any = None, labels: Any = None, boxes: Any = None, multimask_output: bool | None
    ) -> ExportedPrediction: ...


def exported_objects(
    model: ExportedModel, image: Image.Image, prompts: ObjectPrompts, multimask: bool = False
) -> list[SegmentedObject]:
    """One mask per object of `prompts` (its best of three with `multimask`), in the objects' order.

    Raises:
        ValueError: a prompt lies outside the image (the message that of the torch run: each batch of
            `ObjectPrompts.batches` is checked as the torch model checks it).
    """
    embedding = model.encode_image(image)
    found: dict[int, SegmentedObject] = {}
    for chosen, batch in prompts.batches():
        check_prompts(**batch, original_size=(image.height, image.width), mask_input_size=0)
        for j, i in enumerate(chosen):
            prompt = {k: None if v is None else v[j : j + 1] for k, v in batch.items()}
            prediction = model.predict(embedding, **prompt, multimask_output=multimask)
            best = int(prediction.iou_predictions[0].argmax())
            score = float(prediction.iou_predictions[0, best])
            found[i] = SegmentedObject(mask_to_rle(prediction.masks[0, best]), score, prompts.category_ids[i])
    return [found[i] for i in range(len(prompts))]
