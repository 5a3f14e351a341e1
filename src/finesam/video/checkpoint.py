"""A video session saved to one file and read back, so that a long propagation can stop and continue.

`save_session` writes what a propagation reads of a session besides the frames: every object's prompts, its
prompted frames' results and the tracked results the session still keeps (with `keep_memories="window"`, the few
frames behind the last one), as tensors of a safetensors file, and its layout (and the caller's own notes) as
JSON in that file's metadata: one file, written atomically, so a process killed at any moment leaves the previous
state or the new one. `restore_session` puts them into a fresh session of the same video; propagating it on from
the next frame computes what the uninterrupted propagation would have.

Only a session between propagation steps can be saved: its prompts' results already filed (no pending ones, as
after the first frame a propagation yields). The cached image features are not saved (they are recomputed).
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

from finesam.model.sam2.tracking import FrameMemory
from finesam.video.session import FrameResult, ObjectTrack, VideoSession
from finesam.weights import atomic_write

FORMAT = "finesam-video-session/1"


class _Tensors:
    """The tensors of a file being written: each under a key, copied to the CPU, none sharing memory."""

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def add(self, key: str, tensor: Tensor) -> str:
        self.tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
        return key


def _result_layout(tensors: _Tensors, prefix: str, result: FrameResult) -> dict[str, Any]:
    layout: dict[str, Any] = {
        "object_score_logits": tensors.add(f"{prefix}.object_score_logits", result.object_score_logits),
        "pointer": tensors.add(f"{prefix}.pointer", result.pointer),
        "masks": None if result.masks is None else tensors.add(f"{prefix}.masks", result.masks),
        "memory": None,
    }
    if (memory := result.memory) is not None:
        layout["memory"] = {
            "features": tensors.add(f"{prefix}.memory.features", memory.features),
            "pointer": tensors.add(f"{prefix}.memory.pointer", memory.pointer),
            "object_score_logits": tensors.add(f"{prefix}.memory.object_score_logits", memory.object_score_logits),
        }
    return layout


def save_session(session: VideoSession, path: Path, notes: dict[str, Any] | None = None) -> Path:
    """Writes the session's state (not its frames) to `path` atomically, with `notes` (JSON) beside it.

    Raises:
        ValueError: prompts given since the last propagation are not filed yet (propagate first).
        OutputError: the file cannot be written (what was there stays).
    """
    tensors = _Tensors()
    objects = []
    for obj_id, track in session.objects.items():
        if any(track.pending.values()):
            raise ValueError(f"object {obj_id} has prompts not propagated yet: a session is saved while propagating")
        prefix = f"object.{obj_id}"
        objects.append(
            {
                "id": obj_id,
                "points": {
                    str(t): [tensors.add(f"{prefix}.points.{t}", p), tensors.add(f"{prefix}.labels.{t}", labels)]
                    for t, (p, labels) in track.points.items()
                },
                "masks": {str(t): tensors.add(f"{prefix}.masks.{t}", m) for t, m in track.masks.items()},
                "conditioning": {
                    str(t): _result_layout(tensors, f"{prefix}.conditioning.{t}", r)
                    for t, r in track.conditioning.items()
                },
                "tracked": {
                    str(t): _result_layout(tensors, f"{prefix}.tracked.{t}", r) for t, r in track.tracked.items()
                },
                "directions": {str(t): reverse for t, reverse in track.directions.items()},
            }
        )
    if session.memory_positions is not None:
        tensors.add("memory_positions", session.memory_positions)
    layout = {
        "format": FORMAT,
        "num_frames": session.num_frames,
        "video_size": list(session.video_size),
        "kept": session.kept.value,
        "objects": objects,
    }
    metadata = {"layout": json.dumps(layout), "notes": json.dumps(notes or {})}
    data = save(tensors.tensors, metadata)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def read_notes(path: Path) -> dict[str, Any] | None:
    """The notes saved with a session, or None when the file is missing or not a session file of ours."""
    try:
        return _read(path)[2]
    except ValueError:
        return None


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    try:
        data = path.read_bytes()
        tensors = load(data)
        metadata = _metadata(data)
        layout, notes = json.loads(metadata["layout"]), json.loads(metadata["notes"])
    except (OSError, SafetensorError, KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a saved video session: {e}") from None
    if not isinstance(layout, dict) or layout.get("format") != FORMAT:
        raise ValueError(f"{path}: not a saved video session of this finesam ({FORMAT})")
    return tensors, layout, notes


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file in memory (its JSON header)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__") or {}


def restore_session(session: VideoSession, path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Fills a fresh session (no objects yet; the same video) with the state saved in `path`.

    Args:
        session: made by `VideoPredictor.init_state` on the same frames with the same `keep_memories`.
        path: a file of `save_session`.
        device: the predictor's model's device, where the tensors go.

    Returns:
        The notes saved with it.

    Raises:
        ValueError: the file is not a saved session, or was saved from another video or another kind of session.
    """
    tensors, layout, notes = _read(path)
    if session.objects:
        raise ValueError("a session is restored into a fresh one (no objects yet)")
    if layout["num_frames"] != session.num_frames or tuple(layout["video_size"]) != session.video_size:
        raise ValueError(f"{path}: saved from another video ({layout['num_frames']} frames of {layout['video_size']})")
    if layout["kept"] != session.kept.value:
        raise ValueError(f"{path}: saved from a session that keeps {layout['kept']!r} memories, not {session.kept}")
    positions = tensors.get("memory_positions")
    session.memory_positions = None if positions is None else positions.to(device)

    def tensor(key: str) -> Tensor:
        return tensors[key].to(device)

    def result(saved: dict[str, Any]) -> FrameResult:
        memory = None
        if (kept := saved["memory"]) is not None:
            assert session.memory_positions is not None
            memory = FrameMemory(
                tensor(kept["features"]),
                session.memory_positions,
                tensor(kept["pointer"]),
                tensor(kept["object_score_logits"]),
            )
        masks = None if saved["masks"] is None else tensor(saved["masks"])
        return FrameResult(masks, tensor(saved["object_score_logits"]), tensor(saved["pointer"]), memory)

    for saved in layout["objects"]:
        track = ObjectTrack()
        track.points = {int(t): (tensor(p), tensor(labels)) for t, (p, labels) in saved["points"].items()}
        track.masks = {int(t): tensor(m) for t, m in saved["masks"].items()}
        track.conditioning = {int(t): result(r) for t, r in saved["conditioning"].items()}
        track.tracked = {int(t): result(r) for t, r in saved["tracked"].items()}
        track.directions = {int(t): bool(reverse) for t, reverse in saved["directions"].items()}
        session.objects[int(saved["id"])] = track
    return notes
