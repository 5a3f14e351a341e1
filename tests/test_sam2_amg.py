"""`AutomaticMaskGenerator` on a SAM 2.1 model against Meta's `SAM2AutomaticMaskGenerator` (sam2 1.1.0): the
official Hiera-T structure made small (`small_hiera`), seeded random weights converted to ours, real photos.

Parity rule: the same number of masks (at least MIN_MASKS, so that no test passes on an empty result), in the
same order, with the same boxes and crop boxes; points within 1e-3 pixel (the official generator keeps them
in float32, we in float64); predicted IoU and stability score within SCORE_TOLERANCE; the binary masks equal
but for at most MAX_FLIPPED pixels each (pixels whose logits sit on `mask_threshold`; in practice none) and
the area is that of our mask.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks
from PIL import Image
from skimage import data as skimage_data

from finesam.amg import AutomaticMaskGenerator
from finesam.amg.geometry import point_grid
from finesam.amg.options import GENERATOR_PRESETS, defaults_for
from finesam.cli import build_parser
from finesam.model import SAMConfig, SegmentAnything
from finesam.model.sam import build_sam
from finesam.model.sam2.config import HieraConfig, SAM2DecoderConfig
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.sam_keys import convert_state_dict

from conftest import photo
from official_sam2 import SAM2AutomaticMaskGenerator, SAM2Base, build_official_sam2, small_hiera

MIN_MASKS = 5
SCORE_TOLERANCE = 1e-3
MAX_FLIPPED = 8
# small_hiera()'s changes as our config (the other fields are Hiera-T's)
SMALL = SAMConfig(
    HieraConfig(embed_dim=32, heads=1, stages=(1, 1, 2, 1), global_attention_blocks=(3,)), SAM2DecoderConfig()
)
# Random weights predict IoUs of about 0.45 to 0.56 and logits within a few tenths of 0, masks spread over the
# whole image: thresholds to match, and no box NMS (the boxes are nearly all the whole image). Few points: the
# official decoder is slow on the CPU.
OPTIONS: dict[str, Any] = dict(
    points_per_side=3, pred_iou_thresh=0.4, stability_score_thresh=0.4, stability_score_offset=0.1, box_nms_thresh=1.0
)


@pytest.fixture(scope="module")
def official_sam2() -> SAM2Base:
    return build_official_sam2("sam2.1_hiera_tiny", small_hiera())


@pytest.fixture(scope="module")
def sam2(official_sam2) -> SegmentAnything:
    model = build_sam(SMALL)
    model.load_state_dict(convert_state_dict(official_sam2.state_dict(), model, ignore=is_memory_key))
    return model.eval()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.asarray(photo("astronaut_crop").resize((300, 200), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def hubble() -> np.ndarray:
    """Hubble's deep field (small bright galaxies on black): the one photo where some masks of these weights
    stay clear of the crop edges, so that the crop layer keeps masks of its own."""
    picture = Image.fromarray(skimage_data.hubble_deep_field()).convert("RGB")
    return np.asarray(picture.resize((300, 200), Image.Resampling.LANCZOS))


def assert_same_records(expected: Sequence[Any], actual: Sequence[Any]) -> None:
    assert len(actual) == len(expected) >= MIN_MASKS
    for reference, ours in zip(expected, actual, strict=True):
        assert set(ours) == set(reference)
        assert ours["bbox"] == reference["bbox"]
        assert ours["crop_box"] == reference["crop_box"]
        assert np.allclose(ours["point_coords"], reference["point_coords"], rtol=0, atol=1e-3)
        assert abs(ours["predicted_iou"] - reference["predicted_iou"]) <= SCORE_TOLERANCE
        assert abs(ours["stability_score"] - reference["stability_score"]) <= SCORE_TOLERANCE
        flipped = int((ours["segmentation"] != reference["segmentation"]).sum())
        assert flipped <= MAX_FLIPPED
        assert ours["area"] == int(ours["segmentation"].sum())


@pytest.mark.parametrize(
    "photo_name, options",
    [
        pytest.param("astronaut", {}, id="whole image"),
        # the refined masks are less stable: their own thresholds
        pytest.param(
            "astronaut",
            {"use_m2m": True, "pred_iou_thresh": 0.54, "stability_score_thresh": 0.1},
            id="m2m",
        ),
        pytest.param(
            "hubble",
            {
                "crop_n_layers": 1,
                # 3 x 3 points on the image, in each of the 4 crops 4 points of a 4 x 4 grid (one of them finds
                # a mask clear of the crop edges)
                "points_per_side": None,
                "point_grids": [point_grid(3), point_grid(4)[[0, 6, 9, 15]]],
                "crop_nms_thresh": 1.0,
                "mask_threshold": 0.2,
                "stability_score_thresh": 0.2,
                "stability_score_offset": 0.02,
            },
            id="crops",
        ),
        # SAM 2's generator hands min_mask_region_area to its predictor (holes and sprinkles of the low-res logits)
        pytest.param("astronaut", {"min_mask_region_area": 500}, id="small regions"),
    ],
)
def test_matches_official_sam2_generator(request, official_sam2, sam2, photo_name, options):
    image = request.getfixturevalue(photo_name)
    settings = {**OPTIONS, **options}
    torch.manual_seed(0)
    expected = SAM2AutomaticMaskGenerator(official_sam2, **settings).generate(image)
    actual = AutomaticMaskGenerator(sam2, **settings).generate(image)
    assert_same_records(expected, actual)
    if "crop_n_layers" in options:  # some masks come from the crops, some from the whole image
        assert len({tuple(r["crop_box"]) for r in actual}) > 1
    assert sam2.max_hole_area == sam2.max_sprinkle_area == 0  # the generator's setting lasts for the call
    if "min_mask_region_area" in options:  # it changed the masks
        plain = AutomaticMaskGenerator(sam2, **OPTIONS).generate(image)
        assert [r["area"] for r in plain] != [r["area"] for r in actual]


def test_defaults_follow_the_model(sam2):
    assert AutomaticMaskGenerator(sam2).pred_iou_thresh == 0.8  # SAM2AutomaticMaskGenerator's
    assert AutomaticMaskGenerator(sam2).small_regions == "model"
    assert GENERATOR_PRESETS[SegmentAnything.generator_preset]["pred_iou_thresh"] == 0.88  # SAM 1's
    assert defaults_for(None) == GENERATOR_PRESETS["sam"]
    assert AutomaticMaskGenerator(sam2, pred_iou_thresh=0.5, small_regions="masks").pred_iou_thresh == 0.5
    with pytest.raises(ValueError, match="small_regions"):
        AutomaticMaskGenerator.check_options(small_regions="pixels")


def test_cli_offers_m2m_and_the_model_defaults():
    args = build_parser().parse_args(["everything", "photo.png", "--weights", "w", "--out", "out", "--use-m2m"])
    assert args.use_m2m is True
    assert args.pred_iou_thresh is None  # the model's default
