"""The decoder's `Attention` between prompt tokens and image tokens, which at inference never projects the
image tokens, against refiners' `fl.Attention` with the same weights (the formula it shortcuts): tokens
querying the image (few queries) and the image querying the tokens (few keys, with the query projection
remembered for the image as in the first block, or folded as in the others).

Tolerance: 1e-6 max abs on outputs of magnitude ~0.2 (float32 rounding of reassociated products). With many
queries the layer is the reference itself; with a LoRA on the decoder the shortcut folds it into the projection
weights, and must not drop its term (1e-5 against the adapted layers run with gradients).
"""

import pytest
import torch
from refiners.fluxion import layers as fl

from finesam.adapters.lora import SAMLoraAdapter
from finesam.model.layers import Linear
from finesam.model.prompts import Prompts
from finesam.model.transformer import Attention, FewKeysDotProduct
from finesam.weights.loading import sam_from_state_dict

from conftest import SMALL
from official import build_official

TOLERANCE = 1e-6


def layers(seed: int) -> tuple[fl.Attention, Attention]:
    torch.manual_seed(seed)
    reference = fl.Attention(64, num_heads=4, inner_dim=32)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.1)
    ours = Attention(64, num_heads=4, inner_dim=32)
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def inputs(tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(tokens)
    return tuple(torch.randn(2, n, 64, generator=generator) for n in (tokens, 300, 300))  # type: ignore[return-value]


@pytest.mark.parametrize("tokens", [1, 7, 8, 20], ids=lambda t: f"{t}-queries")
def test_matches_fl_attention(tokens):
    reference, ours = layers(seed=tokens)
    query, key, value = inputs(tokens)
    with torch.no_grad():
        expected = reference(query, key, value)
        actual = ours(query, key, value)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    assert (actual - expected).abs().max() <= TOLERANCE
    if tokens * ours.num_heads >= ours.inner_dim:  # the fallback is the reference itself
        assert torch.equal(actual, expected)
    else:
        assert not torch.equal(actual, expected)  # the shortcut ran (another rounding)


def few_keys_layers(seed: int, remembered_query: bool) -> tuple[fl.Attention, Attention]:
    reference, ours = layers(seed)
    ours.replace(ours.ensure_find(fl.ScaledDotProductAttention), FewKeysDotProduct(num_heads=4))
    if remembered_query:
        projections = ours.ensure_find(fl.Distribute)
        projections.replace(projections[0], Linear(64, 32))
        ours.load_state_dict(reference.state_dict())
    return reference, ours


@pytest.mark.parametrize("remembered_query", [False, True], ids=["folded-query", "remembered-query"])
@pytest.mark.parametrize("tokens", [1, 7, 8, 20], ids=lambda t: f"{t}-keys")
def test_image_querying_few_tokens_matches_fl_attention(tokens, remembered_query):
    reference, ours = few_keys_layers(tokens, remembered_query)
    generator = torch.Generator().manual_seed(tokens)
    query = torch.randn(1, 300, 64, generator=generator)  # batch of one: the remembering projection's case
    key, value = torch.randn(2, 1, tokens, 64, generator=generator)
    with torch.no_grad():
        expected = reference(query, key, value)
        actual = ours(query, key, value)
        again = ours(query, key, value)  # the remembered query projection, used again
    assert ours.state_dict().keys() == reference.state_dict().keys()
    assert (actual - expected).abs().max() <= TOLERANCE and torch.equal(again, actual)
    if tokens * ours.num_heads < ours.inner_dim:
        assert not torch.equal(actual, expected)  # the shortcut ran (another rounding)


def test_lora_on_the_decoder_is_not_dropped():
    sam = sam_from_state_dict(build_official(SMALL, seed=5).state_dict())
    lora = SAMLoraAdapter(sam, rank=4).inject()  # the default: the two-way transformer's linears
    with torch.no_grad():
        for layer in lora.loras:
            layer.up.weight.normal_(0, 0.1)  # a trained LoRA: its term is not zero
    embedding = torch.randn(1, 256, 16, 16, generator=torch.Generator().manual_seed(6))
    prompts = Prompts(boxes=torch.tensor([[20.0, 30.0, 200.0, 180.0]]))
    with torch.no_grad():
        fast = sam.decode(embedding, prompts)
    with torch.enable_grad():
        reference = sam.decode(embedding, prompts)
    lora.eject()
    with torch.no_grad():
        base = sam.decode(embedding, prompts)
    assert (fast[0] - reference[0].detach()).abs().max() <= 1e-5
    assert (fast[0] - base[0]).abs().max() > 1e-3  # the LoRA changed the masks
