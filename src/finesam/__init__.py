"""finesam: High-Quality Segment Anything for the Refiners adapter framework."""

from finesam.allocator import reuse_freed_memory
from finesam.model import (
    SAM_VIT_B,
    SAM_VIT_H,
    SAM_VIT_L,
    SAM_VIT_TINY,
    ImageEmbedding,
    Prediction,
    SAMConfig,
    SegmentAnything,
    SegmentAnythingB,
    SegmentAnythingH,
    SegmentAnythingL,
    SegmentAnythingTiny,
)

__version__ = "0.1.0"

__all__ = [
    "SAM_VIT_B",
    "SAM_VIT_H",
    "SAM_VIT_L",
    "SAM_VIT_TINY",
    "ImageEmbedding",
    "Prediction",
    "SAMConfig",
    "SegmentAnything",
    "SegmentAnythingB",
    "SegmentAnythingH",
    "SegmentAnythingL",
    "SegmentAnythingTiny",
    "reuse_freed_memory",
]
