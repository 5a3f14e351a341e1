"""`finesam track`: its palette PNGs hold what `VideoPredictor` returns through the API for the same prompts (each
pixel the object of the highest logit where that logit is > 0), for a folder of frames and for a video file; its
per-object masks, its overlays; a run killed with SIGKILL and started again writes the files of an uninterrupted
run; and its errors.

The model: a small SAM 2.1 configuration (narrow Hiera, 256 px input) with seeded random weights from the official
code, converted by our key map, its video memory kept in the file as `finesam convert` keeps it. The clip: moving
crops of a real photo, 160 x 112."""

import dataclasses
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks
from PIL import Image

from finesam.adapters.hq import hq_adapter_for
from finesam.cli.track import tracked_order
from finesam.model.config import SAMConfig
from finesam.model.sam import build_sam
from finesam.model.sam2.config import HieraConfig, SAM2DecoderConfig
from finesam.model.sam2.tracking import FrameMemory
from finesam.video.checkpoint import restore_session, save_session
from finesam.video.frames import open_frames
from finesam.video.palette import DAVIS_PALETTE
from finesam.video.predictor import VideoPredictor
from finesam.video.session import FrameResult, KeptMemories, ObjectTrack, VideoSession
from finesam.weights import load_sam, save_hq
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.loading import save_sam
from finesam.weights.sam_keys import convert_state_dict

from helpers import FINESAM_COMMAND, finesam
from official_sam2 import build_official_sam2, small_hiera
from video_clips import decoded_in_order, moving_crops, write_folder, write_video

FRAMES, WIDTH, HEIGHT = 8, 160, 112
SMALL_SAM2 = SAMConfig(
    HieraConfig(embed_dim=32, heads=1, stages=(1, 1, 2, 1), global_attention_blocks=(3,)),
    SAM2DecoderConfig(),
    image_size=256,
)
# object 1 by a box, object 2 by two clicks, object 3 by a box on a later frame (tracked from there, and before it
# from that frame's memory)
PROMPTS = [
    {"frame": 0, "object": 1, "box": [20, 10, 90, 80]},
    {"frame": 0, "object": 2, "points": [[120, 60], [60, 40]], "labels": [1, 0]},
    {"frame": 3, "object": 3, "box": [70, 30, 150, 100]},
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    official = build_official_sam2("sam2.1_hiera_tiny", {**small_hiera(), "image_size": 256})
    with torch.no_grad():  # random weights give object scores near -0.02: present objects instead
        official.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(0.05)
    state = official.state_dict()
    model = build_sam(SMALL_SAM2)
    model.load_state_dict(convert_state_dict(state, model, ignore=is_memory_key))
    kept = {key: tensor for key, tensor in state.items() if is_memory_key(key)}
    return save_sam(model.eval(), tmp_path_factory.mktemp("weights") / "sam2_small.safetensors", kept)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clip")
    frames = moving_crops(FRAMES, WIDTH, HEIGHT, step=(12, 10))
    return {
        "folder": write_folder(folder / "frames", frames, ".jpg")[0].parent,
        "video": write_video(folder / "clip.mp4", frames, gop=5),
    }


def prompts_file(folder: Path, prompts: list[dict[str, Any]], name: str = "prompts.jsonl") -> Path:
    path = folder / name
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


def expected_outputs(
    weights: Path, source: Path, prompts: list[dict[str, Any]], count: int | None = None, hq: Path | None = None
) -> dict[int, torch.Tensor]:
    """Each frame's masks (objects, 1, H, W) through the API: every prompt, then one propagation (every memory
    kept, as the official predictor does)."""
    predictor = VideoPredictor.from_weights(weights, hq=hq)
    session = predictor.init_state(source)  # a path: opened by open_frames
    for p in prompts:
        if "mask" in p:
            continue
        points = p.get("points")
        predictor.add_new_points_or_box(
            session,
            p["frame"],
            p["object"],
            points=None if points is None else np.array(points, dtype=np.float32),
            labels=None if points is None else np.array(p["labels"]),
            box=p.get("box"),
        )
    assert session.object_ids == sorted({p["object"] for p in prompts})
    tracked = predictor.propagate_in_video(session, max_frame_num_to_track=count)
    return {frame: masks for frame, _, masks in tracked}


def palette_of(masks: torch.Tensor, ids: list[int]) -> np.ndarray:
    """The object of each pixel: the highest logit's, where it is > 0."""
    logits = masks[:, 0].numpy()
    best = logits.argmax(axis=0)
    return np.where(logits.max(axis=0) > 0, np.array(ids, dtype=np.uint8)[best], 0).astype(np.uint8)


@pytest.mark.parametrize("kind", ["folder", "video"])
def test_the_palette_pngs_are_the_predictor_masks(tmp_path, weights, sources, kind):
    """The whole folder; the first frames of the video file (the same model work on other pixels)."""
    source = sources[kind]
    out = tmp_path / "out"
    count = None if kind == "folder" else 3
    limit = () if count is None else ("--max-frames", count)
    result = finesam(
        "track", source, "--weights", weights, "--prompts", prompts_file(tmp_path, PROMPTS), "--out", out,
        "--object-masks", *limit,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    tracked = FRAMES if count is None else count + 1
    assert result.stdout.startswith(f"{out}\t{tracked} frames, 3 objects")
    expected = expected_outputs(weights, source, PROMPTS, count)
    names = open_frames(source).names
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{names[f]}.png" for f in expected)
    assert len(expected) == tracked
    present = set()
    for frame, masks in expected.items():
        written = Image.open(out / f"{names[frame]}.png")
        assert written.mode == "P" and written.size == (WIDTH, HEIGHT)
        assert written.getpalette()[:12] == DAVIS_PALETTE[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
        assert np.array_equal(np.asarray(written), palette_of(masks, [1, 2, 3])), frame
        present |= set(np.unique(np.asarray(written)))
        for i, obj in enumerate([1, 2, 3]):
            mask = np.asarray(Image.open(out / str(obj) / f"{names[frame]}.png"))
            assert np.array_equal(mask, np.where(masks[i, 0].numpy() > 0, 255, 0)), (frame, obj)
    assert present == {0, 1, 2, 3}  # every object somewhere: the comparison covers them all
    record = json.loads((out / "track.json").read_text())
    assert record["complete"] and not (out / ".finesam-track").exists()
    again = finesam(
        "track", source, "--weights", weights, "--prompts", tmp_path / "prompts.jsonl", "--out", out, *limit
    )
    assert again.returncode == 2 and "differs in: object_masks" in again.stderr  # another run's folder


def test_hq_sam2_weights_are_injected(tmp_path, weights, sources):
    model = load_sam(weights)
    adapter = hq_adapter_for(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # an adapter of random weights (its HQ mask starts near 0)
        for tensor in adapter.state_dict().values():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    hq = save_hq(adapter, tmp_path / "hq.safetensors")
    out = tmp_path / "out"
    prompts = prompts_file(tmp_path, PROMPTS[:1])
    result = finesam("track", sources["folder"], "--weights", weights, "--hq", hq, "--prompts", prompts, "--out", out,
                     "--max-frames", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    with_hq = expected_outputs(weights, sources["folder"], PROMPTS[:1], 1, hq=hq)
    without = expected_outputs(weights, sources["folder"], PROMPTS[:1], 1)
    names = open_frames(sources["folder"]).names
    for frame, masks in with_hq.items():
        written = np.asarray(Image.open(out / f"{names[frame]}.png"))
        assert np.array_equal(written, palette_of(masks, [1])), frame
        assert not np.array_equal(written, palette_of(without[frame], [1])), frame  # the HQ mask counts


def test_a_palette_mask_prompt_gives_its_objects(tmp_path, weights, sources):
    """A DAVIS-style first-frame annotation (a palette PNG of two objects) as the prompt: the predictor's
    `add_new_mask` per object."""
    source = sources["folder"]
    annotation = np.zeros((HEIGHT, WIDTH), np.uint8)
    annotation[20:70, 10:60], annotation[50:100, 90:150] = 2, 5
    image = Image.fromarray(annotation, mode="P")
    image.putpalette(DAVIS_PALETTE)
    image.save(tmp_path / "first.png")
    prompts = prompts_file(tmp_path, [{"frame": 0, "mask": "first.png"}])
    out = tmp_path / "out"
    result = finesam("track", source, "--weights", weights, "--prompts", prompts, "--out", out, "--max-frames", "2")
    assert result.returncode == 0, result.stderr
    predictor = VideoPredictor.from_weights(weights)
    session = predictor.init_state(source)
    for obj in (2, 5):
        predictor.add_new_mask(session, 0, obj, annotation == obj)
    names = open_frames(source).names
    for frame, ids, masks in predictor.propagate_in_video(session, max_frame_num_to_track=2):
        assert ids == [2, 5]
        assert np.array_equal(np.asarray(Image.open(out / f"{names[frame]}.png")), palette_of(masks, ids)), frame
    assert len(list(out.glob("*.png"))) == 3


def test_overlays_as_frames_and_as_a_video(tmp_path, weights, sources):
    source = sources["video"]
    prompts = prompts_file(tmp_path, PROMPTS[:2])
    out, frames_out, video_out = tmp_path / "out", tmp_path / "overlay", tmp_path / "overlay.mp4"
    common = ("track", source, "--weights", weights, "--prompts", prompts, "--out", out)
    assert finesam(*common, "--overlay", frames_out, "--max-frames", "2").returncode == 0
    names = [f"{i:05d}.png" for i in range(3)]
    assert sorted(p.name for p in frames_out.iterdir()) == names
    first = np.asarray(Image.open(frames_out / names[0]))
    original = decoded_in_order(source)[0]
    assert first.shape == (HEIGHT, WIDTH, 3) and not np.array_equal(first, original)  # masks tinted, prompts drawn
    index = np.asarray(Image.open(out / names[0]))
    assert np.array_equal(first[index == 0][:50], original[index == 0][:50]) or (index > 0).all()
    # a finished run is not tracked again; its overlay is drawn from the PNGs
    result = finesam(*common, "--overlay", video_out, "--max-frames", "2")
    assert result.returncode == 0, result.stderr
    assert "(3 done before)" in result.stdout
    decoded = decoded_in_order(video_out)
    assert len(decoded) == 3 and decoded[0].shape == (HEIGHT, WIDTH, 3)
    drawn = [np.asarray(Image.open(frames_out / name)).astype(int) for name in names]
    for i, frame in enumerate(decoded):  # each the overlay frame of its index, through a lossy codec
        errors = [np.abs(frame - picture).mean() for picture in drawn]
        assert errors[i] < 16 and errors[i] == min(errors), errors


def test_a_run_killed_with_sigkill_resumes_to_identical_files(tmp_path, weights, sources):
    source = sources["folder"]
    prompts = prompts_file(tmp_path, PROMPTS[:2])
    args = ["track", source, "--weights", weights, "--prompts", prompts, "--object-masks", "--save-every", "2"]
    whole = tmp_path / "whole"
    assert finesam(*args, "--out", whole).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*FINESAM_COMMAND, *map(str, args), "--out", str(killed)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = killed / ".finesam-track" / "session.safetensors"
    deadline = time.monotonic() + 240
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr
    written = len(list(killed.glob("*.png")))
    assert 2 <= written < FRAMES and not json.loads((killed / "track.json").read_text())["complete"]
    resumed = finesam(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "done before" in resumed.stdout
    files = sorted(p.relative_to(whole) for p in whole.rglob("*.png"))
    assert files == sorted(p.relative_to(killed) for p in killed.rglob("*.png")) and len(files) == 3 * FRAMES
    assert all((whole / p).read_bytes() == (killed / p).read_bytes() for p in files)
    assert (whole / "track.json").read_bytes() == (killed / "track.json").read_bytes()
    assert not list(killed.rglob("*.tmp")) and not (killed / ".finesam-track").exists()


BAD_PROMPTS = [
    ([{"frame": 99, "object": 1, "box": [1, 1, 20, 20]}], "line 1: frame 99 does not exist: "),
    ([{"frame": 0, "object": 0, "box": [1, 1, 20, 20]}], '"object" must be a whole number from 1 to 255'),
    ([{"frame": 0, "object": "1", "box": [1, 1, 20, 20]}], '"object" must be a whole number from 1 to 255'),
    ([{"frame": 0, "object": True, "box": [1, 1, 20, 20]}], '"object" must be a whole number from 1 to 255'),
    ([{"frame": 0, "object": 1.5, "box": [1, 1, 20, 20]}], '"object" must be a whole number from 1 to 255'),
    ([{"frame": 0, "box": [1, 1, 20, 20]}], '"object" is missing'),
    ([{"object": 1, "box": [1, 1, 20, 20]}], '"frame" is missing'),
    ([{"frame": -1, "object": 1, "box": [1, 1, 20, 20]}], '"frame" must be a whole number, 0 or more'),
    ([{"frame": 0, "object": 1, "labels": [1]}], '"labels" were given without "points"'),
    ([{"frame": 0, "object": 1, "boxes": [[1, 1, 9, 9], [2, 2, 9, 9]]}], "one object per line"),
    ([{"frame": 0, "object": 1, "box": [1, 1, 9, 9], "clicks": []}], "unknown keys ['clicks']"),
    ([{"frame": 0, "object": 1, "points": [[500, 20]]}], "line 1: points lie outside the 160x112 image"),
    (
        [{"frame": 2, "object": 1, "box": [1, 1, 9, 9]}, {"frame": 2, "object": 1, "points": [[5, 5]]}],
        "line 2: object 1 already has a prompt on frame 2 (line 1)",
    ),
    ([{"frame": 0, "object": 1, "mask": "missing.png"}], "missing.png: no such file"),
    ([{"frame": 0, "object": 1, "mask": "small.png"}], "small.png is 8 x 8, the video 160 x 112"),
    ([{"frame": 0, "object": 1, "mask": "small.png", "box": [1, 1, 9, 9]}], 'give "mask" or points / a box'),
]


@pytest.mark.parametrize(("prompts", "message"), BAD_PROMPTS)
def test_bad_prompts_are_refused_before_the_model_loads(tmp_path, sources, prompts, message):
    Image.new("L", (8, 8), 255).save(tmp_path / "small.png")
    path = prompts_file(tmp_path, prompts)
    result = finesam("track", sources["folder"], "--weights", tmp_path / "none.safetensors", "--prompts", path,
                     "--out", tmp_path / "out")  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


def test_other_errors(tmp_path, weights, sources):
    prompts = prompts_file(tmp_path, PROMPTS[:1])

    def track(source: Path, out: Path, *extra: object, prompts: Path = prompts) -> subprocess.CompletedProcess[str]:
        return finesam("track", source, "--weights", weights, "--prompts", prompts, "--out", out, *extra)

    (tmp_path / "empty.jsonl").write_text("\n  \n")
    result = track(sources["folder"], tmp_path / "out", prompts=tmp_path / "empty.jsonl")
    assert result.returncode == 2 and "no prompt" in result.stderr
    (tmp_path / "broken.jsonl").write_text('{"frame": 0,\n')
    result = track(sources["folder"], tmp_path / "out", prompts=tmp_path / "broken.jsonl")
    assert result.returncode == 2 and "line 1: not JSON" in result.stderr
    (tmp_path / "notes.mp4").write_text("not a video\n" * 10)
    result = track(tmp_path / "notes.mp4", tmp_path / "out")
    assert result.returncode == 2 and "not a video file FFmpeg reads" in result.stderr
    result = track(sources["folder"], sources["folder"])
    assert result.returncode == 2 and "holds the frames: write the results in another folder" in result.stderr
    taken = tmp_path / "taken"
    taken.mkdir()
    Image.new("P", (WIDTH, HEIGHT)).save(taken / "00003.png")
    result = track(sources["folder"], taken)
    assert result.returncode == 2 and "holds 00003.png, which this run would replace" in result.stderr
    out = tmp_path / "out"
    result = track(sources["folder"], out, "--overlay", out)
    assert result.returncode == 2 and "the masks are written there" in result.stderr
    result = track(sources["folder"], out, "--start-frame", "20")
    assert result.returncode == 2 and "--start-frame 20: the video has 8 frames" in result.stderr
    result = track(sources["folder"], out, "--hq-only")
    assert result.returncode == 2 and "--hq-only" in result.stderr
    assert not out.exists()


def test_the_frames_tracked():
    assert tracked_order(10, [3, 5], None, None, False) == list(range(3, 10))
    assert tracked_order(10, [3, 5], None, 2, False) == [3, 4, 5]
    assert tracked_order(10, [3, 5], 6, None, True) == [6, 5, 4, 3, 2, 1, 0]
    assert tracked_order(10, [0], None, None, True) == []  # as the predictor: nothing before the first frame


def test_a_saved_session_reads_back_exactly(tmp_path):
    """`save_session` / `restore_session` on a session of made-up tensors: every tensor, dtype and shape back (a
    forgotten memory's empty features, a forgotten mask's None, the one copy of the memory positions); a session
    with prompts not propagated yet, and one of another video, are refused."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    frames = [Image.new("RGB", (32, 24))] * 5
    session = VideoSession(frames, (24, 32), KeptMemories.WINDOW, memory_positions=rand(1, 4, 2, 2))

    def result(masks: bool = True, features: torch.Tensor | None = None) -> FrameResult:
        pointer, score = rand(1, 8), rand(1, 1)
        features = rand(1, 4, 2, 2, dtype=torch.bfloat16) if features is None else features
        memory = FrameMemory(features, session.memory_positions, pointer, score)  # type: ignore[arg-type]
        return FrameResult(rand(1, 1, 8, 8) if masks else None, score, pointer, memory)

    track = ObjectTrack(points={0: (rand(1, 3, 2), torch.tensor([[2, 3, 1]], dtype=torch.int32))})
    track.conditioning[0] = result()
    track.tracked = {1: result(masks=False, features=torch.empty(0, dtype=torch.bfloat16)), 2: result()}
    track.directions = {0: False, 1: False, 2: False}
    other = ObjectTrack(masks={3: rand(1, 1, 16, 16).gt(0).float()})
    other.conditioning[3] = result()
    session.objects = {4: track, 9: other}
    path = save_session(session, tmp_path / "s.safetensors", {"done": 3})

    restored = VideoSession(frames, (24, 32), KeptMemories.WINDOW)
    assert restore_session(restored, path) == {"done": 3}
    assert list(restored.objects) == [4, 9]

    def same(a: Any, b: Any) -> None:
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        elif isinstance(a, dict):
            assert list(a) == list(b)
            for key in a:
                same(a[key], b[key])
        elif isinstance(a, (tuple, list)):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                same(x, y)
        elif dataclasses.is_dataclass(a):
            for field in dataclasses.fields(a):
                same(getattr(a, field.name), getattr(b, field.name))
        else:
            assert a == b

    for obj in (4, 9):
        same(session.objects[obj], restored.objects[obj])
    same(session.memory_positions, restored.memory_positions)
    assert restored.objects[4].tracked[2].memory.positions is restored.memory_positions  # type: ignore[union-attr]

    with pytest.raises(ValueError, match="another video"):
        restore_session(VideoSession(frames[:4], (24, 32), KeptMemories.WINDOW), path)
    track.pending[True][4] = result()
    with pytest.raises(ValueError, match="prompts not propagated yet"):
        save_session(session, tmp_path / "pending.safetensors")
