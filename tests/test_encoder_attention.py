"""The encoder's relative-position attention against the official `Attention` of `segment_anything`: the
reference chain, and its fast version (`finesam.fast`) in every chunking of its queries: one pass, several
whole images (windows) per chunk, grid rows of one image per chunk, each with a smaller last chunk, with the
reused bias buffer (inference) and without it (gradients); and, for grids no wider than the heads (windows),
with the position terms carried as query and key channels. In bfloat16, the attention written out as products
and a softmax (global grids, in chunks of rows; windows), and the other fast layers of the encoder: the feed-forward
and grid attention through oneDNN, windows cut after the qkv projection.

Tolerance: 2e-6 max abs on outputs of magnitude ~1 against the official module (float32 rounding of the same
sums in another order), and 1e-6 against the one pass (the attention kernel blocks fewer queries differently).
bfloat16: 3e-2 of the largest output, against the official module in float32 on the same bf16-rounded weights
and inputs (the reference chain in bfloat16 reaches 0.7-1.6e-2 of it, the fast paths 0.7-1.9e-2).
"""

import copy

import pytest
import torch
from refiners.fluxion import layers as fl
from refiners.fluxion.adapters.lora import LinearLora, LoraAdapter
from segment_anything.modeling.image_encoder import Attention as OfficialAttention

from finesam.fast import apply_fast_paths, reference_paths
from finesam.fast import vit as fast_vit
from finesam.fast.vit import CHUNK_BYTES
from finesam.fast.vit import RelativePositionAttention as FastRelativePositionAttention
from finesam.model.image_encoder import FeedForward, GridAttention, RelativePositionAttention, WindowedAttention

TOLERANCE = 2e-6
BF16_TOLERANCE = 3e-2
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
        assert apply_fast_paths(ours) == 2  # the grid attention and its relative-position attention
        assert type(attention) is FastRelativePositionAttention
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


def in_bfloat16(official: OfficialAttention, ours: GridAttention) -> tuple[OfficialAttention, GridAttention]:
    """The official module in float32 with bf16-rounded weights, ours in bfloat16."""
    official = copy.deepcopy(official)
    with torch.no_grad():
        for parameter in official.parameters():
            parameter.copy_(parameter.bfloat16().float())
    return official, ours.to(dtype=torch.bfloat16)


def spy(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Counts the calls of the fast attention's method `name`."""
    calls: list[int] = []
    method = getattr(FastRelativePositionAttention, name)
    monkeypatch.setattr(FastRelativePositionAttention, name, lambda self, *args: calls.append(1) or method(self, *args))
    return calls


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


# bytes of one grid row of queries' scores in bfloat16: heads x width x tokens
BF16_ROW = HEADS * GRID * GRID * GRID * 2


@pytest.mark.parametrize("scores_bytes", [2**62, 3 * BF16_ROW, 1], ids=["one-chunk", "three-rows", "one-row"])
def test_written_out_attention_in_bfloat16(scores_bytes, monkeypatch):
    """A grid wider than the heads (no channel path) in bfloat16: products, bias and softmax written out, rows
    of one image at a time (3 images, chunks of 3, 3, 1 rows or single rows), each image as one pass."""
    official, ours = in_bfloat16(*pair(seed=0))
    attention = ours.ensure_find(FastRelativePositionAttention)
    calls = spy(monkeypatch, "_written_out")
    x = torch.randn(3, GRID, GRID, DIM, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        expected = official(x.float())
        whole = ours(x)
        attention.scores_bytes = scores_bytes
        actual = ours(x)
    assert len(calls) == 2 and actual.dtype == torch.bfloat16
    assert relative_error(actual, expected) <= BF16_TOLERANCE
    assert relative_error(actual, whole.float()) <= 1e-2  # the chunks round as the whole does, up to one bf16 step


@pytest.mark.parametrize(("dim", "heads", "grid"), CHANNEL_CASES)
def test_positions_as_channels_in_bfloat16(dim, heads, grid, monkeypatch):
    official, ours = in_bfloat16(*pair(seed=4, dim=dim, heads=heads, grid=grid))
    calls = spy(monkeypatch, "_positions_as_channels")
    x = torch.randn(3, grid, grid, dim, generator=torch.Generator().manual_seed(5)).bfloat16()
    with torch.no_grad():
        expected = official(x.float())
        actual = ours(x)
    assert calls and relative_error(actual, expected) <= BF16_TOLERANCE


def windowed(seed: int, lora: bool) -> WindowedAttention:
    """A windowed attention (windows of 6) with random position tables; with `lora`, a LoRA around its qkv
    projection (the fast version must then still call it, for every token and for the padding)."""
    torch.manual_seed(seed)
    layer = WindowedAttention(DIM, HEADS, window_size=6)
    attention = layer.ensure_find(RelativePositionAttention)
    with torch.no_grad():
        attention.rel_pos_h.normal_(0, 0.5)
        attention.rel_pos_w.normal_(0, 0.5)
    if lora:
        qkv = layer.ensure_find(GridAttention)[0]
        assert isinstance(qkv, fl.Linear)
        LoraAdapter(qkv, random_lora("qkv", DIM, 3 * DIM)).inject(layer.ensure_find(GridAttention))
    return layer


def random_lora(name: str, inputs: int, outputs: int) -> LinearLora:
    lora = LinearLora(name, inputs, outputs, rank=2)
    for parameter in lora.parameters():  # (its up projection starts at zero: it would change nothing)
        torch.nn.init.normal_(parameter, std=0.3)
    return lora


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora-on-qkv"])
@pytest.mark.parametrize("grid", [12, 16], ids=["whole-windows", "padded"])
def test_windows_cut_after_the_projection(grid, lora):
    """The fast windowed attention (projections outside the windows) against the reference chain: float32
    within 1e-6 of the largest output, bfloat16 within the bf16 tolerance of the float32 reference."""
    layer = windowed(seed=6, lora=lora)
    assert apply_fast_paths(layer) == 3 and type(layer) is fast_vit.WindowedAttention
    x = torch.randn(2, grid, grid, DIM, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        with reference_paths(layer):
            expected = layer(x)
        assert relative_error(layer(x), expected) <= 1e-6
        layer.to(dtype=torch.bfloat16)
        assert relative_error(layer(x.bfloat16()), expected) <= BF16_TOLERANCE


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora-on-first-linear"])
def test_feed_forward_in_bfloat16(lora):
    """The feed-forward's first linear layer and GELU in one oneDNN call (bfloat16), against float32; with a
    LoRA on the first linear layer, the chain as it is."""
    torch.manual_seed(8)
    layer = FeedForward(DIM, 4 * DIM)
    if lora:
        first = layer[0]
        assert isinstance(first, fl.Linear)
        LoraAdapter(first, random_lora("first", DIM, 4 * DIM)).inject(layer)
    x = torch.randn(2, GRID, GRID, DIM, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = layer(x)
        assert apply_fast_paths(layer) >= 1 and type(layer) is fast_vit.FeedForward
        assert relative_error(layer(x), expected) <= 1e-6
        layer.to(dtype=torch.bfloat16)
        actual = layer(x.bfloat16())
        with reference_paths(layer):
            reference = layer(x.bfloat16())
    assert relative_error(actual, expected) <= BF16_TOLERANCE
    if lora:  # an adapter in the chain: the fast version runs the chain as the reference does
        assert torch.equal(actual, reference)
