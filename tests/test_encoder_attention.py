"""The encoder's relative-position attention against the official `Attention` of `segment_anything`: the
reference chain, and its fast version (`finesam.fast`) in every chunking of its queries: one pass, several
whole images (windows) per chunk, grid rows of one image per chunk, each with a smaller last chunk, with the
reused bias buffer (inference) and without it (gradients); and, for grids no wider than the heads (windows),
with the position terms carried as query and key channels.

Tolerance: 2e-6 max abs on outputs of magnitude ~1 against the official module (float32 rounding of the same
sums in another order), and 1e-6 against the one pass (the attention kernel blocks fewer queries differently).
"""

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention as OfficialAttention

from finesam.fast import apply_fast_paths
from finesam.fast.vit import CHUNK_BYTES
from finesam.fast.vit import RelativePositionAttention as FastRelativePositionAttention
from finesam.model.image_encoder import GridAttention, RelativePositionAttention

TOLERANCE = 2e-6
DIM, HEADS, GRID = 32, 4, 7


def pair(
    seed: int, dim: int = DIM, heads: int = HEADS, grid: int = GRID, fast: bool = True
) -> tuple[OfficialAttention, GridAttention]:
    torch.manual_seed(seed)
    official = OfficialAttention(dim, heads, qkv_bias=True, use_rel_pos=True, input_size=(grid, grid))
    with torch.no_grad():
        official.rel_pos_h.normal_(0, 0.5)
        official.rel_pos_w.normal_(0, 0.5)
    ours = GridAttention(dim, heads, grid)
    qkv, attention, proj = ours
    assert isinstance(attention, RelativePositionAttention)
    with torch.no_grad():
        for mine, theirs in ((qkv.weight, official.qkv.weight), (qkv.bias, official.qkv.bias)):
            mine.copy_(theirs)
        for mine, theirs in ((proj.weight, official.proj.weight), (proj.bias, official.proj.bias)):
            mine.copy_(theirs)
        attention.rel_pos_h.copy_(official.rel_pos_h)
        attention.rel_pos_w.copy_(official.rel_pos_w)
    if fast:
        assert apply_fast_paths(ours) == 1 and type(attention) is FastRelativePositionAttention
    return official, ours


def with_chunk_bytes(ours: GridAttention, chunk_bytes: int, x: torch.Tensor, grad: bool) -> torch.Tensor:
    attention = ours.ensure_find(FastRelativePositionAttention)
    attention.chunk_bytes = chunk_bytes
    try:
        with torch.set_grad_enabled(grad):
            return ours(x).detach()
    finally:
        attention.chunk_bytes = CHUNK_BYTES


# bytes of one grid row of queries' bias: heads x width x tokens floats
ROW = HEADS * GRID * GRID * GRID * 4
CHUNKINGS = {
    "one-pass": 2**62,
    "two-images": 2 * GRID * ROW,  # 5 images: chunks of 2, 2, 1
    "three-rows": 3 * ROW,  # rows 3, 3, 1 of each image
    "one-row": 1,
}


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "gradients"])
def test_reference_matches_official_attention(grad):
    official, ours = pair(seed=0, fast=False)
    x = torch.randn(5, GRID, GRID, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = official(x)
    with torch.set_grad_enabled(grad):
        actual = ours(x).detach()
    assert (actual - expected).abs().max() <= TOLERANCE


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "gradients"])
@pytest.mark.parametrize("chunking", list(CHUNKINGS))
def test_every_chunking_matches_official_attention(chunking, grad):
    official, ours = pair(seed=0)
    x = torch.randn(5, GRID, GRID, DIM, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = official(x)
    one_pass = with_chunk_bytes(ours, CHUNKINGS["one-pass"], x, grad=False)
    actual = with_chunk_bytes(ours, CHUNKINGS[chunking], x, grad)
    assert (actual - expected).abs().max() <= TOLERANCE
    assert (actual - one_pass).abs().max() <= 1e-6


def test_gradients_of_the_fast_layer_are_the_official_ones():
    """With gradients the fast layer computes the reference formula, whatever its chunk setting."""
    official, ours = pair(seed=2)
    x = torch.randn(2, GRID, GRID, DIM, generator=torch.Generator().manual_seed(3))
    official(x).square().sum().backward()
    attention = ours.ensure_find(FastRelativePositionAttention)
    attention.chunk_bytes = 3 * ROW
    ours(x).square().sum().backward()
    assert official.rel_pos_h.grad is not None and attention.rel_pos_h.grad is not None
    assert (attention.rel_pos_h.grad - official.rel_pos_h.grad).abs().max() <= 1e-4


# (dim, heads, grid): head width >= height + width, so the positions go in as channels; the channel count is
# padded to a multiple of 16 in the first two (32 + 14 -> 48, ViT-H's 80 + 28 -> 112), not in the third (18 + 14)
CHANNEL_CASES = [(64, 2, 7), (1280, 16, 14), (36, 2, 7)]


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "gradients"])
@pytest.mark.parametrize(("dim", "heads", "grid"), CHANNEL_CASES)
def test_positions_as_channels_match_official_attention(dim, heads, grid, grad, monkeypatch):
    official, ours = pair(seed=4, dim=dim, heads=heads, grid=grid)
    calls: list[int] = []
    as_channels = FastRelativePositionAttention._positions_as_channels
    monkeypatch.setattr(
        FastRelativePositionAttention,
        "_positions_as_channels",
        lambda self, *args: calls.append(1) or as_channels(self, *args),
    )
    x = torch.randn(3, grid, grid, dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = official(x)
    with torch.set_grad_enabled(grad):
        actual = ours(x)
    assert bool(calls) != grad, "the channel path runs at inference only"
    assert (actual.detach() - expected).abs().max() <= TOLERANCE * max(1.0, expected.abs().max().item())
    if grad:  # every parameter's gradient, against the official module's
        actual.square().sum().backward()
        official(x).square().sum().backward()
        attention = ours.ensure_find(RelativePositionAttention)
        for mine, theirs in ((attention.rel_pos_h, official.rel_pos_h), (attention.rel_pos_w, official.rel_pos_w)):
            assert mine.grad is not None and theirs.grad is not None
            assert (mine.grad - theirs.grad).abs().max() <= 1e-4 * max(1.0, theirs.grad.abs().max().item())
