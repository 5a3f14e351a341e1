"""Shared fixtures: a small configuration, the official model with random weights, and ours converted from it."""

import copy
import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from finesam.model import SAMConfig, SegmentAnything
from finesam.weights import build_from_official

from official import build_official

# Small ViT (so CI stays fast), full-size prompt encoder and decoder. The 16x16 grid with 6x6 windows
# exercises window padding; blocks 1 and 3 are global.
SMALL = SAMConfig(
    image_size=256,
    encoder_dim=64,
    encoder_depth=4,
    encoder_heads=4,
    global_attention_blocks=(1, 3),
    window_size=6,
)

# Max abs difference allowed between official and finesam fp32 outputs (logits, embeddings, IoU).
TOLERANCE = 1e-4

IMAGES = Path(os.environ.get("FINESAM_TEST_IMAGES", Path(__file__).resolve().parents[2] / "shared" / "images"))


def photo(name: str) -> Image.Image:
    """A real photo from the shared test images (never copied into the project)."""
    path = IMAGES / name
    if not path.is_file():
        pytest.skip(f"test image {path} is not available (set FINESAM_TEST_IMAGES)")
    image = Image.open(path)
    image.load()
    return image


@pytest.fixture(scope="session")
def official_small():
    return build_official(SMALL, seed=0)


@pytest.fixture(scope="session")
def small(official_small) -> SegmentAnything:
    return build_from_official(official_small.state_dict())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def inject_after_the_model_moved(model: SegmentAnything, adapter: Any, device_error: str, dtype_warning: str) -> None:
    """The placement check of `adapter.inject()`, for an adapter built before its model moved: on another
    device (meta) it refuses with `device_error` and injects nothing; back on the CPU after the model went to
    bf16 it injects with `dtype_warning`."""
    text, weights = repr(model), copy.deepcopy(adapter.state_dict())
    adapter.to(device="meta")
    with pytest.raises(ValueError, match=device_error):
        adapter.inject()
    assert not adapter.injected and repr(model) == text  # nothing was injected
    adapter.to_empty(device="cpu").load_state_dict(weights)
    model.to(dtype=torch.bfloat16)  # the adapter, built before, stays float32: it runs under autocast only
    with pytest.warns(UserWarning, match=dtype_warning):
        adapter.inject()


def inject_moved_adapter(adapter: Any) -> None:
    """Injects `adapter` (ejected) after moving it to bf16, as the placement messages say: no warning."""
    adapter.eject()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapter.to(dtype=torch.bfloat16).inject()
