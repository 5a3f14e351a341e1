"""The generator's options as users set them (command line, HTTP API): their names, types and help, declared
once here so that the CLI and the server offer the same ones. Their defaults are `AutomaticMaskGenerator`'s."""

# the official generator's options (scripts/amg.py), in its order
GENERATOR_OPTIONS: dict[str, tuple[type, str]] = {
    "points_per_side": (int, "points sampled along one side of the image (and of each crop)"),
    "points_per_batch": (int, "points prompted at once (memory vs speed)"),
    "pred_iou_thresh": (float, "keep masks whose predicted IoU is at least this"),
    "stability_score_thresh": (float, "keep masks whose stability score is at least this"),
    "stability_score_offset": (float, "logit offset of the stability score"),
    "box_nms_thresh": (float, "IoU above which overlapping masks of one crop are suppressed"),
    "crop_n_layers": (int, "layers of smaller crops segmented again (0: the whole image only)"),
    "crop_nms_thresh": (float, "IoU above which masks of different crops are suppressed"),
    "min_mask_region_area": (int, "remove holes and islands smaller than this many pixels (0: off)"),
}
