"""SAM 2's per-frame tracking step against Meta's `sam2` 1.1.0 `SAM2Base.track_step`: a conditioning frame with
clicks, then frames tracked from the memory bank, for two objects; and the choice of memories and pointers
(`_prepare_memory_conditioned_features`) on a long bank, forwards and backwards, with the options that limit it.

Our model and memory come from the file our converter wrote from the official checkpoint (SAM 2.1 Hiera-T
configuration with the video predictor's settings, seeded and perturbed weights); the frame features are random,
at the real shapes of `sam2.1_hiera_tiny`."""

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks
from torch import Tensor

from finesam.fast.swap import is_fast
from finesam.model.sam2.memory_config import SAM2MemoryConfig
from finesam.model.sam2.sam2 import SegmentAnything2
from finesam.model.sam2.tracking import FrameFeatures, FrameMemory, MemoryBank, SAM2Tracker, encode_frame
from finesam.model.sam2.video_memory import SAM2VideoMemory
from finesam.weights.loading import convert_checkpoint, load_sam
from finesam.weights.sam2_memory import load_video_memory, video_memory_from_state_dict

from conftest import PHOTOS, max_diff
from official_sam2 import build_official_sam2

# largest absolute difference allowed on what a tracked frame gives (float32, CPU): mask logits (O(10), and
# the memory attention and decoder between the features and them), pointers, object scores, memories
TOLERANCE = 1e-4
# the memory-conditioned features alone (the memory attention's output, after its final norm: O(1))
FEATURE_TOLERANCE = 1e-5
# the image encoder's features (Hiera-T on a real photo, as tests/test_sam2.py states it)
ENCODER_TOLERANCE = 1e-4

GRID, DIM = 64, 256


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The official model (the video predictor's settings) and the file our converter wrote from it."""
    official = build_official_sam2("sam2.1_hiera_tiny", {"binarize_mask_from_pts_for_mem_enc": True})
    with torch.no_grad():  # random weights give object scores near -0.02: both signs on the first frame instead
        official.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(0.012)
    folder: Path = tmp_path_factory.mktemp("sam2_tracking")
    torch.save({"model": official.state_dict()}, folder / "sam2.1_hiera_tiny.pt")
    return official, convert_checkpoint(folder / "sam2.1_hiera_tiny.pt", folder / "converted").written[0]


def _tracker(path: Path, fast: bool) -> SAM2Tracker:
    model = load_sam(path, fast=fast)
    assert isinstance(model, SegmentAnything2)
    return SAM2Tracker(model, load_video_memory(path))


@pytest.fixture(scope="module")
def models(converted: tuple[Any, Path]) -> tuple[Any, SAM2Tracker]:
    """The official model and our tracker on the reference chains."""
    official, path = converted
    return official, _tracker(path, fast=False)


@pytest.fixture(scope="module")
def fast_models(converted: tuple[Any, Path]) -> tuple[Any, SAM2Tracker]:
    """The same with the fast paths of inference (what `load_sam` gives by default)."""
    official, path = converted
    tracker = _tracker(path, fast=True)
    assert any(is_fast(m) for m in tracker.model.modules())
    return official, tracker


def _features(batch: int, grid: int, seed: int) -> FrameFeatures:
    generator = torch.Generator().manual_seed(seed)
    return FrameFeatures(
        torch.randn(batch, DIM, grid, grid, generator=generator),
        (
            torch.randn(batch, DIM // 8, 4 * grid, 4 * grid, generator=generator),
            torch.randn(batch, DIM // 4, 2 * grid, 2 * grid, generator=generator),
        ),
    )


def _official_inputs(official: Any, features: FrameFeatures) -> tuple[list, list, list]:
    """`track_step`'s flattened (HW, B, C) features of the three levels, their positions (the neck's sine
    encoding) and sizes."""
    maps = [*features.high_res, features.embedding]
    positions = [official.image_encoder.neck.position_encoding(m[:, :1].expand(-1, DIM, -1, -1)) for m in maps]
    flat = [m.flatten(2).permute(2, 0, 1) for m in maps]
    return flat, [p.flatten(2).permute(2, 0, 1) for p in positions], [tuple(m.shape[-2:]) for m in maps]


def _compare(official_out: dict[str, Any], ours: Any) -> dict[str, float]:
    assert ours.memory is not None
    diffs = {
        "low_res": max_diff(ours.low_res_masks, official_out["pred_masks"]),
        "high_res": max_diff(ours.high_res_masks, official_out["pred_masks_high_res"]),
        "pointer": max_diff(ours.pointer, official_out["obj_ptr"]),
        "object_score": max_diff(ours.object_score_logits, official_out["object_score_logits"]),
        "memory": max_diff(ours.memory.features, official_out["maskmem_features"]),
        "memory_positions": max_diff(ours.memory.positions, official_out["maskmem_pos_enc"][-1]),
    }
    assert all(d <= TOLERANCE for d in diffs.values()), diffs
    return diffs


@torch.no_grad()
def test_a_conditioning_frame_and_two_tracked_frames_match_the_official_track_step(models):
    """Forwards; the backward choice of memories and pointers is tested on its own below (a 64 x 64 step costs
    seconds on a CPU)."""
    official, tracker = models
    num_frames, batch = 3, 2
    clicks = torch.tensor([[[300.0, 420.0]], [[700.0, 150.0]]])  # one click per object: multimask output
    labels = torch.ones(batch, 1, dtype=torch.long)
    official_bank: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    bank = MemoryBank()
    for frame in range(num_frames):
        conditioning = frame == 0
        features = _features(batch, GRID, seed=10 + frame)
        flat, positions, sizes = _official_inputs(official, features)
        point_inputs = {"point_coords": clicks, "point_labels": labels.int()} if conditioning else None
        expected = official.track_step(
            frame, conditioning, flat, positions, sizes, point_inputs, None, official_bank, num_frames
        )
        ours = tracker.track_step(
            frame,
            conditioning,
            features,
            bank,
            num_frames,
            points=clicks if conditioning else None,
            labels=labels if conditioning else None,
        )
        _compare(expected, ours)
        scores = expected["object_score_logits"].flatten()
        assert (scores.abs() > 1e-3).all()  # no object near the presence threshold
        if conditioning:  # one object present, one absent (its mask -1024, its pointer and memory marked)
            assert scores[0] < 0 < scores[1] and (ours.low_res_masks[0] == -1024).all()
        assert ours.memory is not None
        official_bank["cond_frame_outputs" if conditioning else "non_cond_frame_outputs"][frame] = expected
        (bank.conditioning if conditioning else bank.tracked)[frame] = ours.memory
    assert len(bank.tracked) == 2


@torch.no_grad()
def test_a_given_mask_then_a_correction_with_the_previous_logits_match_the_official_track_step(fast_models):
    """Frame 0: a mask per object (the second empty: absent) is the output as it is; frame 1: clicks on a tracked
    frame, decoded with that frame's previous logits (a correction). On the fast paths."""
    official, tracker = fast_models
    num_frames, batch = 2, 2
    masks = torch.zeros(batch, 1, 16 * GRID, 16 * GRID)
    masks[0, :, 200:600, 300:700] = 1.0
    official_bank: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    features = _features(batch, GRID, seed=30)
    flat, positions, sizes = _official_inputs(official, features)
    expected = official.track_step(0, True, flat, positions, sizes, None, masks, official_bank, num_frames)
    ours = tracker.track_step(0, True, features, MemoryBank(), num_frames, mask=masks)
    _compare(expected, ours)
    assert ours.object_score_logits.flatten().tolist() == [10.0, -10.0]
    assert max_diff(ours.iou_predictions, torch.ones(batch, 1)) == 0
    official_bank["cond_frame_outputs"][0] = expected
    assert ours.memory is not None
    bank = MemoryBank(conditioning={0: ours.memory})
    features = _features(batch, GRID, seed=31)
    flat, positions, sizes = _official_inputs(official, features)
    clicks = torch.tensor([[[500.0, 400.0], [100.0, 900.0]], [[650.0, 320.0], [20.0, 40.0]]])
    labels = torch.tensor([[1, 0], [1, 1]])
    previous = torch.randn(batch, 1, 4 * GRID, 4 * GRID, generator=torch.Generator().manual_seed(32)) * 5
    point_inputs = {"point_coords": clicks, "point_labels": labels.int()}
    expected = official.track_step(
        1, False, flat, positions, sizes, point_inputs, None, official_bank, num_frames, prev_sam_mask_logits=previous
    )
    ours = tracker.track_step(1, False, features, bank, num_frames, clicks, labels, previous_logits=previous)
    _compare(expected, ours)
    with pytest.raises(ValueError, match="a given mask is the frame's output: it takes no points"):
        tracker.track_step(1, False, features, bank, num_frames, clicks, labels, mask=masks)
    with pytest.raises(ValueError, match="previous logits are decoded again with new points"):
        tracker.track_step(1, False, features, bank, num_frames, previous_logits=previous)


def _random_memory(batch: int, grid: int, generator: torch.Generator) -> tuple[FrameMemory, dict[str, Any]]:
    features = torch.randn(batch, 64, grid, grid, generator=generator)
    positions = torch.randn(batch, 64, grid, grid, generator=generator)
    pointer = torch.randn(batch, DIM, generator=generator)
    scores = torch.ones(batch, 1)
    official = {"maskmem_features": features, "maskmem_pos_enc": [positions], "obj_ptr": pointer}
    return FrameMemory(features, positions, pointer, scores), official


def _conditioned_features(official: Any, tracker: SAM2Tracker, frame: int, reverse: bool) -> tuple[Tensor, Tensor]:
    """Both memory-conditioned features of `frame` with a 20-frame bank (conditioning frames 0, 6 and 16, every
    other frame tracked) of random memories and pointers on a small grid."""
    generator = torch.Generator().manual_seed(frame)
    grid, batch, num_frames = 8, 1, 20
    bank = MemoryBank()
    official_bank: dict[str, dict[int, Any]] = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    for t in range(num_frames):
        if t == frame:
            continue
        ours, theirs = _random_memory(batch, grid, generator)
        conditioning = t in (0, 6, 16)
        (bank.conditioning if conditioning else bank.tracked)[t] = ours
        official_bank["cond_frame_outputs" if conditioning else "non_cond_frame_outputs"][t] = theirs
    features = _features(batch, grid, seed=99)
    flat, positions, sizes = _official_inputs(official, features)
    expected = official._prepare_memory_conditioned_features(
        frame, False, flat[-1:], positions[-1:], sizes[-1:], official_bank, num_frames, reverse
    )
    return tracker.memory_conditioned(frame, False, features, bank, num_frames, reverse), expected


@torch.no_grad()
@pytest.mark.parametrize(
    ("frame", "reverse", "max_conditioning", "stride"),
    [(12, False, -1, 1), (3, True, -1, 1), (12, False, 2, 1), (12, False, -1, 3), (5, True, 2, 2)],
    ids=["forward", "reverse", "two-conditioning-frames", "stride-3", "reverse-limited-stride-2"],
)
def test_the_memories_and_pointers_a_frame_attends_to_are_the_official_ones(
    models, frame, reverse, max_conditioning, stride
):
    official, tracker = models
    saved = official.max_cond_frames_in_attn, official.memory_temporal_stride_for_eval
    official.max_cond_frames_in_attn, official.memory_temporal_stride_for_eval = max_conditioning, stride
    tracker.max_conditioning_frames, tracker.memory_stride = max_conditioning, stride
    try:
        ours, expected = _conditioned_features(official, tracker, frame, reverse)
    finally:
        official.max_cond_frames_in_attn, official.memory_temporal_stride_for_eval = saved
        tracker.max_conditioning_frames, tracker.memory_stride = -1, 1
    assert max_diff(ours, expected) <= FEATURE_TOLERANCE


# pointer options of SAM2Base that no 2.1 release changes: (official attribute changes, our config changes)
POINTER_OPTIONS: dict[str, tuple[dict[str, bool], dict[str, bool]]] = {
    # distances differ in sign only for conditioning frames in the future (frame 16 for frame 12)
    "unsigned-distances": (
        {"use_signed_tpos_enc_to_obj_ptrs": False, "only_obj_ptrs_in_the_past_for_eval": False},
        {"signed_pointer_time": False, "only_past_pointers": False},
    ),
    "future-conditioning-pointers": ({"only_obj_ptrs_in_the_past_for_eval": False}, {"only_past_pointers": False}),
    "no-pointer-time (2.0)": (
        {"add_tpos_enc_to_obj_ptrs": False, "proj_tpos_enc_in_obj_ptrs": False},
        {"pointer_time_encoding": False, "pointer_time_projection": False},
    ),
}


@torch.no_grad()
@pytest.mark.parametrize("option", list(POINTER_OPTIONS))
def test_the_pointer_options_match_the_official_ones(models, option):
    official, tracker = models
    changes, ours_changes = POINTER_OPTIONS[option]
    state = {
        k: v
        for k, v in official.state_dict().items()
        if ours_changes.get("pointer_time_projection", True) or not k.startswith("obj_ptr_tpos_proj.")
    }
    memory = video_memory_from_state_dict(state, config=dataclasses.replace(tracker.memory.config, **ours_changes))
    saved = {name: getattr(official, name) for name in changes}
    for name, value in changes.items():
        setattr(official, name, value)
    try:
        ours, expected = _conditioned_features(official, SAM2Tracker(tracker.model, memory), 12, reverse=False)
    finally:
        for name, value in saved.items():
            setattr(official, name, value)
    assert max_diff(ours, expected) <= FEATURE_TOLERANCE
    default, _ = _conditioned_features(official, tracker, 12, reverse=False)
    assert max_diff(default, ours) > 1e-4  # the option changes what the frame sees


@torch.no_grad()
def test_frame_features_are_the_official_backbone_features(models):
    official, tracker = models
    pixels, _ = tracker.model.preprocess(PHOTOS["square"]())
    features = encode_frame(tracker.model, pixels)
    _, flat, _, sizes = official._prepare_backbone_features(official.forward_image(pixels))
    expected = [f.permute(1, 2, 0).reshape(1, -1, *size) for f, size in zip(flat, sizes, strict=True)]
    assert features.embedding.shape == (1, DIM, GRID, GRID)
    assert max_diff(features.embedding, expected[2]) <= ENCODER_TOLERANCE
    assert max_diff(features.high_res[0], expected[0]) <= ENCODER_TOLERANCE
    assert max_diff(features.high_res[1], expected[1]) <= ENCODER_TOLERANCE
    assert all(v is None for v in tracker.model.use_context("image").values())  # nothing left behind


@torch.no_grad()
def test_tracking_without_a_conditioning_frame_is_refused(models):
    _, tracker = models
    with pytest.raises(ValueError, match="frame 3 is tracked without any conditioning frame"):
        tracker.track_step(3, False, _features(1, 8, seed=0), MemoryBank(), 10)


def test_the_tracker_refuses_a_memory_of_another_width(models):
    _, tracker = models
    with pytest.raises(ValueError, match="the memory's width 128 is not the model's 256"):
        SAM2Tracker(tracker.model, SAM2VideoMemory(SAM2MemoryConfig(dim=128, memory_dim=64)))
