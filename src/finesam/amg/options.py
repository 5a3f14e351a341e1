"""The generator's options as users set them (command line, HTTP API): their names, types and help, declared
once here so that the CLI and the server offer the same ones. Their defaults are `AutomaticMaskGenerator`'s,
except those of `GENERATOR_PRESETS`, which come from the model."""

from typing import Any

# The official generators' defaults where they differ between model generations, by the preset name a model
# class declares (`SegmentAnything.generator_preset`): `SamAutomaticMaskGenerator` (segment_anything 1.0) and
# `SAM2AutomaticMaskGenerator` (sam2 1.1.0). `small_regions` says where `min_mask_region_area` acts: "masks"
# removes small holes and islands from the final masks, then NMS again (SAM); "model" sets the model's
# `max_hole_area` and `max_sprinkle_area` for the call, filling the low-resolution logits (SAM 2's generator
# hands the option to its predictor that way).
GENERATOR_PRESETS: dict[str, dict[str, Any]] = {
    "sam": {"pred_iou_thresh": 0.88, "small_regions": "masks"},
    "sam2": {"pred_iou_thresh": 0.8, "small_regions": "model"},
}


def defaults_for(model: Any) -> dict[str, Any]:
    """The generator defaults of a model: the preset its class declares (`generator_preset`); SAM's without a
    model (to check options before one loads)."""
    return dict(GENERATOR_PRESETS["sam" if model is None else model.generator_preset])


# the official generator's options (scripts/amg.py), in its order
GENERATOR_OPTIONS: dict[str, tuple[type, str]] = {
    "points_per_side": (int, "points sampled along one side of the image (and of each crop)"),
    "points_per_batch": (int, "points prompted at once (memory vs speed)"),
    "pred_iou_thresh": (
        float,
        "keep masks whose predicted IoU is above this (default: the model's, 0.88 SAM, 0.8 SAM 2)",
    ),
    "stability_score_thresh": (float, "keep masks whose stability score is at least this"),
    "stability_score_offset": (float, "logit offset of the stability score"),
    "box_nms_thresh": (float, "IoU above which overlapping masks of one crop are suppressed"),
    "crop_n_layers": (int, "layers of smaller crops segmented again (0: the whole image only)"),
    "crop_nms_thresh": (float, "IoU above which masks of different crops are suppressed"),
    "min_mask_region_area": (int, "remove holes and islands smaller than this many pixels (0: off)"),
}
