"""The weight recipe of the stored-output fixtures (`tests/data/efficient_sam_ti/`, `tests/data/edge_sam/`): the
families without an installable package have their official outputs stored for weights that this recipe
regenerates key by key, as their READMEs state it, and checked by the README's SHA-256."""

import hashlib
import zlib

import numpy as np
from torch import Tensor


def recipe(key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The tensor of one official key: seeded by the key's crc32; running statistics, biases, vectors (norm scales)
    and matrices (scaled by 1 / sqrt(fan-in)) each by their own rule; integer tensors are zeros."""
    if not dtype.startswith("float"):
        return np.zeros(shape, dtype=dtype)
    rng = np.random.RandomState(zlib.crc32(key.encode("utf-8")))
    if key.endswith("running_var"):
        values = 0.5 + rng.random_sample(shape)
    elif key.endswith("running_mean"):
        values = 0.1 * rng.standard_normal(shape)
    elif key.endswith(".bias"):
        values = 0.02 * rng.standard_normal(shape)
    elif len(shape) <= 1:
        values = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
        values = rng.standard_normal(shape) / np.sqrt(int(np.prod(shape[1:])))
    return values.astype(np.float32)


def recipe_sha256(state_dict: dict[str, Tensor]) -> str:
    """The READMEs' check value: sha256 over all tensors sorted by key, as contiguous little-endian float32."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(state_dict[key].contiguous().float().numpy().astype("<f4").tobytes())
    return digest.hexdigest()
