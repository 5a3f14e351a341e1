"""EfficientSAM's official weights, as the parity tests need them: EfficientSAM has no installable package, so its
official outputs are stored (`tests/data/efficient_sam_ti/`) for weights that a recipe regenerates key by key.

`recipe` is the weight rule the shared fixture's README states (a per-key seed, the crc32 of the key; a rule per
kind of tensor); `official_state_dict` applies it to the official key list and shapes (`keys.json`), in official
order, and `check_value` is the sha256 the README gives for all of them (sorted by key, little-endian float32).
`official_shaped` makes a `state_dict` of the official layout for any EfficientSAM size (ViT-S's, small test
sizes) from the ViT-Ti key list, the shapes rescaled.
"""

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

DATA = Path(__file__).parent.parent / "tests" / "data" / "efficient_sam_ti"
CHECK_VALUE = "7f8501521f0894a62b222dc81ccdeedd8f27cb5040ac0d3ffce960ee5726675c"


def recipe(key: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The tensor of one official key: seeded by the key's crc32; running statistics, biases, vectors (norm scales)
    and matrices (scaled by 1 / sqrt(fan-in)) each by their own rule."""
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


def official_keys() -> list[dict[str, Any]]:
    """The official ViT-Ti `state_dict` layout: `{"key", "shape", "dtype"}` per tensor, in official order."""
    return json.loads((DATA / "keys.json").read_text())


def official_state_dict() -> dict[str, Tensor]:
    """The ViT-Ti weights of the stored outputs, every key by `recipe`, in official order."""
    return {e["key"]: torch.from_numpy(recipe(e["key"], tuple(e["shape"]), e["dtype"])) for e in official_keys()}


def check_value(state_dict: dict[str, Tensor]) -> str:
    """sha256 over all tensors sorted by key, as contiguous little-endian float32 bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(state_dict[key].contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


def official_shaped(dim: int, depth: int = 12, prompt_dim: int = 256, decoder_depth: int = 2) -> dict[str, Tensor]:
    """A `state_dict` of the official layout for an EfficientSAM of encoder width `dim` (ViT-S: 384), `depth`
    blocks, decoder width `prompt_dim` and `decoder_depth` two-way blocks, by `recipe`: the ViT-Ti key list with
    every width rescaled (ViT-Ti: 192, 256) and the blocks repeated or dropped."""
    scale = {192: dim, 576: 3 * dim, 768: 4 * dim, 256: prompt_dim, 128: prompt_dim // 2, 64: prompt_dim // 4}
    scale |= {32: prompt_dim // 8, 2048: 8 * prompt_dim}
    shaped: dict[str, Tensor] = {}
    for entry in official_keys():
        key, shape = entry["key"], entry["shape"]
        if key.startswith("image_encoder.blocks.0."):
            keys = [key.replace(".blocks.0.", f".blocks.{i}.") for i in range(depth)]
        elif key.startswith("image_encoder.blocks."):
            continue
        elif key.startswith("mask_decoder.transformer.layers.0."):
            keys = [key.replace(".layers.0.", f".layers.{i}.") for i in range(decoder_depth)]
        elif key.startswith("mask_decoder.transformer.layers."):
            continue
        else:
            keys = [key]
        new_shape = tuple(scale.get(s, s) for s in shape)  # each width by its ViT-Ti value
        for k in keys:
            shaped[k] = torch.from_numpy(recipe(k, new_shape, entry["dtype"]))
    return shaped
