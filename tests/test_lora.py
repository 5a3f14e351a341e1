"""LoRA on SAM: the math (LoRA == merged weights), stacking with HQ in either order, exact eject, files.

Tolerance: a LoRA'd model equals the base model with merged weights (W + scale * up @ down) within 1e-5 max abs
in fp32 (the two compute the same sum in a different order). "Unchanged" / "bit-identical" use `torch.equal`.
"""

import copy
import dataclasses
import json

import pytest
import torch

from finesam.adapters.hq import HQSAMAdapter
from finesam.adapters.lora import TARGETS, SAMLoraAdapter, base_linears, select_linears
from finesam.model import SegmentAnything
from finesam.model.config import DecoderConfig
from finesam.model.prompts import Prompts
from finesam.weights import CheckpointError, load_lora, save_lora, save_sam
from finesam.weights.hq import convert_hq_state_dict
from finesam.weights.io import read_safetensors
from finesam.weights.loading import sam_from_state_dict
from finesam.weights.lora import read_lora_metadata

from conftest import SMALL, inject_after_the_model_moved, inject_moved_adapter, max_diff
from official import build_official

MERGED_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def official_hq():
    return build_official(SMALL, seed=3, hq=True)


@pytest.fixture
def model(official_hq) -> SegmentAnything:
    return sam_from_state_dict(official_hq.state_dict())


def hq_adapter(model: SegmentAnything, official_hq) -> HQSAMAdapter:
    adapter = HQSAMAdapter(model)
    adapter.load_state_dict(convert_hq_state_dict(official_hq.state_dict(), adapter))
    return adapter


@torch.no_grad()
def outputs(model: SegmentAnything) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, SMALL.image_size, SMALL.image_size, generator=g)
    boxes = torch.tensor([[30.0, 40.0, 200.0, 180.0], [5.0, 5.0, 90.0, 250.0]])
    points = torch.tensor([[[100.0, 120.0], [20.0, 200.0]]] * 2)
    labels = torch.tensor([[1, 0], [1, 1]])
    embedding = model.encode(pixels)
    logits, iou = model.decode(embedding, Prompts(points=points, labels=labels, boxes=boxes), multimask_output=True)
    return embedding, logits, iou


def randomise(adapter: SAMLoraAdapter, seed: int) -> None:
    """Non-zero up projections (a fresh LoRA is zero) so that every LoRA weight matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in adapter.loras:
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=g) * 0.05)


def merged(model: SegmentAnything, *adapters: SAMLoraAdapter) -> SegmentAnything:
    """A copy of the base (no LoRA injected) with each LoRA folded into the weights it adapts."""
    copy_ = copy.deepcopy(model)
    layers = {linear.path: linear.layer for linear in base_linears(copy_)}
    with torch.no_grad():
        for adapter in adapters:
            for path, lora in zip(adapter.paths, adapter.loras, strict=True):
                layers[path].weight += adapter.scale * lora.up.weight @ lora.down.weight
    return copy_


def assert_same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], tolerance: float = 0.0) -> None:
    for x, y in zip(a, b, strict=True):
        if tolerance == 0.0:
            assert torch.equal(x, y)
        else:
            assert max_diff(x, y) <= tolerance


def snapshot(model: SegmentAnything) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_restored(model: SegmentAnything, before: tuple[str, dict[str, torch.Tensor]], out) -> None:
    text, state = before
    assert repr(model) == text
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert_same(outputs(model), out)


def test_default_targets_are_the_decoder_transformer(model):
    linears = select_linears(model)
    # 2 two-way blocks x (3 attentions x 4 projections + 2 MLP layers) + the final token-to-image attention
    assert len(linears) == 2 * (3 * 4 + 2) + 4
    assert all(p.startswith("MaskDecoder.TwoWayTransformer.") for p in (lin.path for lin in linears))
    # ViT: qkv + output projection in every block
    assert len(select_linears(model, TARGETS["encoder_attention"])) == 2 * SMALL.encoder.depth
    excluded = select_linears(model, TARGETS["decoder"], exclude=("TokenFeedForward",))
    assert len(excluded) == len(linears) - 2 * 2


def test_zero_initialised_lora_leaves_outputs_unchanged(model):
    before = outputs(model)
    adapter = SAMLoraAdapter(model, rank=4, include=TARGETS["decoder"] + TARGETS["encoder_attention"]).inject()
    assert any(lora.down.weight.abs().sum() > 0 for lora in adapter.loras)
    assert_same(outputs(model), before)


@pytest.mark.parametrize("targets", ["decoder", "encoder_attention", "decoder_all"])
def test_lora_equals_merged_weights(model, targets):
    adapter = SAMLoraAdapter(model, rank=4, scale=0.7, include=TARGETS[targets])
    randomise(adapter, seed=1)
    reference = outputs(merged(model, adapter))
    base = outputs(model)
    adapter.inject()
    ours = outputs(model)
    assert_same(ours, reference, MERGED_TOLERANCE)
    assert max_diff(ours[1], base[1]) > 1e-3  # the LoRA does change the masks


def test_two_named_loras_with_their_own_scales(model):
    first = SAMLoraAdapter(model, name="style", rank=2, scale=0.5)
    second = SAMLoraAdapter(model, name="domain", rank=8, scale=1.5, include=TARGETS["decoder_all"])
    randomise(first, seed=2)
    randomise(second, seed=3)
    reference = outputs(merged(model, first, second))
    second.scale = 0.25
    reference_rescaled = outputs(merged(model, first, second))
    second.scale = 1.5
    first.inject()
    second.inject()
    assert_same(outputs(model), reference, MERGED_TOLERANCE)
    second.scale = 0.25  # while injected
    assert_same(outputs(model), reference_rescaled, MERGED_TOLERANCE)
    with pytest.raises(ValueError, match="already injected"):
        SAMLoraAdapter(model, name="style").inject()


@pytest.mark.parametrize("order", ["hq then lora", "lora then hq"])
@pytest.mark.parametrize("eject_order", ["lifo", "fifo"])
def test_stacks_with_hq_and_ejects_exactly(model, official_hq, order, eject_order):
    before, base_out = snapshot(model), outputs(model)
    hq = hq_adapter(model, official_hq)
    lora = SAMLoraAdapter(model, rank=4, include=TARGETS["decoder_all"])
    randomise(lora, seed=4)
    # reference: HQ on a copy whose weights have the LoRA merged in
    reference_model = merged(model, lora)
    reference_hq = hq_adapter(reference_model, official_hq).inject()
    reference = outputs(reference_model)
    reference_hq.eject()

    first, second = (hq, lora) if order == "hq then lora" else (lora, hq)
    first.inject()
    second.inject()
    assert_same(outputs(model), reference, MERGED_TOLERANCE)
    for adapter in (second, first) if eject_order == "lifo" else (first, second):
        adapter.eject()
    assert_restored(model, before, base_out)
    # and again, the same adapters
    hq.inject()
    lora.inject()
    assert_same(outputs(model), reference, MERGED_TOLERANCE)
    lora.eject()
    hq.eject()
    assert_restored(model, before, base_out)


def test_lora_paths_do_not_depend_on_other_adapters(model, official_hq):
    plain = [linear.path for linear in base_linears(model)]
    hq = hq_adapter(model, official_hq).inject()
    other = SAMLoraAdapter(model, name="other", include=TARGETS["decoder_all"]).inject()
    assert [linear.path for linear in base_linears(model)] == plain  # no HQ or LoRA layer listed, same names
    other.eject()
    hq.eject()


def test_save_and_load(model, official_hq, tmp_path):
    adapter = SAMLoraAdapter(model, name="wires", rank=3, scale=0.8, exclude=("TokenFeedForward",))
    randomise(adapter, seed=5)
    hq = hq_adapter(model, official_hq).inject()  # saved while HQ is injected, loaded without it
    adapter.inject()
    file = save_lora(adapter, tmp_path / "wires.lora.safetensors")
    expected = outputs(model)
    adapter.eject()
    hq.eject()

    info = read_lora_metadata(file)
    assert info == {
        "name": "wires",
        "rank": 3,
        "scale": 0.8,
        "include": list(TARGETS["decoder"]),  # the two-way transformer of every model class
        "exclude": ["TokenFeedForward"],
    }
    tensors, metadata = read_safetensors(file)
    assert len(tensors) == 2 * len(adapter.paths)
    assert json.loads(metadata["finesam.config"])["prompt_dim"] == SMALL.decoder.prompt_dim

    fresh = sam_from_state_dict(official_hq.state_dict())
    loaded = load_lora(fresh, file)
    assert (loaded.name, loaded.rank, loaded.scale, loaded.paths) == ("wires", 3, 0.8, adapter.paths)
    loaded.inject()
    hq_adapter(fresh, official_hq).inject()
    assert_same(outputs(fresh), expected)
    assert load_lora(sam_from_state_dict(official_hq.state_dict()), file, name="x", scale=2.0).scale == 2.0


def test_bad_lora_files_and_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        SAMLoraAdapter(model, rank=0)
    with pytest.raises(ValueError, match="no linear layer"):
        SAMLoraAdapter(model, include=("NoSuchLayer",))
    with pytest.raises(ValueError, match="LoRA targets not found in this model"):
        SAMLoraAdapter(model, paths=["MaskDecoder.Nothing.Linear"])
    file = save_lora(SAMLoraAdapter(model, rank=2), tmp_path / "a.safetensors")
    # same layers, other widths
    other = SegmentAnything(dataclasses.replace(SMALL, decoder=DecoderConfig(prompt_dim=128, mlp_dim=256)))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_lora(other, file)
    with pytest.raises(CheckpointError, match="not a finesam LoRA file"):
        read_lora_metadata(save_sam(model, tmp_path / "base.safetensors"))


def test_lora_built_before_the_model_moved_says_how_to_fix_it(model):
    adapter = SAMLoraAdapter(model)
    inject_after_the_model_moved(
        model,
        adapter,
        r"weights of LoRA 'lora' are torch.float32 on meta but the layer MaskDecoder",
        r"float32 on cpu but the layer .* is torch.bfloat16 on cpu: move the adapter",
    )
    inject_moved_adapter(adapter)
    assert outputs(model)[1].dtype == torch.bfloat16


def test_only_lora_weights_train(model):
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = SAMLoraAdapter(model, rank=4).inject()
    embedding = model.encode(torch.randn(1, 3, SMALL.image_size, SMALL.image_size))
    logits, _ = model.decode(embedding, Prompts(boxes=torch.tensor([[10.0, 10.0, 100.0, 100.0]])))
    logits.sum().backward()
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in adapter.parameters()}
    assert all(p.grad is not None for p in adapter.parameters())
    adapter.eject()
    assert all(p.grad is None for p in model.parameters())
