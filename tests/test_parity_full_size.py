"""Full-size ViT-L and ViT-H end to end against the official predictor (slow: `make test-slow`).

ViT-B runs in the default suite (test_predict.py). Tolerance: TOLERANCE (1e-4), fp32.
"""

import pytest
import torch

from finesam.weights import build_from_official

from official import random_official
from test_predict import PHOTOS, assert_matches_official_predictor


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
@torch.no_grad()
def test_full_size_matches_official_predictor(name):
    official = random_official(name, seed=11)
    model = build_from_official(official.state_dict())
    assert_matches_official_predictor(official, model, PHOTOS["portrait"]())
