"""finesam: High-Quality Segment Anything for the Refiners adapter framework.

The names below are imported on first use, so that torch-free parts (`finesam.inputs`, `finesam.onnx`'s
predictor) can be imported where torch is not installed.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from finesam.process import reuse_freed_memory

__version__ = "0.1.0"

_HOMES = {"reuse_freed_memory": "finesam.process"}

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


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'finesam' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES.get(name, "finesam.model")), name)
