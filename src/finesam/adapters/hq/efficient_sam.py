"""`HQEfficientSAMAdapter`: HQ-SAM on EfficientSAM's mask decoder, injected into a frozen `EfficientSAM` and ejected
again, without editing it.

EfficientSAM's decoder is a variant of SAM's (`finesam.model.efficient_sam.mask_decoder`) whose parts play the
same roles: the output tokens, a 4x upscaling of the image tokens (GroupNorm where SAM has LayerNorm2d) dotted
with the hypernetworks' weights, and SAM's multimask selection. HQ-SAM's parts therefore go where they go in SAM
(the HQ token after the mask tokens, the HQ mask from the upscaled features refined and added to the fused
early and final encoder features, the official output rule); only the places differ. The early feature is the
output of the ViT block `EfficientSAMConfig.early_embedding_block` (block 2, as HQ-SAM taps SAM's ViT-B).
No official HQ weights exist for EfficientSAM: the adapter is trained (`finesam train`).
"""

from typing import ClassVar

from refiners.fluxion import layers as fl

from finesam.adapters.hq.adapter import HQSAMAdapter
from finesam.model.efficient_sam.mask_decoder import EfficientSAMMaskDecoder, EfficientSAMMaskHead, GroupNormUpscaling


class HQEfficientSAMAdapter(HQSAMAdapter):
    """HQ-SAM as an adapter of an `EfficientSAM` (ViT-Ti, ViT-S): `HQSAMAdapter`'s parts and output rule, placed
    around EfficientSAM's decoder, its GroupNorm upscaling and its mask head."""

    decoder: ClassVar[type[fl.Chain]] = EfficientSAMMaskDecoder
    upscaling: ClassVar[type[fl.Chain]] = GroupNormUpscaling
    mask_head: ClassVar[type[fl.Chain]] = EfficientSAMMaskHead
    refusal: ClassVar[tuple[str, str]] = (
        "HQEfficientSAMAdapter adapts EfficientSAM's mask decoder",
        "hq_adapter_for picks the adapter of a model",
    )
