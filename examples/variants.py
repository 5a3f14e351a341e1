"""Decoder variants as adapters: examples for docs/variants.md.

Train one with `finesam train` ([variant] adapter = "variants:HQFromBlock", with `examples/` on PYTHONPATH)
and compare it with `finesam eval --variant variants:HQFromBlock --variant-weights ...`.
"""

from finesam.adapters.hq import HQSAMAdapter
from finesam.model import SegmentAnything
from finesam.model.image_encoder import TransformerBlock


class HQFromBlock(HQSAMAdapter):
    """HQ-SAM whose early features come from ViT block `block` instead of the first global-attention block.

    Every part of HQ-SAM is kept; only the point where `EarlyEmbedding` taps the encoder moves. All ViT
    blocks have the same width, so the fusion layers fit any block.
    """

    def __init__(self, target: SegmentAnything, block: int = 0, hq_mask_only: bool = True) -> None:
        blocks = [layer for layer, _ in target.image_encoder.walk(TransformerBlock)]
        if not 0 <= block < len(blocks):
            raise ValueError(f"block must be in 0..{len(blocks) - 1}, got {block}")
        super().__init__(target, hq_mask_only=hq_mask_only, early_layer=blocks[block])
