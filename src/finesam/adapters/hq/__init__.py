"""HQ-SAM as an adapter of the base model: HQ-SAM 1 on SAM (`HQSAMAdapter`), HQ-SAM 2 on SAM 2 / 2.1
(`HQSAM2Adapter`), HQ-SAM 1 on EfficientSAM's decoder variant (`HQEfficientSAMAdapter`); `hq_adapter_for` picks
the one that fits a model."""

from typing import Any

from refiners.fluxion import layers as fl

from finesam.adapters.hq.adapter import HQAdapter, HQSAMAdapter, hq_mask_only_set_to
from finesam.adapters.hq.efficient_sam import HQEfficientSAMAdapter
from finesam.adapters.hq.sam2 import HQSAM2Adapter
from finesam.model.efficient_sam.mask_decoder import EfficientSAMMaskDecoder
from finesam.model.mask_decoder import MaskDecoder
from finesam.model.sam import SegmentAnything
from finesam.model.sam2.mask_decoder import SAM2MaskDecoder

# the HQ-SAM generation that adapts each kind of mask decoder (a model's `decoder_class`)
HQ_ADAPTERS: dict[type[fl.Chain], type[HQAdapter]] = {
    MaskDecoder: HQSAMAdapter,
    SAM2MaskDecoder: HQSAM2Adapter,
    EfficientSAMMaskDecoder: HQEfficientSAMAdapter,
}


def hq_adapter_class(model: SegmentAnything) -> type[HQAdapter]:
    """The HQ-SAM adapter class for `model`, by its mask decoder (`decoder_class`): the generation of the nearest
    class in its ancestry, so a family's decoder that subclasses SAM's (for its own prompt rules, say) takes
    HQ-SAM without registering anything.

    Raises:
        ValueError: no HQ-SAM generation adapts that decoder.
    """
    adapter = next((HQ_ADAPTERS[c] for c in model.decoder_class.__mro__ if c in HQ_ADAPTERS), None)
    if adapter is None:
        raise ValueError(
            f"no HQ-SAM adapter for a {type(model).__name__} (its mask decoder is a {model.decoder_class.__name__}; "
            f"HQ-SAM adapts {', '.join(d.__name__ for d in HQ_ADAPTERS)})"
        )
    return adapter


def hq_adapter_for(model: SegmentAnything, hq_mask_only: bool = False, **options: Any) -> HQAdapter:
    """A new HQ-SAM adapter (random weights, not injected) of the generation that fits `model`; `options` go to
    its constructor (`device`, `dtype`)."""
    return hq_adapter_class(model)(model, hq_mask_only=hq_mask_only, **options)


__all__ = [
    "HQ_ADAPTERS",
    "HQAdapter",
    "HQEfficientSAMAdapter",
    "HQSAM2Adapter",
    "HQSAMAdapter",
    "hq_adapter_class",
    "hq_adapter_for",
    "hq_mask_only_set_to",
]
