"""Automatic mask generation ("segment everything"), identical to the official generator, with HQ-SAM masks."""

from finesam.amg.generator import OUTPUT_MODES, AutomaticMaskGenerator, MaskRecord
from finesam.amg.options import GENERATOR_OPTIONS
from finesam.amg.rle import RLE, decode_counts, encode_counts, from_coco, masks_to_rle, rle_area, rle_to_mask, to_coco

__all__ = [
    "GENERATOR_OPTIONS",
    "OUTPUT_MODES",
    "RLE",
    "AutomaticMaskGenerator",
    "MaskRecord",
    "decode_counts",
    "encode_counts",
    "from_coco",
    "masks_to_rle",
    "rle_area",
    "rle_to_mask",
    "to_coco",
]
