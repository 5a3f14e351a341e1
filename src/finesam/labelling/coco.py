"""Segmented objects as COCO instances: annotations with RLE (and optionally polygon) segmentations.

Boxes follow the COCO API (`pycocotools.mask.toBbox`): x, y of the first set column and row, width and height
counting both edge pixels. Polygons are the outer contours of a mask's connected parts, traced by scikit-image
on the pixel edges (marching squares at level 0.5), so that the COCO API rasterises them back to the mask; COCO
polygons cannot hold holes, so the exact mask stays in `rle`.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np

from finesam.rle import RLE, rle_area, rle_to_mask, to_coco

POLYGONS_EXTRA = "pip install 'finesam[polygons]' (scikit-image)"


@dataclass(frozen=True)
class SegmentedObject:
    """One mask of an image with what COCO records about it."""

    rle: RLE  # uncompressed, over the whole image
    score: float  # the predicted IoU
    category_id: int
    stability_score: float | None = None  # where the automatic generator computed it
    detection_score: float | None = None  # where a text detector found its box

    @property
    def area(self) -> int:
        return rle_area(self.rle)


def coco_box(mask: np.ndarray) -> list[int]:
    """[x, y, width, height] of a mask's set pixels (0, 0, 0, 0 when empty), as `pycocotools.mask.toBbox`."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    x, y = int(columns[0]), int(rows[0])
    return [x, y, int(columns[-1]) - x + 1, int(rows[-1]) - y + 1]


def check_polygons_available() -> None:
    """Raises `ValueError` (before any work) when the contour library is not installed."""
    try:
        import skimage.measure  # noqa: F401
    except ImportError:
        raise ValueError(f"--polygons traces contours with scikit-image, not installed: {POLYGONS_EXTRA}") from None


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """The outer contour of each connected part of a mask as a flat [x1, y1, x2, y2, ...] list in COCO's
    continuous coordinates (pixel i spans [i, i + 1)), collinear points dropped."""
    from skimage import measure

    # padded so that parts touching the border close; 1 - 0.5 maps the padded grid to COCO coordinates
    contours = measure.find_contours(
        np.pad(mask, 1).astype(np.float32), 0.5, fully_connected="high", positive_orientation="high"
    )
    polygons = []
    for contour in contours:
        y, x = contour[:, 0], contour[:, 1]
        if np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]) >= 0:
            continue  # a hole's contour (it winds the other way): inside an outer polygon anyway
        corners = measure.approximate_polygon(contour, tolerance=0.01)[:, ::-1] - 0.5
        polygons.append(corners.reshape(-1).tolist())
    return polygons


def annotation(item: SegmentedObject, *, polygons: bool = False) -> dict[str, Any]:
    """The COCO annotation of an object, without its ids: `segmentation` as COCO RLE, or with `polygons` as
    polygons (the RLE then kept in `rle`, and used as the segmentation when no polygon can be traced)."""
    mask = rle_to_mask(item.rle)
    record: dict[str, Any] = {"segmentation": to_coco(item.rle)}
    if polygons and (traced := mask_polygons(mask)):
        record = {"segmentation": traced, "rle": record["segmentation"]}
    record |= {"area": item.area, "bbox": coco_box(mask), "iscrowd": 0, "score": item.score}
    if item.stability_score is not None:
        record["stability_score"] = item.stability_score
    if item.detection_score is not None:
        record["detection_score"] = item.detection_score
    record["category_id"] = item.category_id
    return record


def coco_document(
    images: list[dict[str, Any]],
    annotations: list[list[dict[str, Any]]],
    category_ids: set[int],
    category_names: dict[int, str] | None = None,
) -> dict[str, Any]:
    """A COCO instances file: `images` (file_name, width, height) numbered from 1 in order, each image's
    annotations numbered from 1 across the file, and the categories: every id of `category_names` with its name
    (text prompts: the phrases), then the other ids used (1 is "object" unless named otherwise)."""
    coco_images, coco_annotations = [], []
    for image_id, (image, records) in enumerate(zip(images, annotations, strict=True), 1):
        coco_images.append({"id": image_id, **image})
        for record in records:
            coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": image_id, **record})
    names = dict(category_names or {})
    categories = [
        {"id": c, "name": names.get(c, "object" if c == 1 else f"category {c}")}
        for c in sorted(category_ids | names.keys())
    ]
    return {"images": coco_images, "annotations": coco_annotations, "categories": categories}
