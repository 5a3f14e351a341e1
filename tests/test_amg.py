"""`AutomaticMaskGenerator` against the official `SamAutomaticMaskGenerator` (segment_anything 1.0, and
segment_anything_hq 0.3 with the HQ-SAM adapter), same converted random weights, real photos.

Parity: the same number of masks (at least MIN_MASKS, so that no test passes on an empty result), in the same
order, with the same boxes, crop boxes and points; IoU >= 0.999 between the masks; predicted IoU and
stability score within 1e-4.
"""

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from finesam.amg import AutomaticMaskGenerator, rle_to_mask
from finesam.amg.geometry import (
    box_near_crop_edge,
    boxes_from_masks,
    crop_boxes,
    non_maximum_suppression,
    point_grid,
)
from finesam.model import SegmentAnything
from finesam.weights.loading import sam_from_state_dict

from conftest import SMALL, photo
from helpers import finesam, with_adapter
from official import build_official, segment_anything, segment_anything_hq, structured

MIN_MASKS = 5
SCORE_TOLERANCE = 1e-4
MIN_IOU = 0.999
# A stability score is a ratio of pixel counts: logits within 1e-5 of the official ones still flip the few
# pixels that sit on a threshold, so its difference is bounded in pixels of the mask.
STABILITY_PIXELS = 8
# Random weights give low predicted IoUs (about -0.1 to 0) and logits close to 0: thresholds to match.
OPTIONS = dict(points_per_side=8, pred_iou_thresh=0.1, stability_score_thresh=0.3, stability_score_offset=0.01)


@pytest.fixture(scope="module")
def official_sam():
    return structured(build_official(SMALL, seed=2))


@pytest.fixture(scope="module")
def sam(official_sam) -> SegmentAnything:
    return sam_from_state_dict(official_sam.state_dict())


@pytest.fixture(scope="module")
def official_hq():
    return structured(build_official(SMALL, seed=2, hq=True))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """The photo at half size: the official generator upscales every candidate mask to the image size."""
    return np.asarray(photo("astronaut_crop").resize((400, 267), Image.Resampling.BILINEAR))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def assert_same_records(expected: list[dict], actual: list[dict]) -> dict[str, float]:
    """Record by record; returns the worst differences seen."""
    assert len(actual) == len(expected) >= MIN_MASKS
    worst = {"iou": 1.0, "predicted_iou": 0.0, "stability_pixels": 0.0}
    for reference, ours in zip(expected, actual, strict=True):
        assert set(ours) == set(reference)
        assert ours["bbox"] == reference["bbox"]
        assert ours["crop_box"] == reference["crop_box"]
        assert np.allclose(ours["point_coords"], reference["point_coords"], rtol=0, atol=1e-9)
        worst["predicted_iou"] = max(worst["predicted_iou"], abs(ours["predicted_iou"] - reference["predicted_iou"]))
        flipped = abs(ours["stability_score"] - reference["stability_score"]) * reference["area"]
        worst["stability_pixels"] = max(worst["stability_pixels"], flipped)
        masks = [r["segmentation"] if isinstance(r["segmentation"], np.ndarray) else None for r in (reference, ours)]
        if masks[0] is not None and masks[1] is not None:
            worst["iou"] = min(worst["iou"], mask_iou(masks[0], masks[1]))
            assert ours["area"] == int(masks[1].sum())
    assert worst["iou"] >= MIN_IOU
    assert worst["predicted_iou"] <= SCORE_TOLERANCE
    assert worst["stability_pixels"] <= STABILITY_PIXELS
    return worst


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"box_nms_thresh": 0.9}, id="whole image"),
        pytest.param({"crop_n_layers": 1}, id="crops"),
        pytest.param({"min_mask_region_area": 400, "box_nms_thresh": 0.9}, id="small regions"),
    ],
)
def test_matches_official_generator(official_sam, sam, astronaut, options):
    settings = {**OPTIONS, **options}
    expected = segment_anything.SamAutomaticMaskGenerator(official_sam, **settings).generate(astronaut)
    actual = AutomaticMaskGenerator(sam, **settings).generate(astronaut)
    assert_same_records(expected, actual)
    if "crop_n_layers" in options:  # some masks come from the crops, some from the whole image
        assert len({tuple(r["crop_box"]) for r in actual}) > 1


@pytest.mark.parametrize("hq_only", [False, True])
def test_matches_official_hq_generator(official_hq, astronaut, hq_only):
    model, adapter = with_adapter(official_hq)
    adapter.inject()
    # the HQ masks of these weights hardly depend on the point: without NMS they all stay (one per point)
    settings = {**OPTIONS, "box_nms_thresh": 1.0} if hq_only else {**OPTIONS, "crop_n_layers": 1}
    reference = segment_anything_hq.SamAutomaticMaskGenerator(official_hq, **settings)
    if hq_only:  # the official generator has no option for it: its predictor does
        reference.predictor.predict_torch = functools.partial(reference.predictor.predict_torch, hq_token_only=True)
    expected = reference.generate(astronaut)
    actual = AutomaticMaskGenerator(model, **settings, hq_mask_only=hq_only).generate(astronaut)
    assert_same_records(expected, actual)
    assert adapter.hq_mask_only is False  # the generator's setting lasts for the call


def test_output_modes_hold_the_same_masks(sam, astronaut):
    generators = {
        mode: AutomaticMaskGenerator(sam, **OPTIONS, output_mode=mode)
        for mode in ("binary_mask", "uncompressed_rle", "coco_rle")
    }
    records = {mode: generator.generate(astronaut) for mode, generator in generators.items()}
    binary = records["binary_mask"]
    assert len(binary) >= MIN_MASKS
    for mode in ("uncompressed_rle", "coco_rle"):
        for a, b in zip(binary, records[mode], strict=True):
            assert b["segmentation"]["size"] == [astronaut.shape[0], astronaut.shape[1]]
            assert np.array_equal(rle_to_mask(b["segmentation"]), a["segmentation"])
            assert {k: v for k, v in a.items() if k != "segmentation"} == {
                k: v for k, v in b.items() if k != "segmentation"
            }
    assert isinstance(records["coco_rle"][0]["segmentation"]["counts"], str)


def test_official_coco_output_is_ours(official_sam, sam, astronaut):
    expected = segment_anything.SamAutomaticMaskGenerator(official_sam, **OPTIONS, output_mode="coco_rle").generate(
        astronaut
    )
    actual = AutomaticMaskGenerator(sam, **OPTIONS, output_mode="coco_rle").generate(astronaut)
    assert len(actual) == len(expected) >= MIN_MASKS
    for reference, ours in zip(expected, actual, strict=True):
        assert ours["segmentation"]["size"] == reference["segmentation"]["size"]
        assert mask_iou(rle_to_mask(ours["segmentation"]), rle_to_mask(reference["segmentation"])) >= MIN_IOU


def test_accepts_pil_and_numpy(sam, astronaut):
    generator = AutomaticMaskGenerator(sam, **OPTIONS)
    from_pil = generator.generate(Image.fromarray(astronaut))
    from_numpy = generator.generate(astronaut)
    assert [r["bbox"] for r in from_pil] == [r["bbox"] for r in from_numpy]


def test_hq_mask_only_needs_the_adapter(sam, astronaut):
    with pytest.raises(ValueError, match="HQ-SAM adapter"):
        AutomaticMaskGenerator(sam, points_per_side=2, hq_mask_only=True).generate(astronaut)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"points_per_side": None}, "exactly one of points_per_side and point_grids"),
        ({"point_grids": [point_grid(4)]}, "exactly one of points_per_side and point_grids"),
        ({"points_per_side": None, "point_grids": [np.zeros((4, 3))]}, r"point_grids\[0\] must have shape"),
        ({"points_per_side": None, "point_grids": [np.full((4, 2), 1.5)]}, r"in \[0, 1\]"),
        ({"points_per_side": None, "point_grids": [point_grid(4)], "crop_n_layers": 1}, "one grid per crop layer"),
        ({"points_per_side": 0}, "gives no point"),
        ({"points_per_side": 4, "crop_n_layers": 3, "crop_n_points_downscale_factor": 2}, "gives no point"),
        ({"output_mode": "polygons"}, "unknown output_mode"),
        ({"points_per_batch": 0}, "points_per_batch"),
        ({"crop_n_layers": -1}, "crop_n_layers"),
        ({"crop_overlap_ratio": 1.0}, "crop_overlap_ratio"),
        ({"min_mask_region_area": -5}, "min_mask_region_area"),
        ({"pred_iou_thresh": float("nan")}, "pred_iou_thresh"),
    ],
)
def test_bad_options_are_refused(sam, options, message):
    with pytest.raises(ValueError, match=message):
        AutomaticMaskGenerator(sam, **options)
    with pytest.raises(ValueError, match=message):
        AutomaticMaskGenerator.check_options(**options)  # the same check, without a model


def test_good_options_pass_the_check_without_a_model():
    AutomaticMaskGenerator.check_options(points_per_side=4, crop_n_layers=1, output_mode="coco_rle")
    with pytest.raises(TypeError, match="points_per_sides"):
        AutomaticMaskGenerator.check_options(points_per_sides=4)


def test_point_grids_and_crops_match_official():
    from segment_anything.utils import amg

    for side in (1, 3, 8, 32):
        assert np.array_equal(point_grid(side), amg.build_point_grid(side))
    for size in ((534, 800), (1200, 1800), (1024, 1024), (97, 31)):
        for layers in (0, 1, 2, 3):
            for ratio in (512 / 1500, 0.0, 0.5):
                assert crop_boxes(*size, layers, ratio) == amg.generate_crop_boxes(size, layers, ratio)


def test_boxes_from_masks_match_official():
    from segment_anything.utils import amg

    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 31, 17, generator=generator) > 0.97
    masks[0] = False
    masks[1, 5, 7] = True
    assert torch.equal(boxes_from_masks(masks), amg.batched_mask_to_box(masks))
    boxes = boxes_from_masks(masks)
    for crop in ([0, 0, 17, 31], [10, 20, 27, 51]):
        expected = amg.is_box_near_crop_edge(boxes, crop, [0, 0, 40, 60])
        assert torch.equal(box_near_crop_edge(boxes, crop, [0, 0, 40, 60]), expected)


@pytest.mark.parametrize("split", [False, True], ids=["one-part", "split"])
def test_stability_score_matches_official(monkeypatch, split):
    from segment_anything.utils import amg

    from finesam.amg import generator

    if split:  # several masks per buffer, several buffers, and counts summed over pieces of a mask
        monkeypatch.setattr(generator, "COUNT_BUFFER", 3 * 37 * 53)
        monkeypatch.setattr(generator, "FLOAT_EXACT_COUNT", 500)
    logits = torch.randn(7, 37, 53, generator=torch.Generator().manual_seed(0))
    logits[2] = 5.0  # every pixel inside both
    logits[3, :4] = 0.005  # on a threshold's side
    for offset in (1.0, 0.01):
        expected = amg.calculate_stability_score(logits, 0.0, offset)
        assert torch.equal(generator.stability_score(logits, 0.0, offset), expected)
    assert generator.stability_score(logits[:0], 0.0, 1.0).shape == (0,)


def test_nms_hand_cases():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 1.0, 11.0, 11.0],  # IoU 81/119 = 0.68 with the first
            [0.0, 0.0, 10.0, 9.0],  # IoU 0.9 with the first
            [20.0, 20.0, 30.0, 30.0],  # apart
            [5.0, 5.0, 5.0, 5.0],  # empty
            [5.0, 5.0, 5.0, 5.0],  # empty: 0 / 0 suppresses nothing
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.95, 0.1, 0.5, 0.5])
    assert non_maximum_suppression(boxes, scores, 0.7).tolist() == [2, 1, 4, 5, 3]
    assert non_maximum_suppression(boxes, scores, 0.5).tolist() == [2, 4, 5, 3]  # 1 overlaps 2 with IoU 0.61
    # equal scores: input order
    assert non_maximum_suppression(boxes[:3], torch.ones(3), 0.95).tolist() == [0, 1, 2]
    assert non_maximum_suppression(boxes[:3], torch.ones(3), 0.65).tolist() == [0]
    assert non_maximum_suppression(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_nms_matches_reference_on_random_boxes():
    from official import _batched_nms

    generator = torch.Generator().manual_seed(3)
    corners = torch.randint(0, 50, (300, 2, 2), generator=generator).float().sort(dim=1).values
    boxes = torch.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], dim=1)
    scores = torch.randint(0, 20, (300,), generator=generator).float()  # many ties
    for threshold in (0.3, 0.7, 0.9):
        expected = _batched_nms(boxes, scores, torch.zeros(300), threshold)
        assert torch.equal(non_maximum_suppression(boxes, scores, threshold), expected)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory, official_sam, astronaut):
    directory = tmp_path_factory.mktemp("everything")
    torch.save(official_sam.state_dict(), directory / "sam_small.pth")
    Image.fromarray(astronaut).save(directory / "astronaut.png")
    return directory / "sam_small.pth", directory / "astronaut.png"


CLI_OPTIONS = ["--points-per-side", "8", "--pred-iou-thresh", "0.1", "--stability-score-thresh", "0.3"]
CLI_OPTIONS += ["--stability-score-offset", "0.01"]


@pytest.mark.parametrize("output_format", ["png", "coco"])
def test_cli_everything_writes_the_official_masks(tmp_path, cli_inputs, official_sam, astronaut, output_format):
    weights, image = cli_inputs
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "0998.png").write_bytes(b"ours, from an earlier run")
    (out / "masks.json").write_text(json.dumps({"annotations": [{"id": 998, "file": "masks/0998.png"}]}))
    (out / "masks" / "0999.png").write_bytes(b"someone else's")
    result = finesam("everything", image, "--weights", weights, "--out", out, "--format", output_format, *CLI_OPTIONS)
    assert result.returncode == 0, result.stderr
    expected = segment_anything.SamAutomaticMaskGenerator(official_sam, **OPTIONS).generate(astronaut)
    document = json.loads((out / "masks.json").read_text())
    assert document["image"] == {
        "file_name": "astronaut.png",
        "height": astronaut.shape[0],
        "width": astronaut.shape[1],
    }
    annotations = document["annotations"]
    assert len(annotations) == len(expected) >= MIN_MASKS
    assert f"{len(expected)} masks" in result.stdout
    for i, (annotation, reference) in enumerate(zip(annotations, expected, strict=True)):
        assert annotation["id"] == i
        assert annotation["bbox"] == reference["bbox"] and annotation["crop_box"] == reference["crop_box"]
        assert abs(annotation["predicted_iou"] - reference["predicted_iou"]) <= SCORE_TOLERANCE
        if output_format == "png":
            mask = np.asarray(Image.open(out / annotation["file"])) == 255
        else:
            mask = rle_to_mask(annotation["segmentation"])
        assert mask_iou(mask, reference["segmentation"]) >= MIN_IOU
    # the earlier run's mask that this run did not write again is gone; a file we never wrote stays
    assert not (out / "masks" / "0998.png").exists()
    assert (out / "masks" / "0999.png").read_bytes() == b"someone else's"
    with Image.open(out / "overlay.png") as picture:
        assert picture.size == (astronaut.shape[1], astronaut.shape[0])


def test_cli_everything_errors(tmp_path, cli_inputs):
    weights, image = cli_inputs
    absent = tmp_path / "absent.pth"  # options are checked before the model loads
    for option, value, message in (
        ("--points-per-side", "0", "points_per_side 0 gives no point"),
        ("--points-per-batch", "0", "points_per_batch must be >= 1, got 0"),
        ("--pred-iou-thresh", "nan", "pred_iou_thresh must be a finite number, got nan"),
    ):
        result = finesam("everything", image, "--weights", absent, "--out", tmp_path, option, value)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(f"finesam everything: error: {message}")
    result = finesam("everything", image, "--weights", weights, "--out", tmp_path, "--hq-only")
    assert result.returncode == 2 and "--hq-only needs HQ-SAM weights" in result.stderr
