"""Labelling whole datasets: folders, lists and prompt manifests in, COCO instances out, resumable and sharded.

`sources` lists the images (and their prompts), `segmenters` turns one image into objects with the torch model
(`exported`: with an exported one), `coco` writes them as COCO annotations, `run` commits each image's result and
merges them, `prefetch` decodes images ahead. The package imports no torch (the dataset runs of
`finesam segment --onnx` use it): only `segmenters` does, imported by name.
"""

from finesam.labelling.coco import SegmentedObject, annotation, coco_document
from finesam.labelling.run import LabellingRun, Summary
from finesam.labelling.sources import ImageJob, ObjectPrompts, images_of, is_image_file, read_manifest

__all__ = [
    "ImageJob",
    "LabellingRun",
    "ObjectPrompts",
    "SegmentedObject",
    "Summary",
    "annotation",
    "coco_document",
    "images_of",
    "is_image_file",
    "read_manifest",
]
