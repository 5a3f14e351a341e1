"""The fast swap (`finesam.fast`): it changes no structure, key or weight, is undone exactly, leaves other
classes (adapters, variants) alone, composes with HQ-SAM and LoRA in any order, and gives the reference's
outputs. Each fast layer's formula is tested against its reference in the module of that layer
(test_decoder_attention, test_decoder_cache, test_encoder_attention, test_hq, test_parity_model, test_tiny_vit).

Tolerance: 1e-5 max abs on decoder logits between the fast paths and the reference chains (float32 rounding of
reassociated products); "exactly" means `torch.equal` and equal `repr`s.
"""

import pytest
import torch
from refiners.fluxion import layers as fl

from finesam.adapters.lora import SAMLoraAdapter
from finesam.fast import apply_fast_paths, has_fast_paths, reference_paths, remove_fast_paths
from finesam.fast import layers as fast_layers
from finesam.fast import vit as fast_vit
from finesam.fast.decoder import RememberedProjection
from finesam.fast.swap import fast_version_of, is_fast, restore, swap
from finesam.model.image_encoder import RelativePositionAttention
from finesam.model.prompts import Prompts
from finesam.weights import load_hq, load_sam, save_hq, save_sam
from finesam.weights.loading import sam_from_state_dict

from conftest import SMALL, max_diff, photo
from helpers import with_adapter
from official import build_official

BOXES = Prompts(boxes=torch.tensor([[20.0, 30.0, 200.0, 180.0], [60.0, 10.0, 250.0, 240.0], [0.0, 0.0, 90.0, 90.0]]))


@pytest.fixture(scope="module")
def official_hq():
    return build_official(SMALL, seed=11, hq=True)


def snapshot(model: torch.nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: tuple[str, dict[str, torch.Tensor]]) -> None:
    text, state = before
    assert repr(model) == text
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)


def forget_memories(model) -> None:
    """Drops what the fast paths remembered for the image (keys that other layers write stay)."""
    image = model.use_context("image")
    for key in [k for k, v in image.items() if isinstance(v, RememberedProjection)]:
        del image[key]


def decode(model, embedding, prompts=BOXES, multimask=False):
    with torch.no_grad():
        return model.decode(embedding, prompts, multimask_output=multimask)


def test_swap_keeps_keys_weights_and_is_undone_exactly(official_hq):
    model, adapter = with_adapter(official_hq)
    adapter.inject()
    embedding = model.encode_image(photo("rocket"))
    reference = decode(model, embedding.embedding, multimask=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = snapshot(model)
    swapped = apply_fast_paths(model)
    assert swapped > 0 and has_fast_paths(model)
    assert apply_fast_paths(model) == 0  # once is enough
    now = model.state_dict()
    assert list(now) == list(state) and all(torch.equal(now[k], state[k]) for k in state)  # keys and weights
    fast = decode(model, model.encode_image(photo("rocket")).embedding, multimask=True)
    for f, r in zip(fast, reference, strict=True):
        assert max_diff(f, r) <= 1e-5 and not torch.equal(f, r)  # the same values, by another computation
    assert remove_fast_paths(model) == swapped and not has_fast_paths(model)
    assert_unchanged(model, before)  # no attribute of the swap is left
    forget_memories(model)  # memories of the fast run: the reference runs without them
    again = decode(model, model.encode_image(photo("rocket")).embedding, multimask=True)
    assert all(torch.equal(a, r) for a, r in zip(again, reference, strict=True))


def test_reference_paths_restore_the_fast_layers_with_their_settings(official_hq):
    model, _ = with_adapter(official_hq, fast=True)
    attention = next(m for m in model.modules() if isinstance(m, RelativePositionAttention))
    assert type(attention) is fast_vit.RelativePositionAttention
    attention.chunk_bytes = 12345
    fast_layers = {id(m) for m in model.modules() if is_fast(m)}
    with reference_paths(model):
        assert not has_fast_paths(model) and "chunk_bytes" not in vars(attention)
    assert {id(m) for m in model.modules() if is_fast(m)} == fast_layers and attention.chunk_bytes == 12345


def test_lora_and_hq_on_fast_paths_in_any_order_and_ejected_exactly(official_hq):
    model, adapter = with_adapter(official_hq)
    base = snapshot(model)
    keys = list(model.state_dict())
    apply_fast_paths(model)
    fast_base = snapshot(model)
    lora = SAMLoraAdapter(model, "decoder", rank=2)
    for parameter in lora.parameters():
        torch.nn.init.normal_(parameter, std=0.2, generator=torch.Generator().manual_seed(1))
    lora.inject()
    adapter.inject()
    apply_fast_paths(model)  # the HQ head, injected after the first swap
    embedding = model.encode_image(photo("chelsea"))
    fast = decode(model, embedding.embedding)
    with reference_paths(model):
        forget_memories(model)
        reference = decode(model, model.encode_image(photo("chelsea")).embedding)
    assert all(max_diff(f, r) <= 1e-5 for f, r in zip(fast, reference, strict=True))
    lora.eject()
    adapter.eject()
    assert_unchanged(model, fast_base)
    remove_fast_paths(model)
    assert_unchanged(model, base)
    assert list(model.state_dict()) == keys


def test_other_classes_are_left_alone():
    class Variant(RelativePositionAttention):
        """A researcher's variant: runs as written."""

    variant = Variant(32, 4, 7)
    chain = fl.Chain(fl.Linear(4, 4), fl.GeLU(), fl.Chain(fl.Identity(), fl.GeLU()), variant)
    apply_fast_paths(chain)
    assert type(variant) is Variant
    first, second = chain[1], chain[2][1]
    # a GELU may overwrite its input only where the layer before it made that input for it alone
    assert is_fast(first) and is_fast(second) and first.in_place and not second.in_place


def test_swap_refuses_what_it_cannot_do():
    with pytest.raises(TypeError, match="has no fast version"):
        swap(fl.ReLU(), fast_layers.GeLU, in_place=False)
    with pytest.raises(TypeError, match="must subclass"):

        @fast_version_of(fl.GeLU)
        class Wrong(fl.ReLU):  # pyright: ignore[reportUnusedClass]
            pass

    gelu = fl.GeLU()
    assert swap(gelu, fast_layers.GeLU, in_place=True) and not swap(gelu, fast_layers.GeLU, in_place=False)
    assert type(gelu).__name__ == "GeLU" and gelu.in_place  # the name refiners keys children by
    assert restore(gelu) and type(gelu) is fl.GeLU and "in_place" not in vars(gelu) and not restore(gelu)


def test_loading_applies_the_fast_paths_unless_asked_not_to(official_hq, tmp_path):
    model, adapter = with_adapter(official_hq)
    save_sam(model, tmp_path / "sam.safetensors")
    save_hq(adapter, tmp_path / "sam.hq.safetensors")
    loaded = load_sam(tmp_path / "sam.safetensors")
    assert has_fast_paths(loaded)
    hq = load_hq(loaded, tmp_path / "sam.hq.safetensors")  # follows its model
    assert any(has_fast_paths(placed) for placed in hq.placed_adapters)
    plain = load_sam(tmp_path / "sam.safetensors", fast=False)
    assert not has_fast_paths(plain)
    assert not any(has_fast_paths(placed) for placed in load_hq(plain, tmp_path / "sam.hq.safetensors").placed_adapters)


def test_training_sees_the_reference_formula(official_hq):
    """With gradients every fast layer computes its reference formula: the same values as the reference chains
    with gradients, bit for bit, and gradients for every trainable weight."""
    reference = sam_from_state_dict(official_hq.state_dict())
    fast = sam_from_state_dict(official_hq.state_dict())
    apply_fast_paths(fast)
    pixels = torch.randn(1, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(2))
    outputs = []
    for model in (reference, fast):
        model.set_prompt(BOXES)
        masks, _ = model(pixels)
        masks.sum().backward()
        outputs.append(masks)
    assert torch.equal(outputs[0], outputs[1])
    trained = 0
    for (name, a), (_, b) in zip(reference.named_parameters(), fast.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name  # None: unused without a mask prompt
        if a.grad is not None and b.grad is not None:
            assert torch.equal(a.grad, b.grad), name
            trained += 1
    assert trained > 50
