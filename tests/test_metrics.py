"""Mask IoU and Boundary IoU on masks whose answers are counted by hand."""

import numpy as np
import pytest
import torch

from finesam.evaluation.metrics import boundary_dilation, boundary_iou, mask_boundary, mask_iou, summarise


def square(size: int, top: int, left: int, side: int, width: int | None = None) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + (width or side)] = True
    return mask


def test_empty_and_full_masks():
    empty, full = torch.zeros(5, 5, dtype=torch.bool), torch.ones(5, 5, dtype=torch.bool)
    assert mask_iou(empty, empty).item() == 1.0  # a perfect prediction of nothing
    assert boundary_iou(empty, empty).item() == 1.0
    assert mask_iou(empty, full).item() == 0.0
    assert boundary_iou(empty, full).item() == 0.0
    assert mask_iou(full, empty).item() == 0.0
    assert mask_iou(full, full).item() == 1.0
    assert boundary_iou(full, full).item() == 1.0


def test_one_pixel_masks():
    pixel = square(5, 2, 2, 1)
    assert torch.equal(mask_boundary(pixel, 1), pixel)  # a one-pixel mask is all boundary
    assert mask_iou(pixel, pixel).item() == 1.0
    assert boundary_iou(pixel, pixel).item() == 1.0
    neighbour = square(5, 2, 3, 1)
    assert mask_iou(pixel, neighbour).item() == 0.0
    assert boundary_iou(pixel, neighbour).item() == 0.0


def test_boundary_of_a_square_in_the_middle():
    inner = square(10, 3, 3, 4)  # 4x4 square, rows and columns 3..6
    band = mask_boundary(inner, 1)
    assert band.sum().item() == 16 - 4  # the 1-pixel ring; the 2x2 centre (rows/cols 4..5) is not boundary
    assert not band[4:6, 4:6].any()
    assert torch.equal(band | square(10, 4, 4, 2), inner)
    assert mask_boundary(inner, 2).sum().item() == 16  # a 5x5 erosion leaves nothing of a 4x4 square
    assert mask_boundary(square(10, 2, 2, 6), 2).sum().item() == 36 - 4  # 6x6 eroded by 5x5 leaves 2x2


def test_border_pixels_are_boundary():
    full = torch.ones(10, 10, dtype=torch.bool)
    assert mask_boundary(full, 1).sum().item() == 100 - 64  # outside the image is background
    left_half = square(10, 0, 0, 10, width=5)
    band = mask_boundary(left_half, 1)
    assert band[:, 0].all() and band[0, :5].all() and band[9, :5].all() and band[:, 4].all()
    assert band.sum().item() == 50 - 8 * 3  # interior: rows 1..8, columns 1..3


def test_dilation_from_the_image_diagonal():
    assert boundary_dilation(100, 100) == 3  # 0.02 * 141.4 = 2.83
    assert boundary_dilation(72, 96) == 2  # 0.02 * 120 = 2.4 rounds down
    assert boundary_dilation(300, 400) == 10  # 0.02 * 500
    assert boundary_dilation(20, 20) == 1  # 0.57 rounds up to the minimum
    assert boundary_dilation(10, 10) == 1  # 0.28 rounds to 0, raised to 1
    assert boundary_dilation(100, 100, dilation_ratio=0.01) == 1
    with pytest.raises(ValueError, match="dilation_ratio"):
        boundary_dilation(10, 10, dilation_ratio=0.0)


def test_shifted_square():
    pred = square(100, 40, 40, 20)  # rows/cols 40..59
    gt = square(100, 40, 41, 20)  # one column to the right
    assert mask_iou(pred, gt).item() == pytest.approx(380 / 420)
    # d = 3: bands of 400 - 14*14 = 204 pixels; inner squares' union 14x15 = 210 inside the 20x19 overlap
    assert boundary_iou(pred, gt).item() == pytest.approx(170 / (204 + 204 - 170))
    # d = 1: bands of 400 - 18*18 = 76; inner union 18x19 = 342
    assert boundary_iou(pred, gt, dilation_ratio=0.01).item() == pytest.approx(38 / (76 + 76 - 38))


def test_batched_equals_one_by_one():
    generator = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 23, 31, generator=generator) > 0.4
    gt = torch.rand(4, 23, 31, generator=generator) > 0.5
    ious, bious = mask_iou(pred, gt), boundary_iou(pred, gt, dilation_ratio=0.05)
    assert ious.shape == bious.shape == (4,)
    for i in range(4):
        assert ious[i] == mask_iou(pred[i], gt[i])
        assert bious[i] == boundary_iou(pred[i], gt[i], dilation_ratio=0.05)
    assert mask_iou(pred[0], gt[0]).shape == ()


def reference_boundary(mask: np.ndarray, dilation: int) -> np.ndarray:
    """The reference algorithm: pad one ring of zeros, erode `dilation` times by 3x3, subtract."""
    padded = np.pad(mask, 1)
    for _ in range(dilation):
        # beyond the padded image, erosion sees foreground (OpenCV's default border for erode)
        border = np.pad(padded, 1, constant_values=1)
        stacked = [
            border[1 + dy : 1 + dy + padded.shape[0], 1 + dx : 1 + dx + padded.shape[1]]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        padded = np.min(stacked, axis=0)
    return mask & ~padded[1:-1, 1:-1].astype(bool)


@pytest.mark.parametrize("dilation", [1, 2, 3, 5])
def test_boundary_equals_iterated_3x3_erosion(dilation):
    rng = np.random.default_rng(dilation)
    for _ in range(5):
        mask = rng.random((17, 24)) > 0.3
        mask[rng.integers(0, 17), :] = True  # long runs that reach the border
        expected = reference_boundary(mask, dilation)
        assert np.array_equal(mask_boundary(torch.from_numpy(mask), dilation).numpy(), expected)


def test_zero_one_integer_masks_equal_boolean_ones():
    pred = square(10, 2, 2, 5)
    gt = square(10, 3, 3, 5)
    assert mask_iou(pred.to(torch.uint8), gt.float()) == mask_iou(pred, gt)
    assert boundary_iou(pred.long(), gt.to(torch.uint8)) == boundary_iou(pred, gt)


@pytest.mark.parametrize(
    "bad",
    [torch.full((10, 10), 255, dtype=torch.uint8), torch.full((10, 10), 0.7), torch.full((10, 10), float("nan"))],
)
def test_masks_that_are_not_zero_one_are_refused(bad):
    with pytest.raises(ValueError, match="only 0 and 1"):
        mask_iou(bad, torch.zeros(10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        boundary_iou(torch.zeros(10, 10, dtype=torch.bool), bad)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(torch.zeros(4, 5, dtype=torch.bool), torch.zeros(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        boundary_iou(torch.zeros(2, 4, 4, dtype=torch.bool), torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        mask_iou(torch.zeros(5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-empty"):
        boundary_iou(torch.zeros(0, 5, dtype=torch.bool), torch.zeros(0, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dilation"):
        mask_boundary(torch.ones(3, 3, dtype=torch.bool), 0)


def test_summarise():
    summary = summarise([1.0, 0.5, 0.0], torch.tensor([0.5, 0.25, 0.0]))
    assert summary == {"count": 3.0, "miou": 0.5, "mbiou": 0.25}
    with pytest.raises(ValueError, match="3 mask IoUs but 2"):
        summarise([1.0, 0.5, 0.0], [0.5, 0.25])
    with pytest.raises(ValueError, match="no scores"):
        summarise([], [])
    with pytest.raises(ValueError, match="NaN"):
        summarise([float("nan")], [0.0])


def hq_sam_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """The HQ-SAM evaluation's `mask_to_boundary`, with OpenCV as it uses it: one ring of zeros around the
    mask, `d` erosions by a 3x3 square (OpenCV's erode sees foreground beyond the padded image), subtract."""
    import cv2

    height, width = mask.shape
    dilation = max(1, round(dilation_ratio * np.sqrt(height**2 + width**2)))
    padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=dilation)[1:-1, 1:-1]
    return mask & ~eroded.astype(bool)


def hq_sam_boundary_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred_band, gt_band = hq_sam_boundary(pred), hq_sam_boundary(gt)
    union = (pred_band | gt_band).sum()
    return float((pred_band & gt_band).sum() / union) if union else 1.0  # the reference divides by zero


def full_size_masks() -> dict[str, np.ndarray]:
    """Masks at DIS size (2048 x 1365, so d = 49): a real silhouette scaled up, thin wires, one touching the
    border, noise, an empty and a full one."""
    from PIL import Image
    from skimage import data

    height, width = 1365, 2048
    horse = np.array(Image.fromarray(~data.horse()).resize((width, height), Image.Resampling.NEAREST))
    rng = np.random.default_rng(0)
    wires = np.zeros((height, width), dtype=bool)
    for row in rng.integers(0, height, 12):
        wires[row : row + rng.integers(1, 4), :] = True  # 1-3 px lines across the whole image
    wires[:, 1000:1002] = True
    border = np.zeros((height, width), dtype=bool)
    border[:700, 1500:] = True  # touches the top and right edges
    return {
        "horse": horse,
        "wires": wires,
        "border": border,
        "noise": rng.random((height, width)) > 0.5,
        "empty": np.zeros((height, width), dtype=bool),
        "full": np.ones((height, width), dtype=bool),
    }


def test_boundary_iou_equals_the_hq_sam_evaluation_at_full_size():
    """Large, thin, border-touching, empty and full masks at 2048 x 1365, each against every other and against a
    shifted copy of itself: the boundary bands equal OpenCV's iterated erosion bit for bit, and the IoUs are
    the reference's (which would divide by zero where both bands are empty: 1.0 here)."""
    masks = full_size_masks()
    for name, mask in masks.items():
        band = mask_boundary(torch.from_numpy(mask), boundary_dilation(*mask.shape))
        assert np.array_equal(band.numpy(), hq_sam_boundary(mask)), name
    pairs = [(a, b) for a in masks for b in masks if a < b]
    pairs += [(name, name + " shifted") for name in masks]
    masks |= {f"{name} shifted": np.roll(mask, (9, -14), axis=(0, 1)) for name, mask in list(masks.items())}
    for a, b in pairs:
        expected = hq_sam_boundary_iou(masks[a], masks[b])
        actual = boundary_iou(torch.from_numpy(masks[a]), torch.from_numpy(masks[b])).item()
        assert actual == pytest.approx(expected, abs=1e-6), (a, b)
