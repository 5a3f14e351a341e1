"""Property-based checks (hypothesis): transforms against the official ones for any image size, and every
malformed prompt rejected with a `ValueError` (never another exception, never a silent mask).
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from finesam.inputs import resized_shape, scale_coordinates
from finesam.model import ImageEmbedding
from finesam.model.processing import postprocess_masks

from conftest import SMALL
from official import SamPredictor

SIZES = st.integers(min_value=1, max_value=12000)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@given(height=SIZES, width=SIZES)
@settings(max_examples=300, deadline=None)
def test_resized_shape_is_the_official_one(height, width):
    expected = SamPredictor.__init__.__globals__["ResizeLongestSide"].get_preprocess_shape(height, width, 1024)
    ours = resized_shape(height, width, 1024)
    assert max(ours) == 1024
    # the official transform rounds a side of extreme images down to 0 (and then fails); ours keeps 1 pixel
    assert ours == tuple(max(1, side) for side in expected)


@given(height=SIZES, width=SIZES, data=st.data())
@settings(max_examples=200, deadline=None)
def test_coordinates_are_scaled_as_officially(height, width, data):
    points = data.draw(
        st.lists(st.tuples(st.floats(0, width), st.floats(0, height)), min_size=1, max_size=5).map(np.array)
    )
    transform = SamPredictor.__init__.__globals__["ResizeLongestSide"](1024)
    input_size = resized_shape(height, width, 1024)
    assume(min(transform.get_preprocess_shape(height, width, 1024)) > 0)
    assert np.array_equal(
        scale_coordinates(points, (height, width), input_size), transform.apply_coords(points, (height, width))
    )


@given(height=st.integers(1, 700), width=st.integers(1, 700), seed=st.integers(0, 2**16))
@FAST
def test_mask_resizing_is_the_official_one(official_small, height, width, seed):
    input_size = resized_shape(height, width, SMALL.image_size)
    low_res = torch.randn(
        1, 2, SMALL.mask_input_size, SMALL.mask_input_size, generator=torch.Generator().manual_seed(seed)
    )
    expected = official_small.postprocess_masks(low_res, input_size, (height, width))
    actual = postprocess_masks(low_res, SMALL.image_size, input_size, (height, width))
    assert actual.shape == (1, 2, height, width)
    assert torch.equal(actual, expected)


@pytest.fixture(scope="module")
def embedding(small) -> ImageEmbedding:
    return small.encode_image(Image.new("RGB", (300, 200), (90, 140, 30)))


FINITE = st.floats(0, 200, allow_nan=False)
BAD_NUMBER = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e6])


@st.composite
def malformed_prompts(draw):
    kind = draw(st.sampled_from(["nonfinite point", "bad box", "inverted box", "bad shape", "bad label", "bad mask"]))
    if kind == "nonfinite point":
        point = [draw(FINITE), draw(FINITE)]
        point[draw(st.integers(0, 1))] = draw(BAD_NUMBER)
        return {"points": [point]}
    if kind == "bad box":
        box = [draw(FINITE) for _ in range(4)]
        box[draw(st.integers(0, 3))] = draw(BAD_NUMBER)
        return {"boxes": box}
    if kind == "inverted box":
        x1, x2 = sorted([draw(st.floats(0, 300)), draw(st.floats(0, 300))])
        assume(x1 < x2)
        return {"boxes": [x2, 10.0, x1, 100.0]}
    if kind == "bad shape":
        shape = draw(st.sampled_from([(3,), (2, 3), (1, 2, 2, 2), (0, 2)]))
        return {"points": np.ones(shape)}
    if kind == "bad label":
        return {"points": [[10.0, 10.0]], "labels": [draw(st.sampled_from([2, -1, 0.5, 7]))]}
    side = draw(st.integers(1, 100).filter(lambda s: s != SMALL.mask_input_size))
    return {"boxes": [1, 1, 50, 50], "mask_input": np.zeros((1, side, side))}


@given(prompt=malformed_prompts())
@FAST
def test_malformed_prompts_raise_value_error(small, embedding, prompt):
    with pytest.raises(ValueError):
        small.predict(embedding, **prompt)


@given(
    points=st.lists(st.tuples(st.floats(0, 300), st.floats(0, 200)), min_size=1, max_size=4),
    labels_seed=st.integers(0, 100),
)
@FAST
def test_any_prompt_inside_the_image_gives_masks(small, embedding, points, labels_seed):
    labels = np.random.default_rng(labels_seed).integers(0, 2, len(points))
    prediction = small.predict(embedding, points=points, labels=labels, multimask_output=True)
    assert prediction.masks.shape == (1, 3, 200, 300) and torch.isfinite(prediction.iou_predictions).all()
