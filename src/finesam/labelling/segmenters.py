"""The objects of one image: everything the automatic generator finds, one mask per prompted object, or one mask
per box a text detector finds."""

from collections.abc import Sequence
from dataclasses import replace

import torch
from PIL import Image

from finesam.amg import AutomaticMaskGenerator, masks_to_rle
from finesam.amg.generator import UPSCALE_BUDGET
from finesam.detection import TextDetector
from finesam.inputs import MASK_THRESHOLD
from finesam.labelling.coco import SegmentedObject
from finesam.labelling.sources import DEFAULT_CATEGORY, ObjectPrompts
from finesam.model import SegmentAnything


def everything_objects(generator: AutomaticMaskGenerator, image: Image.Image) -> list[SegmentedObject]:
    """Every mask the generator keeps (its `uncompressed_rle` records), category "object"."""
    if generator.output_mode != "uncompressed_rle":
        raise ValueError(f"the generator must write uncompressed_rle records, not {generator.output_mode}")
    return [
        SegmentedObject(
            record["segmentation"],  # type: ignore[arg-type]  (an RLE in this output mode)
            record["predicted_iou"],
            DEFAULT_CATEGORY,
            record["stability_score"],
        )
        for record in generator.generate(image)
    ]


def prompted_objects(
    model: SegmentAnything, image: Image.Image, prompts: ObjectPrompts, multimask: bool = False
) -> list[SegmentedObject]:
    """One mask per object of `prompts` (its best of three with `multimask`), in the objects' order: the image
    encoded once, objects with the same number of points decoded together (`ObjectPrompts.batches`).

    Raises:
        ValueError: a prompt lies outside the image (the message says which).
    """
    embedding = model.encode_image(image)
    resize = (embedding.input_size, embedding.original_size)
    height, width = embedding.original_size
    upscaled_at_once = max(1, UPSCALE_BUDGET // max(height * width, model.config.image_size**2))
    found: dict[int, SegmentedObject] = {}
    for chosen, batch in prompts.batches():
        low_res, iou = model.decode_prompts(embedding, **batch, multimask_output=multimask)
        scores, best = iou.max(dim=1)
        best_low_res = low_res[torch.arange(len(best)), best][:, None]
        for offset in range(0, len(chosen), upscaled_at_once):
            part = slice(offset, offset + upscaled_at_once)
            masks = model.postprocess(best_low_res[part], *resize)[:, 0] > MASK_THRESHOLD
            for i, rle, score in zip(chosen[part], masks_to_rle(masks), scores[part].tolist(), strict=True):
                found[i] = SegmentedObject(rle, score, prompts.category_ids[i])
    return [found[i] for i in range(len(prompts))]


def text_objects(
    model: SegmentAnything,
    detector: TextDetector,
    image: Image.Image,
    phrases: Sequence[str],
    box_threshold: float | None = None,
    text_threshold: float | None = None,
    max_detections: int | None = None,
    multimask: bool = False,
) -> list[SegmentedObject]:
    """One mask per box the detector finds for the phrases (see `TextDetector.detect`), highest detection score
    first: category i + 1 for phrase i, `score` the predicted IoU and `detection_score` the detector's. No
    detection: no object (the image is then not encoded)."""
    detections = detector.detect(image, phrases, box_threshold, text_threshold, max_detections)
    if not detections:
        return []
    prompts = ObjectPrompts(boxes=[list(d.box) for d in detections], category_ids=[d.phrase + 1 for d in detections])
    objects = prompted_objects(model, image, prompts, multimask=multimask)
    return [replace(item, detection_score=d.score) for item, d in zip(objects, detections, strict=True)]
