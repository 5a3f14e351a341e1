"""SAM 2's video memory path against Meta's `sam2` 1.1.0: the memory encoder, the memory attention, the object
pointers with the occlusion handling, and the temporal and spatial encodings equal the official modules of a
`SAM2Base` (SAM 2.1 Hiera-T configuration, seeded and perturbed weights), whose weights reach ours through the
converter: an official checkpoint file, `convert_checkpoint`, the tensors the converted file keeps, our key map.

Inputs are random, at the real shapes of `sam2.1_hiera_tiny` (a 64 x 64 grid of 256 channels, 1024 x 1024 masks,
64-channel memories) except where a smaller grid is allowed (the memory attention with several frames)."""

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks

from finesam.model.sam2.memory_config import SAM2_1_MEMORY, SAM2_MEMORY, SAM2MemoryConfig
from finesam.model.sam2.memory_encoder import NonOverlappingMasks
from finesam.model.sam2.object_pointers import pointer_tokens
from finesam.model.sam2.video_memory import SAM2VideoMemory
from finesam.weights.io import CheckpointError
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.loading import convert_checkpoint, read_kept
from finesam.weights.sam2_memory import load_video_memory, memory_config_of, video_memory_from_state_dict

from conftest import max_diff
from official_sam2 import build_official_sam2, small_hiera

# largest absolute difference allowed with the official modules (float32, CPU); the outputs are O(1) to O(10)
TOLERANCE = 1e-5

GRID = 64  # the image embedding's grid at 1024 px
DIM, MEMORY_DIM = 256, 64


@functools.cache
def _official() -> Any:
    # the video predictor's settings: prompted masks are thresholded for memory
    return build_official_sam2("sam2.1_hiera_tiny", {"binarize_mask_from_pts_for_mem_enc": True})


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, SAM2VideoMemory, Path]:
    """The official model, and our memory loaded from the file our converter wrote from its checkpoint."""
    official = _official()
    folder = tmp_path_factory.mktemp("sam2_memory")
    checkpoint = folder / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, checkpoint)
    report = convert_checkpoint(checkpoint, folder / "converted")
    memory = load_video_memory(report.written[0])
    assert memory.config == SAM2_1_MEMORY
    return official, memory, report.written[0]


def _tokens(grid: tuple[int, int], batch: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, DIM, *grid, generator=generator)


@torch.no_grad()
@pytest.mark.parametrize("from_prompts", [False, True], ids=["sigmoid", "binarized"])
def test_memory_encoder_matches_the_official_one(converted, from_prompts):
    official, memory, _ = converted
    generator = torch.Generator().manual_seed(1)
    features = _tokens((GRID, GRID), 2, generator)
    masks = 8 * torch.randn(2, 1, 16 * GRID, 16 * GRID, generator=generator)
    scores = torch.tensor([[1.5], [-0.5]])  # the second object absent: its memory gets the no-object embedding
    expected, expected_positions = official._encode_new_memory(
        current_vision_feats=[features.flatten(2).permute(2, 0, 1)],
        feat_sizes=[(GRID, GRID)],
        pred_masks_high_res=masks,
        object_score_logits=scores,
        is_mask_from_pts=from_prompts,
    )
    ours, positions = memory.memory_encoder.encode(features, masks, scores, from_prompts=from_prompts)
    assert ours.shape == (2, MEMORY_DIM, GRID, GRID)
    assert max_diff(ours, expected) <= TOLERANCE
    assert max_diff(positions, expected_positions[-1]) <= TOLERANCE
    # the no-object embedding made a difference where the object is absent, and only there
    plain, _ = memory.memory_encoder.encode(features, masks, torch.ones(2, 1), from_prompts=from_prompts)
    assert torch.equal(plain[0], ours[0]) and max_diff(plain[1], ours[1]) > 1e-3
    with pytest.raises(ValueError, match="mask logits of 1024 x 1024 for a 64 x 64 embedding"):
        memory.memory_encoder.encode(features, masks[..., :512, :512], scores)


@torch.no_grad()
def test_non_overlapping_masks_match_the_official_constraint(converted):
    official, _, _ = converted
    masks = 5 * torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = official._apply_non_overlapping_constraints(masks)
    assert torch.equal(NonOverlappingMasks()(masks), expected)
    assert not torch.equal(expected, masks)
    encoder = SAM2VideoMemory(SAM2MemoryConfig(non_overlapping_masks=True)).memory_encoder
    assert any(isinstance(m, NonOverlappingMasks) for m in encoder.modules())


def _memory_inputs(
    grid: tuple[int, int], frames: int, pointers: int, batch: int, seed: int
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, grid[0] * grid[1], DIM, generator=generator)
    positions = torch.randn(batch, grid[0] * grid[1], DIM, generator=generator)
    count = frames * grid[0] * grid[1] + pointers * DIM // MEMORY_DIM
    memory = torch.randn(batch, count, MEMORY_DIM, generator=generator)
    memory_positions = torch.randn(batch, count, MEMORY_DIM, generator=generator)
    return tokens, positions, memory, memory_positions


def _official_attention(official: Any, tokens, positions, memory, memory_positions, pointer_tokens_: int):
    seq_first = [t.transpose(0, 1) for t in (tokens, positions, memory, memory_positions)]
    out = official.memory_attention(
        curr=[seq_first[0]],
        curr_pos=[seq_first[1]],
        memory=seq_first[2],
        memory_pos=seq_first[3],
        num_obj_ptr_tokens=pointer_tokens_,
    )
    return out.transpose(0, 1)


@torch.no_grad()
@pytest.mark.parametrize(
    ("grid", "frames", "pointers", "batch"),
    [((GRID, GRID), 1, 2, 1), ((16, 16), 3, 5, 2), ((16, 16), 2, 0, 1), ((8, 8), 1, 16, 1)],
    ids=["64x64-1-frame-2-pointers", "16x16-3-frames-5-pointers-2-objects", "no-pointers", "16-pointers"],
)
def test_memory_attention_matches_the_official_one(converted, grid, frames, pointers, batch):
    official, memory, _ = converted
    tokens, positions, bank, bank_positions = _memory_inputs(grid, frames, pointers, batch, seed=3)
    count = pointers * DIM // MEMORY_DIM
    expected = _official_attention(official, tokens, positions, bank, bank_positions, count)
    ours = memory.memory_attention.condition(tokens, positions, bank, bank_positions, pointer_tokens=count)
    assert ours.shape == tokens.shape
    assert max_diff(ours, expected) <= TOLERANCE


@torch.no_grad()
def test_memory_attention_refuses_memories_that_are_not_whole_frames(converted):
    _, memory, _ = converted
    tokens, positions, bank, bank_positions = _memory_inputs((8, 8), 1, 1, 1, seed=4)
    with pytest.raises(ValueError, match="the memories must be whole frames of the query grid"):
        memory.memory_attention.condition(tokens, positions, bank, bank_positions, pointer_tokens=0)
    with pytest.raises(ValueError, match="square grid of query tokens"):
        memory.memory_attention.condition(tokens[:, :60], positions[:, :60], bank, bank_positions, pointer_tokens=4)
    with pytest.raises(ValueError, match="positions must have the shape"):
        memory.memory_attention.condition(tokens, positions[:, :10], bank, bank_positions, pointer_tokens=4)


def test_memory_attention_drops_out_in_training_only(converted):
    _, memory, _ = converted
    tokens, positions, bank, bank_positions = _memory_inputs((8, 8), 1, 1, 1, seed=5)
    attention = memory.memory_attention
    with torch.no_grad():
        first = attention.condition(tokens, positions, bank, bank_positions, pointer_tokens=4)
        assert torch.equal(first, attention.condition(tokens, positions, bank, bank_positions, pointer_tokens=4))
        attention.train()
        try:
            trained = attention.condition(tokens, positions, bank, bank_positions, pointer_tokens=4)
        finally:
            attention.eval()
    assert max_diff(trained, first) > 1e-3


def _decoder_outputs(official: Any, forced_scores: torch.Tensor, multimask: bool) -> tuple[Any, dict[str, Any]]:
    """The official `_forward_sam_heads` on random features and a click each, with the decoder's object scores
    replaced by `forced_scores` (one object present, one absent); also what its decoder returned."""
    generator = torch.Generator().manual_seed(6)
    batch = forced_scores.shape[0]
    features = _tokens((GRID, GRID), batch, generator)
    high_res = [torch.randn(batch, DIM // 8, 4 * GRID, 4 * GRID, generator=generator)]
    high_res.append(torch.randn(batch, DIM // 4, 2 * GRID, 2 * GRID, generator=generator))
    points = {"point_coords": torch.rand(batch, 1, 2, generator=generator) * 1024, "point_labels": torch.ones(batch, 1)}
    seen: dict[str, Any] = {}

    def force(_module: Any, _inputs: Any, output: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        masks, ious, tokens, _ = output
        seen.update(masks=masks, ious=ious, tokens=tokens)
        return masks, ious, tokens, forced_scores

    handle = official.sam_mask_decoder.register_forward_hook(force)
    try:
        outputs = official._forward_sam_heads(features, points, None, high_res, multimask_output=multimask)
    finally:
        handle.remove()
    return outputs, seen


@torch.no_grad()
@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_object_pointers_and_occlusion_match_the_official_heads(converted, multimask):
    official, memory, _ = converted
    scores = torch.tensor([[2.0], [-3.0]])
    outputs, seen = _decoder_outputs(official, scores, multimask)
    low_res_multimasks, _, _, _, _, expected_pointer, _ = outputs
    # the occlusion: absent objects' masks are -1024 everywhere
    assert torch.equal(memory.occluded_masks(seen["masks"], scores), low_res_multimasks)
    assert (low_res_multimasks[1] == -1024).all()
    # the pointer of the chosen mask's token (the best IoU among the multimask tokens)
    tokens = seen["tokens"]
    chosen = tokens[torch.arange(2), seen["ious"].argmax(-1)] if multimask else tokens[:, 0]
    pointer = memory.object_pointer(chosen, scores)
    assert max_diff(pointer, expected_pointer) <= TOLERANCE
    assert torch.equal(pointer[1], official.no_obj_ptr[0])  # fixed: the absent object's pointer is no_obj_ptr


@torch.no_grad()
def test_encodings_match_the_official_ones(converted):
    official, memory, _ = converted
    from sam2.modeling.sam2_utils import get_1d_sine_pe

    # the pointers' temporal encoding: signed distances over the farthest allowed (max_obj_ptrs - 1)
    distances = torch.tensor([0, 3, -2, 1, 15])
    expected = official.obj_ptr_tpos_proj(get_1d_sine_pe(distances / 15, dim=DIM))
    assert memory.pointer_time is not None
    assert max_diff(memory.pointer_time(distances / 15), expected) <= TOLERANCE
    # the memory slots' learned encoding
    positions = torch.randn(1, 10, MEMORY_DIM)
    for slot in range(7):
        expected = positions + official.maskmem_tpos_enc[7 - slot - 1].reshape(1, 1, -1)
        assert torch.equal(memory.memory_time(positions, slot), expected)
    with pytest.raises(ValueError, match=r"memory slot 7 is not in 0\.\.6"):
        memory.memory_time(positions, 7)
    # the sine position encodings of the memories and of the image tokens (the neck's)
    for grid in (GRID, 16):
        x = torch.zeros(2, DIM, grid, grid)
        neck = official.image_encoder.neck.position_encoding(x)
        assert max_diff(memory.image_positions(x), neck) <= TOLERANCE
        mem = official.memory_encoder.position_encoding(x[:, :MEMORY_DIM])
        assert max_diff(memory.memory_encoder[-1][1](x[:, :MEMORY_DIM]), mem) <= TOLERANCE
    # a given mask to the decoder's mask-prompt size
    mask = (torch.rand(1, 1, 1024, 1024, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    assert max_diff(memory.mask_input_downsample(mask), official.mask_downsample(mask)) <= TOLERANCE


def test_pointer_tokens_split_each_pointer_like_the_official_bank():
    pointers = torch.randn(3, 2, DIM)  # (pointers, batch, dim), as the bank stacks them
    positions = torch.randn(3, MEMORY_DIM)
    tokens, token_positions = pointer_tokens(pointers, positions, MEMORY_DIM)
    assert tokens.shape == token_positions.shape == (2, 12, MEMORY_DIM)
    # pointer 1 of object 0 is tokens 4..7, its four quarters in order, all at pointer 1's position
    assert torch.equal(tokens[0, 4:8].reshape(-1), pointers[1, 0])
    assert all(torch.equal(token_positions[0, 4 + i], positions[1]) for i in range(4))


def test_the_converted_file_keeps_every_memory_tensor_and_loads_them(converted):
    official, memory, path = converted
    kept = read_kept(path)
    state = official.state_dict()
    assert kept.keys() == {k for k in state if is_memory_key(k)}
    # loading from the official checkpoint gives the same modules
    direct = video_memory_from_state_dict(state)
    assert all(torch.equal(direct.state_dict()[k], v) for k, v in memory.state_dict().items())
    # every tensor of ours comes from the file: none is left at its initial value
    assert len(memory.state_dict()) == len(kept)
    broken = {k: v for k, v in kept.items() if k != "memory_attention.layers.2.cross_attn_image.k_proj.weight"}
    with pytest.raises(CheckpointError, match=r"missing keys: .*layers\.2\.cross_attn_image\.k_proj\.weight"):
        video_memory_from_state_dict(broken)
    with pytest.raises(CheckpointError, match="no SAM 2 video memory in these weights"):
        video_memory_from_state_dict({k: v for k, v in kept.items() if k != "maskmem_tpos_enc"})


def test_sam2_0_memories_have_their_own_configuration():
    official = build_official_sam2("sam2_hiera_tiny", small_hiera())
    state = official.state_dict()
    config = memory_config_of({k: v for k, v in state.items() if is_memory_key(k)})
    assert config == SAM2_MEMORY
    memory = video_memory_from_state_dict(state)
    assert memory.pointer_time is None
    assert not any(n.endswith("NoObjectSpatialEmbedding") for n in map(lambda m: type(m).__name__, memory.modules()))
