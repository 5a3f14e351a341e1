"""EdgeSAM test helpers: the fixture's weight recipe (an official-layout state dict, key by key from
`tests/data/edge_sam/keys.json`) and a functional reference of its encoder.

There is no installable EdgeSAM package; the official outputs are stored as data (`tests/data/edge_sam/`). The
functional encoder below is written from the fixture's description of the official computation (plain
`torch.nn.functional` calls on the official keys, nothing shared with finesam's chains): the family checks of
tests/test_families.py run against it at any input, and tests/test_edge_sam.py checks both it and finesam
against the official outputs.
"""

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fixture_recipe import recipe

DATA = Path(__file__).parent / "data" / "edge_sam"
# the fixture README's check value: SHA-256 over every recipe tensor, sorted by key, as little-endian float32
RECIPE_SHA256 = "5cfd1e78232873a9267da87f3415d2f4650e33c9cce0498875876aef35f9d2b0"
BN_EPS = 1e-5
LN_EPS = 1e-6


def keys() -> list[dict]:
    return json.loads((DATA / "keys.json").read_text())


@functools.cache
def _recipe_state_dict() -> dict[str, Tensor]:
    return {e["key"]: torch.from_numpy(recipe(e["key"], tuple(e["shape"]), e["dtype"])) for e in keys()}


def recipe_state_dict() -> dict[str, Tensor]:
    """The official-layout EdgeSAM state dict of the fixture (a fresh dict of shared tensors)."""
    return dict(_recipe_state_dict())


def _conv_bn(sd: dict[str, Tensor], prefix: str, x: Tensor, stride: int = 1, groups: int = 1) -> Tensor:
    weight = sd[f"{prefix}.c.weight"]
    y = F.conv2d(x, weight, None, stride, weight.shape[-1] // 2, 1, groups)
    bn = f"{prefix}.bn"
    return F.batch_norm(
        y, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"], False, 0.0, BN_EPS
    )


def _squeeze_excite(sd: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    s = x.mean((2, 3), keepdim=True)
    s = F.relu(F.conv2d(s, sd[f"{prefix}.fc1.weight"], sd[f"{prefix}.fc1.bias"]))
    return x * torch.sigmoid(F.conv2d(s, sd[f"{prefix}.fc2.weight"], sd[f"{prefix}.fc2.bias"]))


def _layer_norm_2d(sd: dict[str, Tensor], prefix: str, x: Tensor) -> Tensor:
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    x = (x - mean) / torch.sqrt(var + LN_EPS)
    return sd[f"{prefix}.weight"][:, None, None] * x + sd[f"{prefix}.bias"][:, None, None]


@torch.no_grad()
def reference_encoder(sd: dict[str, Tensor], pixels: Tensor) -> tuple[Tensor, Tensor]:
    """EdgeSAM's encoder as the fixture describes it: (embedding (B, 256, S/16, S/16), stage 2's output
    channels-last (B, S/16, S/16, C2), the map HQ-SAM fuses)."""
    p = "image_encoder.features"
    x = _conv_bn(sd, f"{p}.0.2", F.gelu(_conv_bn(sd, f"{p}.0.0", pixels, stride=2)), stride=2)
    num_blocks = max(int(k.split(".")[2]) for k in sd if k.startswith(f"{p}."))
    stage_outputs = []
    for i in range(1, num_blocks + 1):
        b = f"{p}.{i}"
        se = f"{b}.token_mixer.1.fc1.weight" in sd
        if f"{b}.token_mixer.2.c.weight" in sd:  # downsampling block
            stage_outputs.append(x)
            y = _conv_bn(sd, f"{b}.token_mixer.0", x, stride=2, groups=x.shape[1])
            y = _squeeze_excite(sd, f"{b}.token_mixer.1", y) if se else y
            y = _conv_bn(sd, f"{b}.token_mixer.2", y)
        else:
            c = x.shape[1]
            y = _conv_bn(sd, f"{b}.token_mixer.0.conv", x, groups=c) + _conv_bn(
                sd, f"{b}.token_mixer.0.conv1", x, groups=c
            )
            y = y + x
            y = _squeeze_excite(sd, f"{b}.token_mixer.1", y) if se else y
        hidden = F.gelu(_conv_bn(sd, f"{b}.channel_mixer.m.0", y))
        x = y + _conv_bn(sd, f"{b}.channel_mixer.m.2", hidden)
    stage2, stage3 = stage_outputs[-1], x
    low = F.conv2d(stage3, sd["image_encoder.fuse_stage3.op_list.0.weight"])
    fused = F.conv2d(stage2, sd["image_encoder.fuse_stage2.weight"]) + F.interpolate(
        low, scale_factor=2, mode="bicubic", align_corners=False
    )
    x = _layer_norm_2d(sd, "image_encoder.neck.1", F.conv2d(fused, sd["image_encoder.neck.0.weight"]))
    x = _layer_norm_2d(sd, "image_encoder.neck.3", F.conv2d(x, sd["image_encoder.neck.2.weight"], padding=1))
    return x, stage2.permute(0, 2, 3, 1)


# the BatchNorm scales of every residual branch: with the recipe's unit scales each block roughly triples its
# input, so stage 2's map reaches 1e7 (the embedding is normalised by the neck's LayerNorms and stays small)
_RESIDUAL_BRANCH_SCALES = (
    "token_mixer.0.conv.bn.weight",
    "token_mixer.0.conv1.bn.weight",
    "channel_mixer.m.2.bn.weight",
)


def tempered_state_dict(scale: float = 0.3) -> dict[str, Tensor]:
    """The recipe with the residual branches' BatchNorm scales times `scale` (the official initialisation
    zeroes the channel mixer's last one): intermediate maps of order 1, for absolute tolerances on HQ-SAM's
    early embedding (tests/test_families.py)."""
    return {k: v * scale if k.endswith(_RESIDUAL_BRANCH_SCALES) else v for k, v in recipe_state_dict().items()}
