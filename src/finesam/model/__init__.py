"""The base Segment Anything model as fluxion chains."""

# the families register first: presets, configs read from files and models are looked up in the registry
from finesam.model import families  # noqa: F401  (imported for its registrations)
from finesam.model.config import (
    PRESETS,
    SAM_VIT_B,
    SAM_VIT_H,
    SAM_VIT_L,
    SAM_VIT_TINY,
    DecoderConfig,
    SAMConfig,
    TinyViTConfig,
    ViTConfig,
)
from finesam.model.image_encoder import ImageEncoder
from finesam.model.mask_decoder import MaskDecoder
from finesam.model.prompt_encoder import PromptEncoder
from finesam.model.prompts import Prompts
from finesam.model.sam import (
    ImageEmbedding,
    Prediction,
    SegmentAnything,
    SegmentAnythingB,
    SegmentAnythingH,
    SegmentAnythingL,
    SegmentAnythingTiny,
)

__all__ = [
    "PRESETS",
    "SAM_VIT_B",
    "SAM_VIT_H",
    "SAM_VIT_L",
    "SAM_VIT_TINY",
    "DecoderConfig",
    "ImageEmbedding",
    "ImageEncoder",
    "MaskDecoder",
    "Prediction",
    "PromptEncoder",
    "Prompts",
    "SAMConfig",
    "SegmentAnything",
    "SegmentAnythingB",
    "SegmentAnythingH",
    "SegmentAnythingL",
    "SegmentAnythingTiny",
    "TinyViTConfig",
    "ViTConfig",
]
