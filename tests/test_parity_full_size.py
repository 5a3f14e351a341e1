"""Full-size ViT-L and ViT-H, SAM and HQ-SAM, end to end against the official predictors (slow: `make test-slow`).

ViT-B runs in the default suite (test_predict.py, test_hq.py). Tolerance: TOLERANCE (1e-4), fp32.
"""

import pytest
import torch

from finesam.adapters.hq import HQSAMAdapter
from finesam.weights.hq import convert_hq_state_dict
from finesam.weights.loading import sam_from_state_dict

from conftest import PHOTOS
from helpers import assert_matches_official_hq_predictor, assert_matches_official_predictor
from official import random_official


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
@torch.no_grad()
def test_full_size_matches_official_predictor(name):
    official = random_official(name, seed=11)
    model = sam_from_state_dict(official.state_dict())
    assert_matches_official_predictor(official, model, PHOTOS["portrait"]())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_l", "vit_h"])
@torch.no_grad()
def test_full_size_hq_matches_official_predictor(name):
    official = random_official(name, seed=13, hq=True)
    model = sam_from_state_dict(official.state_dict())
    adapter = HQSAMAdapter(model)
    adapter.load_state_dict(convert_hq_state_dict(official.state_dict(), adapter))
    adapter.inject()
    for hq_only in (False, True):
        assert_matches_official_hq_predictor(official, model, adapter, PHOTOS["landscape"](), hq_only)
