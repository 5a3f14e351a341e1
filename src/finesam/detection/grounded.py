"""Grounded SAM: the boxes of a text detector turned into masks by `SegmentAnything.predict` (with whatever
adapters are injected: HQ-SAM makes it Grounded HQ-SAM, LoRAs apply as well)."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from finesam.detection.detector import Detection, TextDetector
from finesam.inputs import DECODER_BATCH
from finesam.model import SegmentAnything
from finesam.model.sam import ImageEmbedding


@dataclass(frozen=True)
class TextMask:
    """A detection and its mask."""

    detection: Detection
    mask: np.ndarray  # (H, W) bool
    predicted_iou: float


def masks_of_detections(
    model: SegmentAnything,
    image: Image.Image | ImageEmbedding,
    detections: Sequence[Detection],
    multimask: bool = False,
) -> list[TextMask]:
    """One mask per detection, in their order: `model.predict` with their boxes (the best of three by predicted
    IoU with `multimask`), `DECODER_BATCH` boxes per call, the image encoded once."""
    if not detections:
        return []
    embedding = image if isinstance(image, ImageEmbedding) else model.encode_image(image)
    found: list[TextMask] = []
    for start in range(0, len(detections), DECODER_BATCH):
        chosen = detections[start : start + DECODER_BATCH]
        prediction = model.predict(embedding, boxes=[list(d.box) for d in chosen], multimask_output=multimask)
        scores, best = prediction.iou_predictions.max(dim=1)
        masks = prediction.masks[torch.arange(len(best)), best].cpu().numpy()
        found += [TextMask(d, m, s) for d, m, s in zip(chosen, masks, scores.tolist(), strict=True)]
    return found


def segment_text(
    model: SegmentAnything,
    detector: TextDetector,
    image: Image.Image,
    phrases: str | Sequence[str],
    box_threshold: float | None = None,
    text_threshold: float | None = None,
    max_detections: int | None = None,
    multimask: bool = False,
) -> list[TextMask]:
    """The masks of what the phrases name in the image, highest detection score first (see `TextDetector.detect`
    for the options): an empty list when nothing is detected (the image is then not encoded)."""
    detections = detector.detect(image, phrases, box_threshold, text_threshold, max_detections)
    return masks_of_detections(model, image, detections, multimask)
