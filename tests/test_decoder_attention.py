"""The decoder's fast attentions between prompt tokens and image tokens (`finesam.fast.decoder`), which at
inference never project the image tokens, against refiners' `fl.Attention` with the same weights (the formula
they shortcut, and the reference chain's layer): tokens querying the image (few queries) and the image
querying the tokens (few keys, with the query projection remembered for the image as in the first block, or
folded as in the others).

Tolerance: 1e-6 max abs on outputs of magnitude ~0.2 (float32 rounding of reassociated products). With many
queries the layer is the reference itself; with a LoRA on the decoder the shortcut folds it into the projection
weights, and must not drop its term (1e-5 against the adapted layers run with gradients).
"""

import pytest
import torch
from refiners.fluxion import layers as fl
from refiners.fluxion.context import Contexts

from finesam.adapters.lora import SAMLoraAdapter
from finesam.fast import apply_fast_paths
from finesam.fast import decoder as fast
from finesam.fast.swap import swap
from finesam.model.prompts import Prompts
from finesam.weights.loading import sam_from_state_dict

from conftest import SMALL
from official import build_official

TOLERANCE = 1e-6


def layers(seed: int, kind: type = fast.FewQueriesAttention) -> tuple[fl.Attention, fl.Attention]:
    torch.manual_seed(seed)
    reference = fl.Attention(64, num_heads=4, inner_dim=32)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.normal_(0, 0.1)
    ours = fl.Attention(64, num_heads=4, inner_dim=32)
    ours.load_state_dict(reference.state_dict())
    swap(ours, kind)
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


class WithImageMemory(fl.Chain):
    """A layer under an `image` context, as in `SegmentAnything`: where the first block's memories go."""

    def init_context(self) -> Contexts:
        return {"image": {}}


def few_keys_layers(seed: int, remembered_query: bool) -> tuple[fl.Attention, fl.Attention, fl.Chain]:
    reference, ours = layers(seed, fast.FewKeysAttention)
    if remembered_query:
        swap(ours[0], fast.Distribute, image_side=(0,), memory_key="test")
    return reference, ours, WithImageMemory(ours)


@pytest.mark.parametrize("remembered_query", [False, True], ids=["folded-query", "remembered-query"])
@pytest.mark.parametrize("tokens", [1, 7, 8, 20], ids=lambda t: f"{t}-keys")
def test_image_querying_few_tokens_matches_fl_attention(tokens, remembered_query):
    reference, ours, top = few_keys_layers(tokens, remembered_query)
    generator = torch.Generator().manual_seed(tokens)
    query = torch.randn(1, 300, 64, generator=generator)  # batch of one: the remembering projection's case
    key, value = torch.randn(2, 1, tokens, 64, generator=generator)
    with torch.no_grad():
        expected = reference(query, key, value)
        actual = top(query, key, value)
        memory = dict(top.use_context("image"))
        again = top(query, key, value)  # the remembered query projection, used again
    assert list(memory) == (["test.0"] if remembered_query else [])
    assert ours.state_dict().keys() == reference.state_dict().keys()
    assert (actual - expected).abs().max() <= TOLERANCE and torch.equal(again, actual)
    if tokens * ours.num_heads < ours.inner_dim:
        assert not torch.equal(actual, expected)  # the shortcut ran (another rounding)


def test_lora_on_the_decoder_is_not_dropped():
    sam = sam_from_state_dict(build_official(SMALL, seed=5).state_dict())
    apply_fast_paths(sam)
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
