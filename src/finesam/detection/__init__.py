"""Text prompts: a zero-shot object detector of HF transformers turns phrases into boxes (`detector`), and SAM
(HQ-SAM, with LoRAs: whatever is injected) turns the boxes into masks (`grounded`): Grounded (HQ-)SAM."""

from finesam.detection.detector import (
    DEFAULT_DETECTOR,
    TEXT_EXTRA,
    Detection,
    DetectorError,
    TextDetector,
    check_detector_source,
    grounding_text,
    parse_phrases,
)
from finesam.detection.grounded import TextMask, masks_of_detections, segment_text

__all__ = [
    "DEFAULT_DETECTOR",
    "TEXT_EXTRA",
    "Detection",
    "DetectorError",
    "TextDetector",
    "TextMask",
    "check_detector_source",
    "grounding_text",
    "masks_of_detections",
    "parse_phrases",
    "segment_text",
]
