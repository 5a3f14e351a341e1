"""The SAM 2 image encoder (Hiera trunk, FPN neck, the decoder's high-resolution skips, `no_mem_embed`) against Meta's
sam2 1.1.0 with seeded random weights, converted by the Hiera key map."""

import functools
from typing import Any

import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks

from finesam.model.config import SAMConfig
from finesam.model.sam2.config import SAM2_1_HIERA_BASE_PLUS, SAM2_1_HIERA_TINY, HieraConfig
from finesam.model.sam2.hiera import HIGH_RES_KEYS, HieraEncoder
from finesam.weights.key_map import Rule, apply_rules, rules_for
from finesam.weights.layouts.hiera import hiera_modules, hiera_rules

from official_sam2 import SAM2Base, build_official_sam2, small_hiera

ATOL = 1e-4  # largest absolute difference allowed on every output (float32, CPU)
SIZE = 1024
OUT_DIM = 256

# the official keys the image encoder reads
ENCODER_PREFIXES = ("image_encoder.", "sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1.", "no_mem_embed")

# small_hiera()'s changes as our config (the other fields are Hiera-T's, as in its YAML)
SMALL = HieraConfig(embed_dim=32, heads=1, stages=(1, 1, 2, 1), global_attention_blocks=(3,))


def hiera(preset: SAMConfig) -> HieraConfig:
    assert isinstance(preset.encoder, HieraConfig)
    return preset.encoder


def is_encoder_key(key: str) -> bool:
    return key.startswith(ENCODER_PREFIXES)


def encoder_rules(encoder: HieraEncoder) -> dict[str, Rule]:
    names = {id(module): name for name, module in encoder.named_modules()}
    return rules_for(encoder, hiera_modules(encoder)) | hiera_rules(
        encoder, lambda module, tensor: f"{names[id(module)]}.{tensor}"
    )


@functools.cache
def official(name: str, small: bool) -> SAM2Base:
    return build_official_sam2(name, small_hiera(name) if small else None)


def converted(model: SAM2Base, config: HieraConfig) -> tuple[HieraEncoder, dict[str, Any]]:
    """Ours from the official weights, and the `image` context it writes into."""
    encoder = HieraEncoder(config, SIZE, OUT_DIM)
    rules = encoder_rules(encoder)
    weights = apply_rules(model.state_dict(), rules, encoder.state_dict(), ignore=lambda k: not is_encoder_key(k))
    encoder.load_state_dict(weights)
    features: dict[str, Any] = {}
    encoder.set_context("image", features)
    return encoder.eval(), features


def official_features(model: SAM2Base, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`SAM2ImagePredictor.set_image`'s computation on a batch: image embedding, high_res_s0, high_res_s1."""
    backbone_out = model.forward_image(x)
    _, vision_feats, _, feat_sizes = model._prepare_backbone_features(backbone_out)
    vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    batch = x.shape[0]
    feats = [f.permute(1, 2, 0).reshape(batch, -1, *size) for f, size in zip(vision_feats, feat_sizes, strict=True)]
    return feats[-1], feats[0], feats[1]


def image(batch: int = 1, seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_matches(name: str, small: bool, config: HieraConfig, size: int = SIZE) -> None:
    model = official(name, small)
    encoder, features = converted(model, config)
    x = image(size=size)
    with torch.no_grad():
        expected = official_features(model, x)
        embedding = encoder(x)
    ours = (embedding, features[HIGH_RES_KEYS[0]], features[HIGH_RES_KEYS[1]])
    assert [o.shape for o in ours] == [
        (1, OUT_DIM, size // 16, size // 16),
        (1, OUT_DIM // 8, size // 4, size // 4),
        (1, OUT_DIM // 4, size // 8, size // 8),
    ]
    for label, a, b in zip(("image_embed", *HIGH_RES_KEYS), ours, expected, strict=True):
        assert a.shape == b.shape, label
        difference = (a - b).abs().max().item()
        assert difference <= ATOL, f"{label}: {difference:.2e}"


@pytest.mark.parametrize("size", [SIZE, 224])  # 224: a grid of 7 at stride 32, stage 3's 14-wide window padded
def test_small_hiera_matches_official(size: int) -> None:
    assert_matches("sam2.1_hiera_tiny", True, SMALL, size)


def test_hiera_tiny_matches_official() -> None:
    assert_matches("sam2.1_hiera_tiny", False, hiera(SAM2_1_HIERA_TINY))


@pytest.mark.slow
def test_hiera_base_plus_matches_official() -> None:
    assert_matches("sam2.1_hiera_base_plus", False, hiera(SAM2_1_HIERA_BASE_PLUS))


@pytest.mark.parametrize("small", [True, False], ids=["small", "tiny"])
def test_every_encoder_key_is_used_once(small: bool) -> None:
    model = official("sam2.1_hiera_tiny", small)
    config = SMALL if small else hiera(SAM2_1_HIERA_TINY)
    encoder = HieraEncoder(config, SIZE, OUT_DIM)
    rules = encoder_rules(encoder)
    sources = [source for rule in rules.values() for source in rule.sources]
    assert len(sources) == len(set(sources))
    assert sorted(sources) == sorted(k for k in model.state_dict() if is_encoder_key(k))
    assert sorted(rules) == sorted(encoder.state_dict())


def test_batch_equals_each_image_alone() -> None:
    encoder, features = converted(official("sam2.1_hiera_tiny", True), SMALL)
    x = torch.cat([image(seed=1), image(seed=2)])
    with torch.no_grad():
        batched = (encoder(x), *(features[k] for k in HIGH_RES_KEYS))
        for i in range(2):
            alone = (encoder(x[i : i + 1]), *(features[k] for k in HIGH_RES_KEYS))
            for a, b in zip(alone, batched, strict=True):
                torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=1e-5)
