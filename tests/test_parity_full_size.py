"""Full-size ViT-L and ViT-H end to end against the official predictor (slow: `make test-slow`).

ViT-B runs in the default suite (test_predict.py). Tolerance: TOLERANCE (1e-4), fp32.
"""

import numpy as np
import pytest
import torch

from finesam.weights import build_from_official
from test_predict import PHOTOS, assert_same_prediction, ours, prompts_for

from conftest import TOLERANCE, max_diff
from official import SamPredictor, random_official


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
@torch.no_grad()
def test_full_size_matches_official_predictor(name):
    official = random_official(name, seed=11)
    model = build_from_official(official.state_dict())
    image = PHOTOS["portrait"]()
    predictor = SamPredictor(official)
    predictor.set_image(np.asarray(image))
    embedding = model.encode_image(image)
    assert max_diff(embedding.embedding, predictor.features) <= TOLERANCE
    for kwargs in prompts_for(image).values():
        for multimask in (True, False):
            expected = predictor.predict(**kwargs, multimask_output=multimask, return_logits=True)
            actual = model.predict(embedding, **ours(kwargs), multimask_output=multimask, return_logits=True)
            assert_same_prediction(expected, actual)
