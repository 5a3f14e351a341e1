"""EfficientSAM's official weights, as the parity tests need them: EfficientSAM has no installable package, so its
official outputs are stored (`tests/data/efficient_sam_ti/`) for weights that a recipe regenerates key by key.

`recipe` is the weight rule the shared fixture's README states (a per-key seed, the crc32 of the key; a rule per
kind of tensor); `official_state_dict` applies it to the official key list and shapes (`keys.json`), in official
order, and `fixture_recipe.recipe_sha256` is the sha256 the README gives for all of them (sorted by key,
little-endian float32). The recipe and the check are `fixture_recipe`'s, shared with EdgeSAM's fixture.
`official_shaped` makes a `state_dict` of the official layout for any EfficientSAM size (ViT-S's, small test
sizes) from the ViT-Ti key list, the shapes rescaled.
"""

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fixture_recipe import recipe

DATA = Path(__file__).parent.parent / "tests" / "data" / "efficient_sam_ti"
CHECK_VALUE = "7f8501521f0894a62b222dc81ccdeedd8f27cb5040ac0d3ffce960ee5726675c"


def official_keys() -> list[dict[str, Any]]:
    """The official ViT-Ti `state_dict` layout: `{"key", "shape", "dtype"}` per tensor, in official order."""
    return json.loads((DATA / "keys.json").read_text())


def official_state_dict() -> dict[str, Tensor]:
    """The ViT-Ti weights of the stored outputs, every key by `recipe`, in official order."""
    return {e["key"]: torch.from_numpy(recipe(e["key"], tuple(e["shape"]), e["dtype"])) for e in official_keys()}


def official_shaped(dim: int, depth: int = 12, prompt_dim: int = 256, decoder_depth: int = 2) -> dict[str, Tensor]:
    """A `state_dict` of the official layout for an EfficientSAM of encoder width `dim` (ViT-S: 384), `depth`
    blocks, decoder width `prompt_dim` and `decoder_depth` two-way blocks, by `recipe`: the ViT-Ti key list with
    every width rescaled (ViT-Ti: 192, 256) and the blocks repeated or dropped."""
    scale: dict[int, int] = {
        192: dim,
        576: 3 * dim,
        768: 4 * dim,
        256: prompt_dim,
        128: prompt_dim // 2,
        64: prompt_dim // 4,
    }
    scale |= {32: prompt_dim // 8, 2048: 8 * prompt_dim}
    shaped: dict[str, Tensor] = {}
    for entry in official_keys():
        key, shape = str(entry["key"]), [int(s) for s in entry["shape"]]
        if key.startswith("image_encoder.blocks.0."):
            keys = [key.replace(".blocks.0.", f".blocks.{i}.") for i in range(depth)]
        elif key.startswith("image_encoder.blocks."):
            continue
        elif key.startswith("mask_decoder.transformer.layers.0."):
            keys = [key.replace(".transformer.layers.0.", f".transformer.layers.{i}.", 1) for i in range(decoder_depth)]
        elif key.startswith("mask_decoder.transformer.layers."):
            continue
        else:
            keys = [key]
        new_shape = tuple(scale.get(s, s) for s in shape)  # each width by its ViT-Ti value
        for k in keys:
            shaped[k] = torch.from_numpy(recipe(k, new_shape, entry["dtype"]))
    return shaped


def reference_encoder(state_dict: dict[str, Tensor], heads: int) -> Any:
    """EfficientSAM's image encoder as a plain function of the official weights, written from the paper's ViT and
    the official code's facts (tests hold it equal to the stored official embedding): pixels (B, 3, S, S) ->
    (image embedding, the output of block 2 channels-last), for `tests/test_families.py`."""

    def encode(pixels: Tensor) -> tuple[Tensor, Tensor]:
        w = state_dict
        x = F.conv2d(pixels, w["image_encoder.patch_embed.proj.weight"], w["image_encoder.patch_embed.proj.bias"], 16)
        x = x.permute(0, 2, 3, 1)
        batch, height, width, dim = x.shape
        table = w["image_encoder.pos_embed"][:, 1:]
        side = math.isqrt(table.shape[1])
        table = table.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        x = x + F.interpolate(table, (height, width), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        x = x.reshape(batch, height * width, dim)
        depth = 1 + max(int(k.split(".")[2]) for k in w if k.startswith("image_encoder.blocks."))
        early = x
        for i in range(depth):
            p = f"image_encoder.blocks.{i}."
            y = F.layer_norm(x, (dim,), w[p + "norm1.weight"], w[p + "norm1.bias"], 1e-6)
            q, k, v = (
                F.linear(y, w[p + "attn.qkv.weight"], w[p + "attn.qkv.bias"])
                .reshape(batch, -1, 3, heads, dim // heads)
                .permute(2, 0, 3, 1, 4)
            )
            y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, dim)  # softmax(qk/sqrt(d))v
            x = x + F.linear(y, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
            y = F.layer_norm(x, (dim,), w[p + "norm2.weight"], w[p + "norm2.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])), w[p + "mlp.fc2.weight"])
            x = x + y + w[p + "mlp.fc2.bias"]
            if i == 2:
                early = x.reshape(batch, height, width, dim)

        def norm2d(t: Tensor, key: str) -> Tensor:
            mean = t.mean(1, keepdim=True)
            variance = (t - mean).pow(2).mean(1, keepdim=True)
            t = (t - mean) / torch.sqrt(variance + 1e-6)
            return w[key + ".weight"][:, None, None] * t + w[key + ".bias"][:, None, None]

        grid = x.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
        grid = norm2d(F.conv2d(grid, w["image_encoder.neck.0.weight"]), "image_encoder.neck.1")
        grid = norm2d(F.conv2d(grid, w["image_encoder.neck.2.weight"], padding=1), "image_encoder.neck.3")
        return grid, early

    return encode
