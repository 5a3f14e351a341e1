"""With the fast paths (`finesam.fast`), the first two-way block's image-side projections are computed once
per image, kept in the `image` context (so in the `ImageEmbedding`'s features) and reused by later prompt calls,
the dense positional encoding once per weights, and nothing remembered is ever used once the image or the
weights have changed.

The reference is the same decoder at inference with every memory set aside for the call (then put back): same
code, same kernels, so the comparisons are exact (`torch.equal`).
"""

import pytest
import torch
from refiners.fluxion import layers as fl

from finesam.adapters.lora import SAMLoraAdapter
from finesam.fast import apply_fast_paths
from finesam.fast.decoder import DensePositionalEncoding, Distribute, RememberedProjection, same_bits
from finesam.model.prompts import Prompts
from finesam.weights.loading import sam_from_state_dict

from conftest import SMALL, photo
from official import build_official

BOXES = Prompts(boxes=torch.tensor([[20.0, 30.0, 200.0, 180.0], [60.0, 10.0, 250.0, 240.0], [0.0, 0.0, 90.0, 90.0]]))
POINT = Prompts(points=torch.tensor([[[128.0, 100.0]]]), labels=torch.tensor([[1]]))


def remembering(model) -> list[fl.Linear]:
    """The projections that remember their output for the image (those the fast `Distribute`s mark)."""
    layers = []
    for projections in (m for m in model.mask_decoder.modules() if type(m) is Distribute):
        layers += [projections[i] for i in projections.image_side]
    return layers


def memories(model) -> dict[str, RememberedProjection]:
    return {k: v for k, v in model.use_context("image").items() if isinstance(v, RememberedProjection)}


def uncached(model, embedding, prompts):
    image = model.use_context("image")
    kept = memories(model)
    try:
        for key in kept:
            del image[key]
        with torch.no_grad():
            return model.decode(embedding, prompts)
    finally:  # what was remembered before is put back: the cached calls after this one see it unchanged
        for key in memories(model):
            del image[key]
        image.update(kept)


def cached(model, embedding, prompts):
    with torch.no_grad():
        return model.decode(embedding, prompts)


def assert_same(actual, expected):
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


@pytest.fixture
def official():
    return build_official(SMALL, seed=3)  # its own: the model shares its tensors, and the tests change them


@pytest.fixture
def model(official):
    model = sam_from_state_dict(official.state_dict())
    apply_fast_paths(model)
    return model


@pytest.fixture
def embeddings(model):
    with torch.no_grad():
        return [model.encode_image(photo(name).resize((256, 171))).embedding for name in ("rocket", "chelsea")]


def test_three_projections_remember_and_are_reused(model, embeddings):
    layers = remembering(model)
    assert len(layers) == 3  # keys and values of the first token-to-image attention, queries of image-to-token
    embedding = embeddings[0]
    expected_boxes, expected_point = uncached(model, embedding, BOXES), uncached(model, embedding, POINT)
    assert_same(cached(model, embedding, BOXES), expected_boxes)  # chunks of 2 prompts share the projections
    remembered = memories(model)
    assert sorted(remembered) == [
        "decoder_0.block_0.image_to_token.0",
        "decoder_0.block_0.token_to_image.1",
        "decoder_0.block_0.token_to_image.2",
    ]
    assert_same(cached(model, embedding, POINT), expected_point)  # another call on the same image
    assert memories(model) == remembered  # reused, not recomputed
    # proof of use: spoil what is remembered, and the next call on this image changes
    for memory in remembered.values():
        memory.output.mul_(0.5)
    spoiled = cached(model, embedding, POINT)
    assert not torch.equal(spoiled[0], expected_point[0])
    # a new image is never served from the old one
    other = embeddings[1]
    assert_same(cached(model, other, POINT), uncached(model, other, POINT))
    assert_same(cached(model, embedding, POINT), expected_point)


def test_weight_changes_are_never_served_stale(model, embeddings, official):
    embedding = embeddings[0]
    before = cached(model, embedding, POINT)
    layer = remembering(model)[0]
    with torch.no_grad():
        layer.weight.add_(0.01)  # in place: a training step, a manual edit
    after = cached(model, embedding, POINT)
    assert not torch.equal(after[0], before[0])
    assert_same(after, uncached(model, embedding, POINT))
    model.load_state_dict(sam_from_state_dict(build_official(SMALL, seed=3).state_dict()).state_dict())  # back
    assert_same(cached(model, embedding, POINT), before)
    other = sam_from_state_dict(build_official(SMALL, seed=7).state_dict())
    model.mask_decoder.load_state_dict(other.mask_decoder.state_dict())  # another decoder, same prompt encoder
    loaded = cached(model, embedding, POINT)
    assert not torch.equal(loaded[0], before[0])
    assert_same(loaded, uncached(model, embedding, POINT))


def test_lora_and_moves_are_never_served_stale(model, embeddings):
    embedding = embeddings[0]
    before = cached(model, embedding, POINT)
    lora = SAMLoraAdapter(model, "decoder", rank=2)  # the default: the two-way transformer's linears
    for parameter in lora.parameters():
        torch.nn.init.normal_(parameter, std=0.2)  # LoRA's up weights start at zero: make it change things
    lora.inject()
    injected = cached(model, embedding, POINT)
    assert not torch.equal(injected[0], before[0])
    assert_same(injected, uncached(model, embedding, POINT))
    lora.scale = 3.0
    rescaled = cached(model, embedding, POINT)
    assert not torch.equal(rescaled[0], injected[0])
    assert_same(rescaled, uncached(model, embedding, POINT))
    lora.eject()
    assert_same(cached(model, embedding, POINT), before)
    model.to(dtype=torch.float64)
    moved = cached(model, embedding.double(), POINT)
    assert moved[0].dtype == torch.float64
    assert_same(moved, uncached(model, embedding.double(), POINT))


def test_training_never_uses_remembered_projections(model, embeddings):
    embedding = embeddings[0]
    cached(model, embedding, POINT)  # something is remembered
    layers = remembering(model)
    for layer in layers:
        layer.weight.requires_grad_(True)
    masks, _ = model.decode(embedding, POINT)
    masks.sum().backward()
    assert all(layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0 for layer in layers)


def test_same_bits_tells_what_equal_values_hide():
    x = torch.randn(3, 5)
    assert same_bits(x, x.clone()) and same_bits(x.t(), x.clone().t())  # contiguous, and not
    changed = x.clone()
    changed[2, 4] = torch.nextafter(changed[2, 4], torch.tensor(1.0))  # one bit of the last element
    assert not same_bits(x, changed) and not same_bits(x.t(), changed.t())
    for size in (1, 2):  # 4 and 8 bytes: compared as 32- and as 64-bit words
        zeros, nans = torch.zeros(size), torch.full((size,), float("nan"))
        assert not same_bits(zeros, -zeros)  # equal as floats, not as bits
        assert same_bits(nans, nans.clone())  # the same NaN: unequal as floats
    assert not same_bits(x, x.double()) and not same_bits(x, x[:2]) and not same_bits(x, x.reshape(5, 3))
    odd = torch.randn(7, dtype=torch.float16)  # 14 bytes: not a whole number of 64-bit words
    assert same_bits(odd, odd.clone()) and not same_bits(odd, odd + 1)
    row = torch.randn(9)[1:]  # contiguous, but starting 4 bytes into a 64-bit word
    assert same_bits(row, row.clone()) and not same_bits(row, -row)


def test_memories_go_with_the_image_embedding(model):
    """`predict` on an `ImageEmbedding` keeps the projections in its features, and another image's embedding
    brings its own back: no stale memory, and no recomputation when going back."""
    first, second = (model.encode_image(photo(name).resize((256, 171))) for name in ("rocket", "chelsea"))
    box = {"boxes": [20, 30, 200, 150]}
    expected = model.predict(first, **box, return_logits=True).low_res_logits
    kept = {k: v for k, v in first.features.items() if isinstance(v, RememberedProjection)}
    assert len(kept) == 3
    model.predict(second, **box)
    assert {k for k, v in second.features.items() if isinstance(v, RememberedProjection)} == set(kept)
    again = model.predict(first, **box, return_logits=True).low_res_logits
    assert torch.equal(again, expected)
    assert all(first.features[k] is v for k, v in kept.items())  # used, not recomputed


def test_dense_positional_encoding_is_remembered_for_its_weights(model, embeddings, official):
    layer = model.prompt_encoder.ensure_find(DensePositionalEncoding)
    assert type(layer) is DensePositionalEncoding
    with torch.no_grad():
        first = layer()
        assert layer() is first  # remembered
    with torch.enable_grad():
        fresh = layer()
    assert fresh is not first and torch.equal(fresh, first)  # recomputed with gradients, to the same values
    matrix = layer.encoding.get_buffer("gaussian_matrix")
    with torch.no_grad():
        matrix.mul_(1.5)  # in place
        scaled = layer()
        assert scaled is not first and not torch.equal(scaled, first)
        with torch.enable_grad():
            assert torch.equal(scaled, layer())
        model.to(dtype=torch.float64)
        moved = layer()
        with torch.enable_grad():
            assert moved.dtype == torch.float64 and torch.equal(moved, layer())
        model.to(dtype=torch.float32)
    # a decode after all this is the decode of a fresh model with those weights
    reloaded = sam_from_state_dict(official.state_dict())
    reloaded.load_state_dict(model.state_dict())
    apply_fast_paths(reloaded)
    assert_same(cached(model, embeddings[0], POINT), uncached(reloaded, embeddings[0], POINT))
