"""`AutomaticMaskGenerator`: masks for everything in an image, from a grid of point prompts.

The procedure, options, defaults and records are those of the official `SamAutomaticMaskGenerator`
(`segment_anything` 1.0; `segment_anything_hq` 0.3 when the HQ-SAM adapter is injected) and, on SAM 2 models,
of `SAM2AutomaticMaskGenerator` (sam2 1.1.0): the image (and each crop) is encoded once, the grid points are
decoded a batch at a time (optionally each mask is refined once, fed back as a mask input with its point:
`use_m2m`), masks are kept when their predicted IoU and stability are high enough and they are not cut by a
crop edge, duplicates are removed by box NMS within each crop and then across crops (masks from smaller crops
win), optionally small islands and holes are removed (then NMS again; or, with SAM 2, in the low-resolution
logits by the model).

What differs between model generations is in the model's hooks (coordinates, upscaling, the low-resolution
logits fed back) and in the options, whose defaults a model class names (`finesam.amg.options.defaults_for`):
no code here branches on a model type.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, TypedDict, cast

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm import tqdm

from finesam.adapters.hq import hq_mask_only_set_to
from finesam.amg.geometry import (
    box_area,
    box_near_crop_edge,
    boxes_from_masks,
    crop_boxes,
    layer_points_per_side,
    non_maximum_suppression,
    point_grid,
)
from finesam.amg.options import defaults_for
from finesam.amg.regions import remove_small_regions
from finesam.amg.rle import RLE, mask_to_rle, masks_to_rle, rle_area, rle_to_mask, to_coco
from finesam.inputs import ImageLike, as_rgb
from finesam.model.sam import ImageEmbedding, SegmentAnything
from finesam.progress import progress_bar

OutputMode = Literal["binary_mask", "uncompressed_rle", "coco_rle"]
OUTPUT_MODES: tuple[str, ...] = ("binary_mask", "uncompressed_rle", "coco_rle")
SmallRegions = Literal["masks", "model"]
SMALL_REGIONS: tuple[str, ...] = ("masks", "model")
MAX_CROP_LAYERS = 4  # 341 crops; the official generator's examples use 1 (5 crops)
UPSCALE_BUDGET = 1 << 25  # float32 values of upscaled logits held at once (128 MB)
COUNT_BUFFER = 1 << 22  # float32 values compared at once by `stability_score` (16 MB, reused)
FLOAT_EXACT_COUNT = 1 << 24  # float32 holds every integer up to this one: sums of that many 0/1 are exact


class MaskRecord(TypedDict):
    """One generated mask, with the keys of the official generator's records."""

    segmentation: np.ndarray | RLE  # (H, W) bool, or an uncompressed / COCO RLE, after `output_mode`
    area: int  # pixels
    bbox: list[int]  # x, y, width, height (width = last column - first column)
    predicted_iou: float
    point_coords: list[list[float]]  # [[x, y]]: the point prompt, in image pixels
    stability_score: float
    crop_box: list[int]  # x, y, width, height of the crop the mask was found in


@dataclass(frozen=True)
class Candidates:
    """Masks found so far, as RLE over the whole image, and what the generator knows about each."""

    rles: list[RLE]
    boxes: Int[Tensor, "n 4"]  # x1, y1, x2, y2
    iou_predictions: Float[Tensor, " n"]
    stability_scores: Float[Tensor, " n"]
    points: Float[Tensor, "n 2"]  # float64
    crop_boxes: Int[Tensor, "n 4"]

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, index: Int[Tensor, " k"]) -> "Candidates":
        chosen = index.tolist()
        return Candidates(
            [self.rles[i] for i in chosen],
            self.boxes[index],
            self.iou_predictions[index],
            self.stability_scores[index],
            self.points[index],
            self.crop_boxes[index],
        )

    def moved(self, crop_box: list[int]) -> "Candidates":
        """Boxes and points from crop to image coordinates."""
        left, top = crop_box[:2]
        return Candidates(
            self.rles,
            self.boxes + torch.tensor([left, top, left, top]),
            self.iou_predictions,
            self.stability_scores,
            self.points + torch.tensor([left, top]),
            self.crop_boxes,
        )

    @staticmethod
    def concatenate(parts: Sequence["Candidates"]) -> "Candidates":
        return Candidates(
            [rle for part in parts for rle in part.rles],
            torch.cat([part.boxes for part in parts]),
            torch.cat([part.iou_predictions for part in parts]),
            torch.cat([part.stability_scores for part in parts]),
            torch.cat([part.points for part in parts]),
            torch.cat([part.crop_boxes for part in parts]),
        )


def stability_score(
    logits: Float[Tensor, "batch height width"], threshold: float, offset: float
) -> Float[Tensor, " batch"]:
    """IoU of the masks thresholded at `threshold + offset` and `threshold - offset` (the first lies inside the
    second): how little the mask moves when the cut-off does."""
    inside = torch.empty(len(logits), dtype=torch.int64, device=logits.device)
    outside = torch.empty_like(inside)
    # the comparison is written as 0.0 / 1.0 into one reused float buffer and summed as floats, several times
    # faster on the CPU than summing booleans; exact, since float32 holds every count up to FLOAT_EXACT_COUNT
    pixels = logits[0].numel() if len(logits) else 1
    per_part = max(1, COUNT_BUFFER // pixels)
    buffer = logits.new_empty(min(per_part, len(logits)), pixels)
    for start in range(0, len(logits), per_part):
        part = logits[start : start + per_part].flatten(1)
        above = buffer[: len(part)]
        for counts, cut in ((inside, threshold + offset), (outside, threshold - offset)):
            torch.gt(part, cut, out=above)
            counts[start : start + len(part)] = sum(
                piece.sum(dim=1).to(torch.int64) for piece in above.split(FLOAT_EXACT_COUNT, dim=1)
            )
    return inside.to(torch.float32) / outside.to(torch.float32)


def xywh(box: Sequence[int]) -> list[int]:
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


class AutomaticMaskGenerator:
    """Segments everything in an image with a `SegmentAnything` model, as the official
    `SamAutomaticMaskGenerator` (same options, defaults and records), or with a SAM 2 model
    (`SegmentAnything2`) as `SAM2AutomaticMaskGenerator`: options left as None take the model's defaults
    (`finesam.amg.options.GENERATOR_PRESETS`).

    With the HQ-SAM adapter injected in the model the masks are HQ-SAM masks, as `segment_anything_hq`'s
    generator makes them; `hq_mask_only=True` keeps the HQ mask alone (official `hq_token_only`), `None` leaves
    the adapter's own setting. `multimask_output` is the HQ generator's `generate` option (3 masks per point for
    SAM, the best of SAM's three plus the HQ mask for HQ-SAM).

    Options (official names): `points_per_side` points along each side of the image (or `point_grids`, one
    (N, 2) grid in [0, 1]² per crop layer), decoded `points_per_batch` at a time; masks are kept with predicted
    IoU > `pred_iou_thresh` and stability score >= `stability_score_thresh` (logits thresholded at
    ±`stability_score_offset`); duplicates are removed by box NMS at `box_nms_thresh` in a crop and
    `crop_nms_thresh` between crops; `crop_n_layers` layers of crops (2^i x 2^i crops in layer i, overlapping by
    `crop_overlap_ratio`, with `points_per_side / crop_n_points_downscale_factor^i` points per side); islands and
    holes under `min_mask_region_area` pixels are removed; `output_mode` is "binary_mask", "uncompressed_rle"
    or "coco_rle" (COCO API compatible).

    SAM 2's options: masks are cut at `mask_threshold` (logits; also the centre of the stability score);
    `use_m2m` refines every decoded mask once, its clamped low-resolution logits (`model.returned_low_res`)
    fed back as the mask input with its point, one mask out, before the masks are filtered; `small_regions`
    says where `min_mask_region_area` acts: "masks" (SAM: holes and islands of the final masks, then NMS) or
    "model" (SAM 2: the model's `max_hole_area` / `max_sprinkle_area` on the low-resolution logits, for the
    call).
    """

    def __init__(
        self,
        model: SegmentAnything,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float | None = None,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Sequence[Float[np.ndarray, "points 2"]] | None = None,
        min_mask_region_area: int = 0,
        output_mode: OutputMode = "binary_mask",
        multimask_output: bool = True,
        hq_mask_only: bool | None = None,
        use_m2m: bool = False,
        small_regions: SmallRegions | None = None,
    ) -> None:
        defaults = defaults_for(model)
        iou_thresh: float = defaults["pred_iou_thresh"] if pred_iou_thresh is None else pred_iou_thresh
        small_regions = defaults["small_regions"] if small_regions is None else small_regions
        if small_regions not in SMALL_REGIONS:
            raise ValueError(f"unknown small_regions {small_regions!r}; one of {', '.join(SMALL_REGIONS)}")
        if small_regions == "model" and model is not None and not hasattr(model, "max_hole_area"):
            raise ValueError(
                f'small_regions="model" needs a model that fills holes itself (max_hole_area, max_sprinkle_area): '
                f"{type(model).__name__} does not"
            )
        if not 0 <= crop_n_layers <= MAX_CROP_LAYERS:
            # the crop count only where it is a number worth reading: a request may send 10**30 layers
            crops = sum(4**i for i in range(crop_n_layers + 1)) if 0 < crop_n_layers <= 16 else None
            raise ValueError(
                f"crop_n_layers must be in 0..{MAX_CROP_LAYERS}, got {crop_n_layers}"
                + (f" ({crops} crops, each encoded)" if crops else "")
            )
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if points_per_side is not None:
            if crop_n_points_downscale_factor < 1:
                raise ValueError(f"crop_n_points_downscale_factor must be >= 1, got {crop_n_points_downscale_factor}")
            sides = layer_points_per_side(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
            if min(sides) < 1:
                raise ValueError(
                    f"points_per_side {points_per_side} gives no point in some crop layer (points per side by "
                    f"layer: {sides}): use more points, fewer layers or a smaller crop_n_points_downscale_factor"
                )
            self.point_grids = [point_grid(side) for side in sides]
        else:
            assert point_grids is not None
            self.point_grids = [self._checked_grid(grid, i) for i, grid in enumerate(point_grids)]
            if len(self.point_grids) != crop_n_layers + 1:
                raise ValueError(
                    f"point_grids must hold one grid per crop layer ({crop_n_layers + 1} with crop_n_layers="
                    f"{crop_n_layers}), got {len(self.point_grids)}"
                )
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"unknown output_mode {output_mode!r}; one of {', '.join(OUTPUT_MODES)}")
        if not 0 <= crop_overlap_ratio < 1:
            raise ValueError(f"crop_overlap_ratio must be in [0, 1), got {crop_overlap_ratio}")
        if min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")
        thresholds = dict(
            pred_iou_thresh=iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            mask_threshold=mask_threshold,
            box_nms_thresh=box_nms_thresh,
            crop_nms_thresh=crop_nms_thresh,
        )
        for name, value in thresholds.items():
            if not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        self.model = model
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.mask_threshold = mask_threshold
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.multimask_output = multimask_output
        self.hq_mask_only = hq_mask_only
        self.use_m2m = use_m2m
        self.small_regions = small_regions

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Raises the error the constructor would raise for these options (`ValueError` for a bad value,
        `TypeError` for an unknown name), without a model: to check them before loading one."""
        cls(cast(SegmentAnything, None), **options)  # the constructor checks and stores; it never uses the model

    @staticmethod
    def _checked_grid(grid: Any, layer: int) -> np.ndarray:
        array = np.asarray(grid, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
            raise ValueError(f"point_grids[{layer}] must have shape (N, 2) with N >= 1, got {array.shape}")
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"point_grids[{layer}] must hold x, y coordinates in [0, 1]")
        return array

    @torch.no_grad()
    def generate(self, image: ImageLike, progress: bool = False) -> list[MaskRecord]:
        """Masks for everything in the image (PIL or numpy, see `as_rgb`), as records like the official ones.

        Args:
            image: the image.
            progress: a progress bar of the point batches on stderr (see `finesam.progress`).
        """
        pixels = np.asarray(as_rgb(image))
        with self._hq_setting(), self._model_small_regions():
            candidates = self._generate(pixels, progress)
        if self.min_mask_region_area > 0 and self.small_regions == "masks":
            candidates = self._without_small_regions(candidates)
        return [self._record(candidates, i) for i in range(len(candidates))]

    @contextmanager
    def _hq_setting(self) -> Iterator[None]:
        if self.hq_mask_only is None:
            yield
            return
        with hq_mask_only_set_to(self.model, self.hq_mask_only):
            yield

    @contextmanager
    def _model_small_regions(self) -> Iterator[None]:
        """With small_regions="model", the model fills holes and removes sprinkles of min_mask_region_area
        pixels in its low-resolution logits for the call (as SAM 2's generator builds its predictor)."""
        if self.small_regions != "model" or self.min_mask_region_area == 0:
            yield
            return
        model: Any = self.model
        saved = model.max_hole_area, model.max_sprinkle_area
        model.max_hole_area = model.max_sprinkle_area = self.min_mask_region_area
        try:
            yield
        finally:
            model.max_hole_area, model.max_sprinkle_area = saved

    def _generate(self, image: np.ndarray, progress: bool) -> Candidates:
        height, width = image.shape[:2]
        boxes, layers = crop_boxes(height, width, self.crop_n_layers, self.crop_overlap_ratio)
        batches = sum(-(-len(self.point_grids[layer]) // self.points_per_batch) for layer in layers)
        description = "point batches" if len(boxes) == 1 else f"point batches of {len(boxes)} crops"
        with progress_bar(batches, description, quiet=not progress) as bar:
            candidates = Candidates.concatenate(
                [self._crop(image, box, layer, bar) for box, layer in zip(boxes, layers, strict=True)]
            )
        if len(boxes) > 1:  # duplicates across crops: the mask from the smaller crop wins
            keep = non_maximum_suppression(
                candidates.boxes.float(), 1 / box_area(candidates.crop_boxes), self.crop_nms_thresh
            )
            candidates = candidates.select(keep)
        return candidates

    def _crop(self, image: np.ndarray, crop_box: list[int], layer: int, bar: tqdm) -> Candidates:
        left, top, right, bottom = crop_box
        crop = image[top:bottom, left:right]
        embedding = self.model.encode_image(crop)
        points = self.point_grids[layer] * np.array([crop.shape[1], crop.shape[0]])
        image_size = (image.shape[0], image.shape[1])
        parts = []
        for i in range(0, len(points), self.points_per_batch):
            parts.append(self._batch(embedding, points[i : i + self.points_per_batch], crop_box, image_size))
            bar.update(1)
        found = Candidates.concatenate(parts)
        found = found.select(non_maximum_suppression(found.boxes.float(), found.iou_predictions, self.box_nms_thresh))
        return found.moved(crop_box)

    def _batch(
        self, embedding: ImageEmbedding, points: np.ndarray, crop_box: list[int], image_size: tuple[int, int]
    ) -> Candidates:
        """Masks for a batch of points in one crop: boxes in crop coordinates, RLE over the whole image."""
        model = self.model
        multimask = self.multimask_output
        low_res, iou = model.decode_prompts(embedding, points=points[:, None, :], multimask_output=multimask)
        masks_per_point = low_res.shape[1]
        low_res, iou = low_res.flatten(0, 1), iou.flatten()
        point_of_mask = torch.from_numpy(points).repeat_interleave(masks_per_point, dim=0)
        if self.use_m2m:
            low_res, iou = self._refined(embedding, point_of_mask, low_res)
        # the predicted IoU needs no upscaling: filter first, then upscale the survivors a chunk at a time
        selected = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
        height, width = embedding.original_size
        chunk = max(1, UPSCALE_BUDGET // max(height * width, model.config.image_size**2))
        parts = [
            self._upscaled(low_res[index], iou[index], point_of_mask[index.cpu()], embedding, crop_box, image_size)
            for index in selected.nonzero()[:, 0].split(chunk)
        ]
        return Candidates.concatenate(parts) if parts else _no_candidates()

    def _refined(
        self, embedding: ImageEmbedding, points: Tensor, low_res: Tensor
    ) -> tuple[Float[Tensor, "n low low"], Float[Tensor, " n"]]:
        """Every mask decoded again from its point and its own low-resolution logits (as the model returns them
        to be fed back), one mask each, `points_per_batch` at a time (the official `refine_with_m2m`)."""
        model, step = self.model, self.points_per_batch
        refined, ious = [], []
        for i in range(0, len(points), step):
            fed_back = model.returned_low_res(low_res[i : i + step, None]).cpu()
            masks, iou = model.decode_prompts(
                embedding, points=points[i : i + step, None, :], mask_input=fed_back, multimask_output=False
            )
            refined.append(masks[:, 0])
            ious.append(iou[:, 0])
        if not refined:
            return low_res, low_res.new_zeros(0)
        return torch.cat(refined), torch.cat(ious)

    def _upscaled(
        self,
        low_res: Tensor,
        iou: Tensor,
        points: Tensor,
        embedding: ImageEmbedding,
        crop_box: list[int],
        image_size: tuple[int, int],
    ) -> Candidates:
        resize = (embedding.input_size, embedding.original_size)
        logits = self.model.postprocess(low_res[:, None], *resize)[:, 0]
        stability = stability_score(logits, self.mask_threshold, self.stability_score_offset)
        if self.stability_score_thresh > 0:
            stable = stability >= self.stability_score_thresh
            logits, iou, stability, points = logits[stable], iou[stable], stability[stable], points[stable.cpu()]
        masks = logits > self.mask_threshold
        boxes = boxes_from_masks(masks)
        height, width = image_size
        inside = ~box_near_crop_edge(boxes, crop_box, [0, 0, width, height])
        masks, boxes, iou, stability, points = (
            masks[inside],
            boxes[inside],
            iou[inside],
            stability[inside],
            points[inside.cpu()],
        )
        left, top, right, bottom = crop_box
        if crop_box != [0, 0, width, height]:  # RLE over the whole image
            masks = F.pad(masks, (left, width - right, top, height - bottom), value=False)
        crops = torch.tensor([crop_box], dtype=torch.int64).expand(len(boxes), 4)
        return Candidates(masks_to_rle(masks), boxes.cpu(), iou.cpu(), stability.cpu(), points, crops)

    def _without_small_regions(self, candidates: Candidates) -> Candidates:
        """Fills small holes and removes small islands, then NMS again, preferring masks that did not change."""
        if len(candidates) == 0:
            return candidates
        rles, boxes, unchanged = list(candidates.rles), candidates.boxes.clone(), []
        for i, rle in enumerate(candidates.rles):
            mask, holes_filled = remove_small_regions(rle_to_mask(rle), self.min_mask_region_area, "holes")
            mask, islands_removed = remove_small_regions(mask, self.min_mask_region_area, "islands")
            unchanged.append(float(not (holes_filled or islands_removed)))
            if holes_filled or islands_removed:
                rles[i] = mask_to_rle(mask)
                boxes[i] = boxes_from_masks(torch.from_numpy(mask)[None])[0]
        keep = non_maximum_suppression(
            boxes.float(), torch.tensor(unchanged), max(self.box_nms_thresh, self.crop_nms_thresh)
        )
        return replace(candidates, rles=rles, boxes=boxes).select(keep)

    def _record(self, candidates: Candidates, i: int) -> MaskRecord:
        rle = candidates.rles[i]
        segmentation: np.ndarray | RLE
        if self.output_mode == "binary_mask":
            segmentation = rle_to_mask(rle)
        elif self.output_mode == "coco_rle":
            segmentation = to_coco(rle)
        else:
            segmentation = rle
        return {
            "segmentation": segmentation,
            "area": rle_area(rle),
            "bbox": xywh(candidates.boxes[i].tolist()),
            "predicted_iou": candidates.iou_predictions[i].item(),
            "point_coords": [candidates.points[i].tolist()],
            "stability_score": candidates.stability_scores[i].item(),
            "crop_box": xywh(candidates.crop_boxes[i].tolist()),
        }


def _no_candidates() -> Candidates:
    return Candidates(
        [],
        torch.zeros(0, 4, dtype=torch.int64),
        torch.zeros(0),
        torch.zeros(0),
        torch.zeros(0, 2, dtype=torch.float64),
        torch.zeros(0, 4, dtype=torch.int64),
    )
