"""Module-level parity with the official `segment_anything` 1.0, same random weights (small ViT, full decoder).

Tolerance: max abs difference <= TOLERANCE (1e-4) in fp32 on embeddings, logits and IoU predictions.
"""

import pytest
import torch
from refiners.fluxion import layers as fl

from finesam.fast.layers import GeLU as FastGeLU
from finesam.fast.swap import swap
from finesam.model import SegmentAnything
from finesam.model.prompts import Prompts

from conftest import SMALL, TOLERANCE, max_diff

GRID = SMALL.embedding_size
MASK = SMALL.mask_input_size


@pytest.fixture
def small(small_either):
    """Every test here runs on the reference chains and on the fast paths (`conftest.small_either`)."""
    return small_either


def official_prompt(official, points=None, labels=None, boxes=None, masks=None):
    return official.prompt_encoder(points=None if points is None else (points, labels), boxes=boxes, masks=masks)


def our_prompt(model: SegmentAnything, **prompt) -> dict[str, torch.Tensor]:
    model.set_prompt(Prompts(**prompt))
    model.prompt_encoder(torch.zeros(1))
    embeddings = dict(model.use_context("mask_decoder"))
    model._reset_context()
    return embeddings


def random_prompts(seed: int, batch: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    size = SMALL.image_size
    points = torch.rand(batch, 3, 2, generator=g) * size
    labels = torch.tensor([[1, 0, 1]]).expand(batch, 3)
    corners = (torch.rand(batch, 2, 2, generator=g) * size).sort(dim=1).values
    boxes = corners.reshape(batch, 4)
    masks = torch.randn(batch, 1, MASK, MASK, generator=g) * 5
    return {
        "points": {"points": points, "labels": labels},
        "box": {"boxes": boxes},
        "points+box": {"points": points, "labels": labels, "boxes": boxes},
        "points+mask": {"points": points, "labels": labels, "masks": masks},
        "box+mask": {"boxes": boxes, "masks": masks},
        "mask only": {"masks": masks},
    }


@torch.no_grad()
def test_image_embedding_matches(official_small, small):
    image = torch.randn(2, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(1))
    expected = official_small.image_encoder(image)
    actual = small.image_encoder(image)
    assert expected.std() > 0.1  # a meaningful signal, not a near-zero output
    assert max_diff(actual, expected) <= TOLERANCE


@torch.no_grad()
def test_dense_positional_encoding_matches(official_small, small):
    embeddings = our_prompt(small, boxes=torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    expected = official_small.prompt_encoder.get_dense_pe()
    assert max_diff(embeddings["dense_positional_encoding"], expected) <= TOLERANCE


@pytest.mark.parametrize("kind", list(random_prompts(0)))
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_prompt_embeddings_match(official_small, small, kind, batch):
    prompt = random_prompts(seed=batch, batch=batch)[kind]
    sparse, dense = official_prompt(official_small, **prompt)
    ours = our_prompt(small, mask_input=prompt.get("masks"), **{k: v for k, v in prompt.items() if k != "masks"})
    assert max_diff(ours["sparse_prompt_embedding"], sparse) <= TOLERANCE
    # without a mask prompt the dense embedding is one map shared by (broadcast over) the prompts
    assert ours["dense_prompt_embedding"].shape[0] == (batch if "masks" in prompt else 1)
    assert max_diff(ours["dense_prompt_embedding"].expand_as(dense), dense) <= TOLERANCE


@pytest.mark.parametrize("kind", list(random_prompts(0)))
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
@torch.no_grad()
def test_decoder_matches(official_small, small, kind, multimask, batch):
    embedding = torch.randn(1, SMALL.decoder.prompt_dim, GRID, GRID, generator=torch.Generator().manual_seed(2))
    prompt = random_prompts(seed=10 + batch, batch=batch)[kind]
    sparse, dense = official_prompt(official_small, **prompt)
    expected_masks, expected_iou = official_small.mask_decoder(
        image_embeddings=embedding,
        image_pe=official_small.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )
    masks, iou = small.decode(
        embedding,
        Prompts(mask_input=prompt.get("masks"), **{k: v for k, v in prompt.items() if k != "masks"}),
        multimask_output=multimask,
    )
    assert masks.shape == (batch, 3 if multimask else 1, MASK, MASK)
    assert expected_masks.abs().max() > 0.05
    assert max_diff(masks, expected_masks) <= TOLERANCE
    assert max_diff(iou, expected_iou) <= TOLERANCE


@torch.no_grad()
def test_batched_image_embeddings_pair_with_prompts(small):
    """B images with B prompts decode as B independent (image, prompt) pairs."""
    embeddings = torch.randn(3, SMALL.decoder.prompt_dim, GRID, GRID, generator=torch.Generator().manual_seed(3))
    boxes = random_prompts(seed=4, batch=3)["box"]["boxes"]
    masks, iou = small.decode(embeddings, Prompts(boxes=boxes))
    for i in range(3):
        single_masks, single_iou = small.decode(embeddings[i : i + 1], Prompts(boxes=boxes[i : i + 1]))
        assert max_diff(masks[i : i + 1], single_masks) <= TOLERANCE
        assert max_diff(iou[i : i + 1], single_iou) <= TOLERANCE


@torch.no_grad()
def test_full_chain_forward_equals_official_pipeline(official_small, small):
    """Called as a chain, `SegmentAnything` runs image -> masks for the prompt in its context."""
    image = torch.randn(1, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(5))
    box = torch.tensor([[30.0, 40.0, 200.0, 180.0]])
    small.set_prompt(Prompts(boxes=box), multimask_output=True)
    masks, iou = small(image)
    sparse, dense = official_prompt(official_small, boxes=box)
    expected_masks, expected_iou = official_small.mask_decoder(
        image_embeddings=official_small.image_encoder(image),
        image_pe=official_small.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    assert max_diff(masks, expected_masks) <= TOLERANCE
    assert max_diff(iou, expected_iou) <= TOLERANCE
    assert small.use_context("sam")["point_coords"] is None  # the forward pass reset its prompt


@pytest.mark.parametrize("chunk", [None, 1, 3])
@torch.no_grad()
def test_prompt_chunks_do_not_change_the_result(small, chunk):
    embedding = torch.randn(1, SMALL.decoder.prompt_dim, GRID, GRID, generator=torch.Generator().manual_seed(6))
    prompt = random_prompts(seed=7, batch=7)["points+mask"]
    prompts = Prompts(points=prompt["points"], labels=prompt["labels"], mask_input=prompt["masks"])
    default_masks, default_iou = small.decode(embedding, prompts, multimask_output=True)  # chunks of 2
    small.prompt_chunk_size = chunk
    try:
        masks, iou = small.decode(embedding, prompts, multimask_output=True)
    finally:
        small.prompt_chunk_size = 2
    assert masks.shape == default_masks.shape == (7, 3, MASK, MASK)
    assert max_diff(masks, default_masks) <= TOLERANCE and max_diff(iou, default_iou) <= TOLERANCE


def fast_gelu(in_place: bool) -> fl.GeLU:
    gelu = fl.GeLU()
    swap(gelu, FastGeLU, in_place=in_place)
    return gelu


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "tokens"])
def test_gelu_equals_the_exact_gelu_and_keeps_the_layout(layout):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 7, generator=g) * 3
    x = {"channels_last": x.contiguous(memory_format=torch.channels_last), "contiguous": x, "tokens": x[0]}[layout]
    x.requires_grad_()
    actual = fast_gelu(in_place=False)(x)
    expected = torch.nn.functional.gelu(x.detach().double().requires_grad_())
    assert actual.shape == x.shape and actual.stride() == x.stride()
    assert max_diff(actual, expected) <= 1e-6
    upstream = torch.randn(x.shape, generator=g)
    (grad,) = torch.autograd.grad((actual * upstream).sum(), x)
    assert max_diff(grad, upstream * torch.func.grad(lambda t: torch.nn.functional.gelu(t).sum())(x.detach())) <= 1e-6


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_in_place_gelu_overwrites_its_input_only_at_inference(layout):
    x = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0)) * 3
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    expected = torch.nn.functional.gelu(x.double())
    gelu = fast_gelu(in_place=True)
    with torch.no_grad():
        given = x.clone()
        actual = gelu(given)
    assert actual.data_ptr() == given.data_ptr() and actual.stride() == x.stride()
    assert max_diff(actual, expected) <= 1e-6 and max_diff(given, expected) <= 1e-6
    # with gradients the input stays (backward needs it) and the gradient is GELU's
    given = x.clone().requires_grad_()
    actual = gelu(given)
    assert torch.equal(given.detach(), x) and max_diff(actual, expected) <= 1e-6
    (grad,) = torch.autograd.grad(actual.sum(), given)
    assert max_diff(grad, torch.func.grad(lambda t: torch.nn.functional.gelu(t).sum())(x)) <= 1e-6
