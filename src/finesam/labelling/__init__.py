"""Labelling whole datasets: folders, lists and prompt manifests in, COCO instances out, resumable and sharded.

`sources` lists the images (and their prompts), `segmenters` turns one image into objects, `coco` writes them
as COCO annotations, `run` commits each image's result and merges them, `prefetch` decodes images ahead.
"""

from finesam.labelling.coco import SegmentedObject, annotation, coco_document
from finesam.labelling.run import LabellingRun, Summary
from finesam.labelling.segmenters import everything_objects, prompted_objects, text_objects
from finesam.labelling.sources import ImageJob, ObjectPrompts, images_of, is_image_file, read_manifest

__all__ = [
    "ImageJob",
    "LabellingRun",
    "ObjectPrompts",
    "SegmentedObject",
    "Summary",
    "annotation",
    "coco_document",
    "everything_objects",
    "images_of",
    "is_image_file",
    "prompted_objects",
    "read_manifest",
    "text_objects",
]
