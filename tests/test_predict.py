"""End-to-end parity of `SegmentAnything.predict` with the official `SamPredictor` on real photos.

Pre- and postprocessing are compared exactly (resized pixels, coordinates) and the outputs within
TOLERANCE (1e-4, fp32): full-resolution logits, IoU predictions and low-resolution logits.
"""

import numpy as np
import pytest
import torch

from finesam.fast import apply_fast_paths
from finesam.inputs import scale_coordinates
from finesam.model import SAM_VIT_B, SegmentAnything
from finesam.model.processing import preprocess_image
from finesam.weights.loading import sam_from_state_dict

from conftest import PHOTOS, SMALL, TOLERANCE, max_diff
from helpers import assert_matches_official_predictor, assert_same_prediction, ours, prompts_for
from official import SamPredictor, build_official


@pytest.fixture
def small(small_either):
    """Every test here runs on the reference chains and on the fast paths (`conftest.small_either`)."""
    return small_either


@pytest.mark.parametrize("name", list(PHOTOS))
def test_preprocessing_is_identical(official_small, name):
    image = PHOTOS[name]()
    predictor = SamPredictor(official_small)
    resized = predictor.transform.apply_image(np.asarray(image))
    expected = official_small.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None])
    actual, input_size = preprocess_image(image, SMALL.image_size)
    assert input_size == resized.shape[:2]
    assert torch.equal(actual, expected)
    coords = np.array([[0.0, 0.0], [image.width, image.height], [13.7, 91.2]])
    expected_coords = predictor.transform.apply_coords(coords, (image.height, image.width))
    assert np.array_equal(scale_coordinates(coords, (image.height, image.width), input_size), expected_coords)


@pytest.mark.parametrize("name", list(PHOTOS))
@pytest.mark.parametrize("multimask", [True, False])
def test_predict_matches_official_predictor(official_small, small, name, multimask):
    image = PHOTOS[name]()
    assert_matches_official_predictor(official_small, small, image, multimasks=(multimask,))
    embedding = small.encode_image(image)
    for kwargs in prompts_for(image).values():
        logits = small.predict(embedding, **ours(kwargs), multimask_output=multimask, return_logits=True).masks
        binary = small.predict(embedding, **ours(kwargs), multimask_output=multimask).masks
        assert binary.dtype == torch.bool
        assert torch.equal(binary, logits > 0)


def test_mask_input_refinement_matches(official_small, small):
    """Feeding the low-resolution logits back as `mask_input`, as in the official notebooks."""
    image = PHOTOS["landscape"]()
    predictor = SamPredictor(official_small)
    predictor.set_image(np.asarray(image))
    points, labels = np.array([[900.0, 600.0]]), np.array([1])
    _, scores, low_res = predictor.predict(point_coords=points, point_labels=labels, multimask_output=True)
    refined = predictor.predict(
        point_coords=points,
        point_labels=labels,
        mask_input=low_res[None, scores.argmax()],
        return_logits=True,
        multimask_output=False,
    )
    first = small.predict(image, points=points, labels=labels, multimask_output=True)
    second = small.predict(
        image,
        points=points,
        labels=labels,
        mask_input=first.low_res_logits[:, first.iou_predictions.argmax()],
        return_logits=True,
    )
    assert_same_prediction(refined, second)


def test_batched_boxes_equal_one_by_one(official_small, small):
    image = PHOTOS["small landscape"]()
    boxes = np.array([[10, 20, 300, 400], [200, 100, 700, 500], [0, 0, 800, 534]], dtype=np.float64)
    embedding = small.encode_image(image)
    batched = small.predict(embedding, boxes=boxes, return_logits=True)
    predictor = SamPredictor(official_small)
    predictor.set_image(np.asarray(image))
    for i, box in enumerate(boxes):
        single = small.predict(embedding, boxes=box, return_logits=True)
        assert max_diff(batched.masks[i], single.masks[0]) <= TOLERANCE
        assert_same_prediction(predictor.predict(box=box, multimask_output=False, return_logits=True), single)


def test_batched_point_sets_equal_one_by_one(small):
    image = PHOTOS["portrait"]()
    points = np.array([[[100, 200], [300, 400]], [[50, 60], [500, 700]]], dtype=np.float64)
    labels = np.array([[1, 0], [1, 1]])
    batched = small.predict(image, points=points, labels=labels, multimask_output=True, return_logits=True)
    for i in range(2):
        single = small.predict(image, points=points[i], labels=labels[i], multimask_output=True, return_logits=True)
        assert max_diff(batched.masks[i], single.masks[0]) <= TOLERANCE


def test_cached_embedding_gives_the_same_masks_as_the_image(small):
    image = PHOTOS["square"]()
    box = [100, 100, 700, 800]
    assert torch.equal(small.predict(image, boxes=box).masks, small.predict(small.encode_image(image), boxes=box).masks)


def test_full_size_vit_b_matches_official_at_1024():
    """The full ViT-B encoder (windowed + global blocks, 64x64 grid) end to end on a real photo, with the fast
    paths as `load_sam` gives them (global attention in chunks, windows with positions as channels)."""
    official = build_official(SAM_VIT_B, seed=3)
    model: SegmentAnything = sam_from_state_dict(official.state_dict())
    apply_fast_paths(model)
    assert_matches_official_predictor(official, model, PHOTOS["landscape"](), multimasks=(True,))
