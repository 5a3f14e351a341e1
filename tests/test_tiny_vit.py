"""TinyViT (MobileSAM, Light HQ-SAM) against `segment_anything_hq` 0.3's `vit_tiny`, full size (1024).

Random weights with BatchNorm statistics perturbed, eval mode. Tolerance: TOLERANCE (1e-4), fp32.
"""

import pytest
import torch

from finesam.adapters.hq import HQSAMAdapter
from finesam.fast import apply_fast_paths
from finesam.model import SAM_VIT_TINY, SegmentAnythingTiny
from finesam.model.sam import SegmentAnything
from finesam.model.tiny_vit import BatchNorm2d, BiasedAttention, Conv2dBN, attention_bias_indices
from finesam.weights import convert_checkpoint, holds_hq, load_hq, load_sam
from finesam.weights.hq import has_hq_keys, hq_from_state_dict, is_hq_key
from finesam.weights.loading import sam_from_state_dict
from finesam.weights.sam_keys import infer_config

from conftest import PHOTOS, TOLERANCE, max_diff
from helpers import assert_matches_official_hq_predictor, assert_matches_official_predictor
from official import SamPredictor, build_official_tiny, mobile_sam_from


def from_official_state_dict(state_dict, fast: bool = True) -> tuple[SegmentAnything, HQSAMAdapter | None]:
    """Our model, and the HQ adapter (not injected) when the checkpoint is an HQ-SAM one; with the fast paths
    (`finesam.fast`) by default, as loading gives them."""
    model = sam_from_state_dict(state_dict)
    adapter = hq_from_state_dict(model, state_dict) if has_hq_keys(state_dict) else None
    if fast:
        apply_fast_paths(model, *(adapter.placed_adapters if adapter is not None else ()))
    return model, adapter


@pytest.fixture(scope="module")
def official_tiny():
    return build_official_tiny(seed=2)


@pytest.fixture(scope="module")
def mobile_sam_state_dict(official_tiny):
    return {k: v for k, v in official_tiny.state_dict().items() if not is_hq_key(k)}


def test_config_is_read_from_both_checkpoint_layouts(official_tiny, mobile_sam_state_dict):
    assert infer_config(official_tiny.state_dict()) == SAM_VIT_TINY
    assert infer_config(mobile_sam_state_dict) == SAM_VIT_TINY
    assert SegmentAnythingTiny(device="meta").config == SAM_VIT_TINY


@torch.no_grad()
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_image_and_early_embeddings_match(official_tiny, fast):
    model, adapter = from_official_state_dict(official_tiny.state_dict(), fast)
    assert adapter is not None
    adapter.inject()
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    embedding, interm = official_tiny.image_encoder(pixels)
    assert max_diff(model.encode(pixels), embedding) <= TOLERANCE
    early = model.image_features()["early_embedding"]
    assert early.shape == (1, 64, 64, 160)
    assert max_diff(early, interm[0]) <= TOLERANCE


def test_mobile_sam_matches_official_predictor(official_tiny, mobile_sam_state_dict):
    model, adapter = from_official_state_dict(mobile_sam_state_dict)
    assert adapter is None
    assert_matches_official_predictor(
        mobile_sam_from(official_tiny), model, PHOTOS["landscape"](), predictor_class=SamPredictor
    )


@pytest.mark.parametrize("hq_only", [False, True])
def test_light_hq_sam_matches_official_predictor(official_tiny, hq_only):
    model, adapter = from_official_state_dict(official_tiny.state_dict())
    assert adapter is not None
    adapter.inject()
    assert_matches_official_hq_predictor(official_tiny, model, adapter, PHOTOS["portrait"](), hq_only)


def test_converting_tiny_checkpoints(tmp_path, official_tiny, mobile_sam_state_dict):
    torch.save(official_tiny.state_dict(), tmp_path / "sam_hq_vit_tiny.pth")
    torch.save(mobile_sam_state_dict, tmp_path / "mobile_sam.pt")
    mobile = convert_checkpoint(tmp_path / "mobile_sam.pt", tmp_path / "out")
    assert mobile.written == [tmp_path / "out" / "mobile_sam.safetensors"]
    heads = [
        "image_encoder.head.bias",
        "image_encoder.head.weight",
        "image_encoder.norm_head.bias",
        "image_encoder.norm_head.weight",
    ]
    assert mobile.dropped == heads and "dropped 4 unused keys" in mobile.summary()
    light = convert_checkpoint(tmp_path / "sam_hq_vit_tiny.pth", tmp_path / "out")
    assert [p.name for p in light.written] == ["sam_hq_vit_tiny.safetensors", "sam_hq_vit_tiny.hq.safetensors"]
    assert light.same_base_as == [tmp_path / "out" / "mobile_sam.safetensors"]  # Light HQ-SAM's base is MobileSAM here
    loaded = load_sam(light.written[0])  # built on meta: the attention-bias index tables are rebuilt
    assert holds_hq(tmp_path / "sam_hq_vit_tiny.pth")
    direct = load_sam(tmp_path / "sam_hq_vit_tiny.pth")
    assert not load_hq(direct, tmp_path / "sam_hq_vit_tiny.pth").injected
    image = PHOTOS["square"]()
    assert torch.equal(
        loaded.predict(image, boxes=[10, 20, 600, 700], return_logits=True).masks,
        direct.predict(image, boxes=[10, 20, 600, 700], return_logits=True).masks,
    )


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("groups", [1, 6])
def test_conv_bn_folds_batchnorm_in_eval_mode_only(training, groups):
    """With the fast paths, in eval mode `Conv2dBN` folds BatchNorm into the convolution: same values and
    gradients as convolution then BatchNorm; in training mode BatchNorm uses batch statistics (and updates its
    running ones) as usual."""
    g = torch.Generator().manual_seed(groups)
    layer = Conv2dBN(6, 12, 3, stride=2, groups=groups).train(training)
    assert apply_fast_paths(layer) == 1
    norm = layer.ensure_find(BatchNorm2d)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        norm.running_mean.copy_(torch.randn(12, generator=g))
        norm.running_var.copy_(torch.rand(12, generator=g) + 0.5)
    reference = torch.nn.Sequential(
        torch.nn.Conv2d(6, 12, 3, 2, 1, groups=groups, bias=False), torch.nn.BatchNorm2d(12)
    )
    reference.load_state_dict({"0.weight": layer.Conv2d.weight, **{f"1.{k}": v for k, v in norm.state_dict().items()}})
    reference.train(training)
    x = torch.randn(2, 6, 15, 15, generator=g).contiguous(memory_format=torch.channels_last)
    actual, expected = layer(x), reference(x)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert max_diff(actual, expected) <= 1e-5 * expected.abs().max().item()
    upstream = torch.randn(expected.shape, generator=g)
    ours = torch.autograd.grad((actual * upstream).sum(), [layer.Conv2d.weight, norm.weight, norm.bias])
    theirs = torch.autograd.grad(
        (expected * upstream).sum(), [reference[0].weight, reference[1].weight, reference[1].bias]
    )
    for grad, grad_reference in zip(ours, theirs, strict=True):
        assert max_diff(grad, grad_reference) <= 1e-4 * grad_reference.abs().max().item()
    assert torch.allclose(norm.running_mean, reference[1].running_mean)  # updated alike in training mode


def test_biased_attention_equals_the_formula_with_gradients_to_the_biases():
    """softmax(q k^T / sqrt(d) + bias[head, offset]) v per window, with gradients to the learned biases (which
    reach the fused attention kernel as a 4-D mask)."""
    g = torch.Generator().manual_seed(0)
    heads, key_dim, window, windows = 2, 8, 3, 4
    attention = BiasedAttention(num_heads=heads, key_dim=key_dim, window=window)
    with torch.no_grad():
        attention.attention_biases.copy_(torch.randn(attention.attention_biases.shape, generator=g) * 2)
    qkv = torch.randn(windows, window * window, heads * 3 * key_dim, generator=g).requires_grad_()
    actual = attention(qkv)
    q, k, v = qkv.double().view(windows, window * window, heads, -1).transpose(1, 2).split(key_dim, dim=3)
    bias = attention.attention_biases.double()[:, attention_bias_indices(window)]
    expected = (torch.softmax(q @ k.mT / key_dim**0.5 + bias, dim=-1) @ v).transpose(1, 2).flatten(2)
    assert max_diff(actual, expected) <= 1e-5
    parameters = [attention.attention_biases, qkv]
    ours = torch.autograd.grad(actual.square().sum(), parameters)
    reference = torch.autograd.grad(expected.square().sum(), parameters)
    for grad, grad_reference in zip(ours, reference, strict=True):
        assert max_diff(grad, grad_reference) <= 1e-4 * grad_reference.abs().max().item()


def test_biased_attention_written_out_in_bfloat16(monkeypatch):
    """In bfloat16 on the CPU the fast attention writes the bias, product and softmax out (`baddbmm`, softmax in
    place): within 3e-2 of the largest output of the formula in float64 on the same bf16 values, like torch's
    attention kernel on the reference layer (tests/test_encoder_attention.py states the same tolerance)."""
    g = torch.Generator().manual_seed(1)
    heads, key_dim, window, windows = 4, 32, 7, 6
    attention = BiasedAttention(num_heads=heads, key_dim=key_dim, window=window).to(dtype=torch.bfloat16)
    with torch.no_grad():
        attention.attention_biases.copy_(torch.randn(attention.attention_biases.shape, generator=g) * 2)
    qkv = torch.randn(windows, window * window, heads * 3 * key_dim, generator=g).bfloat16()
    q, k, v = qkv.double().view(windows, window * window, heads, -1).transpose(1, 2).split(key_dim, dim=3)
    bias = attention.attention_biases.double()[:, attention_bias_indices(window)]
    expected = (torch.softmax(q @ k.mT / key_dim**0.5 + bias, dim=-1) @ v).transpose(1, 2).flatten(2)
    with torch.no_grad():
        reference = attention(qkv)
        assert apply_fast_paths(attention) == 1
        calls: list[int] = []
        written = torch.baddbmm
        monkeypatch.setattr(torch, "baddbmm", lambda *a, **kw: calls.append(1) or written(*a, **kw))
        actual = attention(qkv)
    assert calls and actual.dtype == torch.bfloat16
    for output in (actual, reference):
        assert max_diff(output.double(), expected) <= 3e-2 * expected.abs().max().item()
