"""Shared fixtures and constants: a small configuration, the official model with random weights and ours
converted from it, the test photos. Helpers shared by several test modules are in helpers.py; the official
packages are reached through reference/official.py (on the path through pytest's `pythonpath`)."""

import copy
import functools
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before `official`: its torchvision stand-in confuses transformers' import checks
from PIL import Image
from skimage import data as skimage_data

from finesam.fast import apply_fast_paths
from finesam.model import SAMConfig, SegmentAnything
from finesam.model.config import ViTConfig
from finesam.weights.loading import sam_from_state_dict

from official import HQSamPredictor, build_official, random_official

# Small ViT (so CI stays fast), full-size prompt encoder and decoder. The 16x16 grid with 6x6 windows
# exercises window padding; blocks 1 and 3 are global.
SMALL = SAMConfig(
    encoder=ViTConfig(dim=64, depth=4, heads=4, global_attention_blocks=(1, 3), window_size=6),
    image_size=256,
)

# Max abs difference allowed between official and finesam fp32 outputs (logits, embeddings, IoU).
TOLERANCE = 1e-4

# The predictor-level prompts of the parity tests of SAM 2 and EfficientViT-SAM (`SamPredictor.predict` keywords),
# inside every photo of `PHOTOS` at its tested size.
PREDICTOR_PROMPTS: dict[str, dict[str, Any]] = {
    "click": {"point_coords": np.array([[300.0, 200.0]]), "point_labels": np.array([1])},
    "box": {"box": np.array([100.0, 50.0, 420.0, 300.0])},
    "box and clicks": {
        "box": np.array([100.0, 50.0, 420.0, 300.0]),
        "point_coords": np.array([[300.0, 200.0], [120.0, 80.0]]),
        "point_labels": np.array([1, 0]),
    },
}

# Real photos bundled in the scikit-image wheel (a test dependency: nothing is downloaded), each resized to
# the (width, height) the tests are written for: a large landscape (downscaled even at 1024), a landscape
# below 1024 (upscaled at 1024; rotated, the portrait), and a square of exactly 1024.
_PHOTOS: dict[str, tuple[Callable[[], np.ndarray], tuple[int, int]]] = {
    "coffee": (skimage_data.coffee, (1800, 1200)),  # 600x400, x3
    "chelsea": (skimage_data.chelsea, (800, 534)),  # 451x300
    "astronaut": (skimage_data.astronaut, (1024, 1024)),  # 512x512, x2
    "rocket": (skimage_data.rocket, (800, 534)),  # 640x427, x1.25
    # the middle 512x341 of the astronaut, mirrored: with test_amg's random weights the masks of this one
    # follow enough structure that every generator setting there keeps several (the other photos give 1 to 4)
    "astronaut_crop": (lambda: skimage_data.astronaut()[85:426, ::-1], (800, 534)),
}


@functools.cache
def _photo(name: str) -> Image.Image:
    load, size = _PHOTOS[name]
    return Image.fromarray(np.ascontiguousarray(load())).convert("RGB").resize(size, Image.Resampling.LANCZOS)


def photo(name: str) -> Image.Image:
    """A real photo (RGB) of scikit-image's bundled data, by name (a key of `_PHOTOS`), as a fresh copy. An
    unknown or unreadable photo is an error, never a skip."""
    if name not in _PHOTOS:
        raise KeyError(f"no test photo {name!r} (one of {', '.join(_PHOTOS)})")
    return _photo(name).copy()


# The photos by the shape the tests need.
PHOTOS: dict[str, Callable[[], Image.Image]] = {
    "landscape": lambda: photo("coffee"),  # 1800x1200
    "portrait": lambda: photo("chelsea").transpose(Image.Transpose.ROTATE_90),  # 534x800
    "square": lambda: photo("astronaut"),  # 1024x1024
    "small landscape": lambda: photo("rocket"),  # 800x534
}


@pytest.fixture(scope="session")
def official_small():
    return build_official(SMALL, seed=0)


@pytest.fixture(scope="session")
def small(official_small) -> SegmentAnything:
    return sam_from_state_dict(official_small.state_dict())


@pytest.fixture(scope="session")
def small_export(small, tmp_path_factory) -> dict[str, Any]:
    """`small` exported (`finesam.onnx.export`, single-mask decoder) and saved as safetensors: the same model for
    the `--onnx` commands ("export") and the torch commands ("weights")."""
    from finesam.onnx.export import export
    from finesam.weights import save_sam

    folder = tmp_path_factory.mktemp("small_export")
    export(small, folder / "export")
    return {"export": folder / "export", "weights": save_sam(small, folder / "small.safetensors")}


@pytest.fixture(scope="session", params=["reference", "fast"])
def small_either(request, official_small) -> SegmentAnything:
    """`small` as the reference chains and with the fast paths (`finesam.fast`): for the parity tests, which
    hold both to the official model at the same tolerance."""
    model = sam_from_state_dict(official_small.state_dict())
    if request.param == "fast":
        assert apply_fast_paths(model) > 0
    return model


@pytest.fixture(scope="session")
def official_vit_b_hq_square():
    """A full-size official HQ-SAM ViT-B (random weights) and its predictor with the square photo set: the one
    official ViT-B HQ encoding that the torch and ONNX parity tests share."""
    official = random_official("vit_b", seed=5, hq=True)
    predictor = HQSamPredictor(official)
    predictor.set_image(np.asarray(PHOTOS["square"]()))
    return official, predictor


ModelSnapshot = tuple[str, dict[str, torch.Tensor]]  # the structure (repr) and a copy of every tensor


def model_snapshot(model: torch.nn.Module) -> ModelSnapshot:
    """The model's structure and weights, to check that an adapter or a fast path ejects bit-exactly."""
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_model_unchanged(model: torch.nn.Module, before: ModelSnapshot) -> None:
    """The same structure and the same keys, in the same order, with bit-identical tensors as `before`."""
    text, state = before
    assert repr(model) == text
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


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
