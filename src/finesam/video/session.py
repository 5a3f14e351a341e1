"""The state of one video in the video predictor: its frames (decoded when needed), the objects, their prompts and
what each frame left to each object's memory.

    VideoSession
    ├── frames            any Sequence of PIL images, indexed when a frame's features are needed
    ├── features          the image features of one frame only (the latest computed)
    └── objects           obj_id -> ObjectTrack (in the order they were added)
        ├── points / masks        the prompts, by frame
        ├── conditioning          prompted frames' results (each with its memory)
        ├── tracked               propagated (or corrected) frames' results
        ├── pending               results of prompts given since the last propagation (no memory yet)
        └── directions            frame -> tracked backwards (reverse) or forwards

Every object is tracked on its own (its own memory bank and conditioning frames), as sam2 1.1.0's
`SAM2VideoPredictor` does; a frame's objects are put together only for output.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from PIL import Image
from torch import Tensor

from finesam.model.sam2.tracking import FrameFeatures, FrameMemory, MemoryBank


class KeptMemories(str, Enum):
    """What a session keeps of the frames it tracked.

    ALL: every frame's result (as the official predictor): later prompts, corrections and propagations see
        everything tracked so far.
    WINDOW: streaming: while propagating, a tracked frame's memory and mask are forgotten once no later frame of
        that propagation reads them (beyond the `num_maskmem - 1` previous frames, times the memory stride), and
        its pointer once beyond the `max_pointers - 1` previous frames; prompted frames are always kept. The
        session's size does not grow with the video's length, and one propagation gives the masks of ALL.
    """

    ALL = "all"
    WINDOW = "window"


@dataclass(frozen=True)
class FrameResult:
    """What one frame gave one object.

    Attributes:
        masks: the low-resolution mask logits (1, 1, low, low), holes filled (None once forgotten).
        object_score_logits: > 0 where the object is present (1, 1).
        pointer: the object pointer (1, dim).
        memory: the frame's memory (features stored in bfloat16, as the official predictor stores them), or None
            until the memory encoder has run.
    """

    masks: Tensor | None
    object_score_logits: Tensor
    pointer: Tensor
    memory: FrameMemory | None = None


@dataclass
class ObjectTrack:
    """One object's prompts and results."""

    points: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)  # (1, n, 2) model pixels, (1, n)
    masks: dict[int, Tensor] = field(default_factory=dict)  # (1, 1, size, size), 0 / 1
    conditioning: dict[int, FrameResult] = field(default_factory=dict)
    tracked: dict[int, FrameResult] = field(default_factory=dict)
    pending: dict[bool, dict[int, FrameResult]] = field(default_factory=lambda: {True: {}, False: {}})
    directions: dict[int, bool] = field(default_factory=dict)

    def bank(self) -> MemoryBank:
        """The memory bank the tracking step reads (the results that have a memory)."""
        return MemoryBank(
            conditioning={t: r.memory for t, r in self.conditioning.items() if r.memory is not None},
            tracked={t: r.memory for t, r in self.tracked.items() if r.memory is not None},
        )

    def latest(self, frame: int, conditioning: bool) -> FrameResult | None:
        """The frame's latest result: a pending one of that kind first, then a stored one."""
        found = self.pending[conditioning].get(frame)
        if found is None:
            found = self.conditioning.get(frame)
        if found is None:
            found = self.tracked.get(frame)
        return found

    def clear(self) -> None:
        for container in (self.points, self.masks, self.conditioning, self.tracked, self.directions):
            container.clear()
        for pending in self.pending.values():
            pending.clear()


@dataclass
class VideoSession:
    """One video's state (`VideoPredictor.init_state` makes it).

    Attributes:
        frames: the frames, indexed when needed (a list of images, or a lazy Sequence that decodes them).
        video_size: (height, width) of the frames: the size of the returned masks.
        kept: what is kept of tracked frames (`KeptMemories`).
        objects: obj_id -> the object's prompts and results, in the order the objects were added.
        features: (frame index, its features): the one frame whose features are cached.
        memory_positions: the memory's position encoding, the same for every frame (one copy).
    """

    frames: Sequence[Image.Image]
    video_size: tuple[int, int]
    kept: KeptMemories = KeptMemories.ALL
    objects: dict[int, ObjectTrack] = field(default_factory=dict)
    features: tuple[int, FrameFeatures] | None = None
    memory_positions: Tensor | None = None

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    @property
    def object_ids(self) -> list[int]:
        return list(self.objects)

    def track(self, obj_id: int) -> ObjectTrack:
        """The object's track; an error naming the known ids for an unknown one."""
        if obj_id not in self.objects:
            raise ValueError(f"no object with id {obj_id} in this session (its objects: {self.object_ids})")
        return self.objects[obj_id]

    def stored(self) -> tuple[int, int]:
        """How many frame results the session holds (over all objects, pending ones included) and the bytes of
        the distinct tensors they and the cached features hold."""
        tensors: dict[int, Tensor] = {}
        entries = 0

        def add(*values: Tensor | None) -> None:
            for value in values:
                if value is not None:
                    tensors[value.untyped_storage().data_ptr()] = value

        for track in self.objects.values():
            results = [*track.conditioning.values(), *track.tracked.values()]
            results += [r for pending in track.pending.values() for r in pending.values()]
            entries += len(results)
            for result in results:
                add(result.masks, result.object_score_logits, result.pointer)
                if result.memory is not None:
                    add(result.memory.features, result.memory.positions)
            for points, labels in track.points.values():
                add(points, labels)
            add(*track.masks.values())
        if self.features is not None:
            add(self.features[1].embedding, *self.features[1].high_res)
        return entries, sum(t.untyped_storage().nbytes() for t in tensors.values())


def empty_features(device: torch.device) -> Tensor:
    """A zero-size tensor standing for memory features that were forgotten (never read again)."""
    return torch.empty(0, device=device, dtype=torch.bfloat16)
