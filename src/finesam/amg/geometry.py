"""Point grids, crop boxes, mask boxes and non-maximum suppression for automatic mask generation.

Boxes are x1, y1, x2, y2. The conventions (and numbers) are those of the official `segment_anything`
generator: a mask's box spans its first to its last set pixel (inclusive indices, so a one-pixel mask has an
empty box), and box overlaps are computed on those coordinates as torchvision does.
"""

import math
from itertools import product

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def point_grid(points_per_side: int) -> Float[np.ndarray, "points 2"]:
    """`points_per_side`² points (x, y) in [0, 1]², at the centres of a regular grid of cells, row by row."""
    half_cell = 1 / (2 * points_per_side)
    side = np.linspace(half_cell, 1 - half_cell, points_per_side)
    xs, ys = np.meshgrid(side, side)
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def layer_points_per_side(points_per_side: int, crop_n_layers: int, downscale_factor: int) -> list[int]:
    """Points per side of the grid of each crop layer (layer 0 is the whole image)."""
    return [int(points_per_side / downscale_factor**layer) for layer in range(crop_n_layers + 1)]


def crop_boxes(height: int, width: int, crop_n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """The crop boxes (x1, y1, x2, y2 in pixels) and their layer: the whole image, then for layer i (from 1)
    a 2^i x 2^i grid of overlapping crops; the overlap is `overlap_ratio` of the short side at layer 1 and
    halves with each further layer."""
    boxes, layers = [[0, 0, width, height]], [0]
    short_side = min(height, width)
    for layer in range(1, crop_n_layers + 1):
        per_side = 2**layer
        overlap = int(overlap_ratio * short_side * (2 / per_side))
        crop_width = math.ceil((overlap * (per_side - 1) + width) / per_side)
        crop_height = math.ceil((overlap * (per_side - 1) + height) / per_side)
        lefts = [(crop_width - overlap) * i for i in range(per_side)]
        tops = [(crop_height - overlap) * i for i in range(per_side)]
        for left, top in product(lefts, tops):  # column by column, as the official order
            boxes.append([left, top, min(left + crop_width, width), min(top + crop_height, height)])
            layers.append(layer)
    return boxes, layers


def boxes_from_masks(masks: Bool[Tensor, "batch height width"]) -> Int[Tensor, "batch 4"]:
    """The box of each mask: first and last set column and row (inclusive); 0, 0, 0, 0 for an empty mask."""
    batch, height, width = masks.shape
    if masks.numel() == 0:
        return torch.zeros(batch, 4, dtype=torch.int64, device=masks.device)
    # the largest byte rather than `any`: the same answer, over ten times faster on the CPU
    pixels = masks.view(torch.uint8)
    rows, columns = pixels.amax(dim=2).bool(), pixels.amax(dim=1).bool()

    def extent(present: Tensor, size: int) -> tuple[Tensor, Tensor]:
        index = torch.arange(size, device=present.device)
        first = torch.where(present, index, size).amin(dim=1)
        last = torch.where(present, index, -1).amax(dim=1)
        return first, last

    top, bottom = extent(rows, height)
    left, right = extent(columns, width)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    return boxes * rows.any(dim=1, keepdim=True)  # empty masks: zeros


def box_area(boxes: Float[Tensor, "batch 4"] | Int[Tensor, "batch 4"]) -> Tensor:
    """(x2 - x1) * (y2 - y1), in the boxes' dtype."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def non_maximum_suppression(
    boxes: Float[Tensor, "batch 4"], scores: Float[Tensor, " batch"], iou_threshold: float
) -> Int[Tensor, " kept"]:
    """Greedy NMS: the indices of the boxes kept, by descending score (equal scores in input order).

    Boxes are visited by descending score; a box is dropped when its IoU with a box already kept is above
    `iou_threshold`. IoU is computed in float32 on the coordinates as given (as torchvision's `nms`).
    """
    if len(boxes) == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes = boxes[order].float()
    area = box_area(sorted_boxes)
    removed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    kept: list[int] = []
    for i in range(len(order)):
        if removed[i]:
            continue
        kept.append(i)
        rest = sorted_boxes[i + 1 :]
        top_left = torch.maximum(rest[:, :2], sorted_boxes[i, :2])
        bottom_right = torch.minimum(rest[:, 2:], sorted_boxes[i, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
        iou = inter / (area[i] + area[i + 1 :] - inter)  # 0 / 0 (two empty boxes) is NaN: no suppression
        removed[i + 1 :] |= iou.double() > iou_threshold
    return order[torch.tensor(kept, dtype=torch.int64, device=boxes.device)]


def box_near_crop_edge(
    boxes: Int[Tensor, "batch 4"], crop_box: list[int], image_box: list[int], tolerance: float = 20.0
) -> Bool[Tensor, " batch"]:
    """Whether each box (in crop coordinates) comes within `tolerance` pixels of an edge of its crop that is not
    also an edge of the image: such masks are probably cut by the crop."""
    offset = torch.tensor([crop_box[0], crop_box[1]] * 2, device=boxes.device)
    in_image = (boxes + offset).float()
    crop = torch.tensor(crop_box, dtype=torch.float32, device=boxes.device)
    image = torch.tensor(image_box, dtype=torch.float32, device=boxes.device)
    near_crop = (in_image - crop).abs() <= tolerance
    near_image = (in_image - image).abs() <= tolerance
    return (near_crop & ~near_image).any(dim=1)
