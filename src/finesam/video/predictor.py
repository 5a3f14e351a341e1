"""`VideoPredictor`: SAM 2 / SAM 2.1 (and HQ-SAM 2, LoRA) on videos, with the operations and the results of sam2
1.1.0's `SAM2VideoPredictor`.

    init_state(frames)                    a session: the frames (decoded when needed), no objects yet
    add_new_points_or_box / add_new_mask  a prompt for one object on one frame -> that frame's masks (all objects)
    propagate_in_video                    every object tracked on its own through the frames -> masks per frame
    clear_all_prompts_in_frame, remove_object, reset_state

A prompted frame is decoded at once without memory (a first prompt: a conditioning frame) or with the frame's
earlier logits (a correction on a tracked frame); its memory is encoded when propagation starts. Propagation runs
`SAM2Tracker.track_step` per frame and object, from the earliest prompted frame; masks come back as
(objects, 1, H, W) float32 logits at the video's size (> 0: the object).
"""

import dataclasses
import operator
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from finesam.adapters.hq.adapter import hq_mask_only_set_to
from finesam.adapters.hq.layers import HQRule
from finesam.model.sam2.memory_encoder import NonOverlappingMasks
from finesam.model.sam2.processing import fill_holes_and_sprinkles, video_frame_input
from finesam.model.sam2.sam2 import LOW_RES_LIMIT, SegmentAnything2
from finesam.model.sam2.tracking import FrameFeatures, FrameMemory, FrameOutput, SAM2Tracker, encode_frame
from finesam.model.sam2.video_memory import SAM2VideoMemory
from finesam.video.frames import open_frames
from finesam.video.session import FrameResult, KeptMemories, ObjectTrack, VideoSession, empty_features

# the logit of an object on a frame where it has no result (official `NO_OBJ_SCORE`)
NO_OBJECT_LOGIT = -1024.0
# the logit the video predictor gives the pixels of a filled hole (official `fill_holes_in_mask_scores`)
FILLED_HOLE_LOGIT = 0.1

FrameMasks = tuple[int, list[int], Tensor]


def _index(session: VideoSession, frame_idx: int) -> int:
    try:
        frame_idx = operator.index(frame_idx)  # ints, numpy's integers
    except TypeError:
        raise TypeError(f"a frame index is an integer, got {frame_idx!r}") from None
    if not 0 <= frame_idx < session.num_frames:
        raise IndexError(f"frame {frame_idx} is out of range: the video has {session.num_frames} frames")
    return frame_idx


def _sam_plus_hq(model: SegmentAnything2) -> AbstractContextManager[None]:
    """With an HQ adapter injected, its masks are SAM's plus the HQ mask (the video path of HQ-SAM 2 has no
    `hq_token_only`)."""
    return hq_mask_only_set_to(model, False) if model.find(HQRule) is not None else nullcontext()


class VideoPredictor:
    """Tracks objects through a video with a SAM 2 / SAM 2.1 model and its video memory (sam2 1.1.0's
    `SAM2VideoPredictor`: the same operations, options and results).

    Attributes:
        tracker: the per-frame tracking step (the model, with any adapter injected, and the memory).
        fill_hole_area: background regions of a low-resolution mask up to this many pixels become foreground
            (logit 0.1; 0: off). 8, as `build_sam2_video_predictor` sets it.
        non_overlap_masks: in the returned masks, a pixel stays only in the object with the highest logit.
        clear_non_cond_mem_around_input: a prompted frame clears its object's tracked memories within
            `num_maskmem` frames (times the memory stride) around it.
        add_all_frames_to_correct_as_cond: a corrected (already tracked) frame becomes a conditioning frame.
    """

    def __init__(
        self,
        model: SegmentAnything2,
        memory: SAM2VideoMemory,
        fill_hole_area: int = 8,
        non_overlap_masks: bool = False,
        clear_non_cond_mem_around_input: bool = False,
        add_all_frames_to_correct_as_cond: bool = False,
    ) -> None:
        if not isinstance(model, SegmentAnything2):
            raise TypeError(f"the video predictor needs a SegmentAnything2 (SAM 2 / 2.1), got {type(model).__name__}")
        self.tracker = SAM2Tracker(model, memory)
        self.fill_hole_area = fill_hole_area
        self.non_overlap_masks = non_overlap_masks
        self.clear_non_cond_mem_around_input = clear_non_cond_mem_around_input
        self.add_all_frames_to_correct_as_cond = add_all_frames_to_correct_as_cond

    @classmethod
    def from_weights(
        cls,
        path: str | Path,
        hq: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> "VideoPredictor":
        """A predictor from a converted SAM 2 / 2.1 file (or an official `.pt`), with HQ-SAM 2 injected when `hq`
        names its weights; `dtype` is the image encoder's (`load_sam`); `options` are the predictor's."""
        from finesam.weights.hq import load_hq
        from finesam.weights.loading import load_sam
        from finesam.weights.sam2_memory import load_video_memory

        model = load_sam(path, device=device, dtype=dtype)
        if not isinstance(model, SegmentAnything2):
            raise ValueError(f"{path}: video tracking needs SAM 2 / 2.1 weights, not {type(model).__name__}")
        if hq is not None:
            load_hq(model, hq).inject()
        return cls(model, load_video_memory(path, device=device), **options)

    @property
    def model(self) -> SegmentAnything2:
        model = self.tracker.model
        assert isinstance(model, SegmentAnything2)
        return model

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    # -- sessions ---------------------------------------------------------------------------------------------

    def init_state(
        self, frames: Sequence[Image.Image] | str | Path, keep_memories: KeptMemories | str = KeptMemories.ALL
    ) -> VideoSession:
        """A session on a video.

        Args:
            frames: the video's frames: any Sequence of PIL images (a list, or a lazy sequence that decodes a
                frame when it is indexed); each is indexed when its features are needed. A path (a video file or a
                folder of JPEG / PNG frames) is opened with `finesam.video.frames.open_frames`.
            keep_memories: "all" (every tracked frame's result is kept, as official) or "window" (streaming:
                see `KeptMemories`).
        """
        frames = self._frames(frames)
        if len(frames) == 0:
            raise ValueError("the video has no frames")
        first = frames[0]
        if not isinstance(first, Image.Image):
            raise TypeError(f"video frames are PIL images, got {type(first).__name__}")
        try:
            kept = KeptMemories(keep_memories)
        except ValueError:
            raise ValueError(
                f"keep_memories is one of {[k.value for k in KeptMemories]}, got {keep_memories!r}"
            ) from None
        return VideoSession(frames, (first.height, first.width), kept)

    def _frames(self, frames: Sequence[Image.Image] | str | Path) -> Sequence[Image.Image]:
        """The frames of a video source (the one place where a path to a folder or a video file is opened)."""
        if isinstance(frames, (str, Path)):
            return open_frames(frames)
        return frames

    def reset_state(self, session: VideoSession) -> None:
        """Removes every object, prompt and result (the frames stay)."""
        for track in session.objects.values():
            track.clear()
        session.objects.clear()

    # -- prompts ----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def add_new_points_or_box(
        self,
        session: VideoSession,
        frame_idx: int,
        obj_id: int,
        points: Any = None,
        labels: Any = None,
        clear_old_points: bool = True,
        normalize_coords: bool = True,
        box: Any = None,
    ) -> FrameMasks:
        """Clicks (labels 1 / 0) and / or a box (x0, y0, x1, y1) for one object on one frame, in video pixels
        (with `normalize_coords=False`: already divided by the video's width and height, as official).

        Returns:
            The frame, every object id, and the frame's masks of every object (objects, 1, H, W).
        """
        frame_idx = _index(session, frame_idx)
        if (points is None) != (labels is None):
            raise ValueError("points and labels go together: give both or neither")
        if points is None and box is None:
            raise ValueError("give points (with labels) or a box")
        coords = torch.zeros(1, 0, 2) if points is None else torch.as_tensor(points, dtype=torch.float32)
        kinds = torch.zeros(1, 0, dtype=torch.int32) if labels is None else torch.as_tensor(labels).int()
        coords = coords[None] if coords.dim() == 2 else coords
        kinds = kinds[None] if kinds.dim() == 1 else kinds
        if coords.dim() != 3 or coords.shape[0] != 1 or coords.shape[-1] != 2:
            raise ValueError(f"points are (n, 2) (x, y), got {tuple(coords.shape)}")
        if kinds.shape != coords.shape[:2]:
            raise ValueError(f"one label per point: {coords.shape[1]} points, labels of shape {tuple(kinds.shape)}")
        if box is not None:
            if not clear_old_points:
                raise ValueError("a box comes before the clicks: add it with clear_old_points=True")
            corners = torch.as_tensor(box, dtype=torch.float32)
            if corners.numel() != 4:
                raise ValueError(f"a box is (x0, y0, x1, y1), got {tuple(corners.shape)}")
            coords = torch.cat((corners.reshape(1, 2, 2), coords), dim=1)
            kinds = torch.cat((torch.tensor([[2, 3]], dtype=torch.int32), kinds), dim=1)
        if normalize_coords:
            height, width = session.video_size
            coords = coords / torch.tensor([width, height])
        coords = (coords * self.image_size).to(self.model.device)
        kinds = kinds.to(self.model.device)
        track = session.objects.setdefault(obj_id, ObjectTrack())
        if not clear_old_points and frame_idx in track.points:
            old_coords, old_kinds = track.points[frame_idx]
            coords, kinds = torch.cat((old_coords, coords), dim=1), torch.cat((old_kinds, kinds), dim=1)
        track.points[frame_idx] = (coords, kinds)
        track.masks.pop(frame_idx, None)
        first, reverse, conditioning = self._prompted(track, frame_idx)
        previous = track.latest(frame_idx, conditioning)
        previous_logits = None
        if previous is not None and previous.masks is not None:
            previous_logits = previous.masks.clamp(-LOW_RES_LIMIT, LOW_RES_LIMIT)
        result = self._run(
            session, track, frame_idx, first, reverse, points=coords, labels=kinds, previous_logits=previous_logits
        )
        track.pending[conditioning][frame_idx] = result
        return frame_idx, session.object_ids, self._frame_masks(session, frame_idx, conditioning)

    @torch.inference_mode()
    def add_new_mask(self, session: VideoSession, frame_idx: int, obj_id: int, mask: Any) -> FrameMasks:
        """A mask (H, W) at the video's size (bool, or > 0.5 inside) for one object on one frame: it is the
        frame's output as given (logits +-10).

        Returns:
            The frame, every object id, and the frame's masks of every object (objects, 1, H, W).
        """
        frame_idx = _index(session, frame_idx)
        given = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
        if given.shape != session.video_size:
            raise ValueError(f"a mask is (H, W) = {session.video_size} (the video's size), got {tuple(given.shape)}")
        inputs = given.bool().float()[None, None].to(self.model.device)
        size = self.image_size
        if inputs.shape[-2:] != (size, size):
            inputs = F.interpolate(inputs, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            inputs = (inputs >= 0.5).float()
        track = session.objects.setdefault(obj_id, ObjectTrack())
        track.masks[frame_idx] = inputs
        track.points.pop(frame_idx, None)
        first, reverse, conditioning = self._prompted(track, frame_idx)
        track.pending[conditioning][frame_idx] = self._run(session, track, frame_idx, first, reverse, mask=inputs)
        return frame_idx, session.object_ids, self._frame_masks(session, frame_idx, conditioning)

    def _prompted(self, track: ObjectTrack, frame_idx: int) -> tuple[bool, bool, bool]:
        """A prompt on a frame: a first one (a frame not tracked yet: no memory) or a correction (tracked in the
        direction it was); kept as a conditioning frame when first (or when every corrected frame is)."""
        first = frame_idx not in track.directions
        reverse = False if first else track.directions[frame_idx]
        return first, reverse, first or self.add_all_frames_to_correct_as_cond

    @torch.inference_mode()
    def clear_all_prompts_in_frame(
        self, session: VideoSession, frame_idx: int, obj_id: int, need_output: bool = True
    ) -> FrameMasks | None:
        """Removes the object's prompts on the frame; its result there, if it was a conditioning frame, becomes a
        tracked frame's. Returns the frame's masks of every object (None without `need_output`)."""
        frame_idx = _index(session, frame_idx)
        track = session.track(obj_id)
        track.points.pop(frame_idx, None)
        track.masks.pop(frame_idx, None)
        for pending in track.pending.values():
            pending.pop(frame_idx, None)
        result = track.conditioning.pop(frame_idx, None)
        if result is not None:
            track.tracked[frame_idx] = result
            track.directions.pop(frame_idx, None)
        if not need_output:
            return None
        conditioning = any(frame_idx in t.pending[True] for t in session.objects.values())
        return frame_idx, session.object_ids, self._frame_masks(session, frame_idx, conditioning)

    @torch.inference_mode()
    def remove_object(
        self, session: VideoSession, obj_id: int, need_output: bool = True
    ) -> tuple[list[int], list[tuple[int, Tensor]]]:
        """Removes an object (an unknown id is an error). Returns the remaining ids and, for each frame where the
        object had prompts, that frame's masks of the remaining objects."""
        track = session.track(obj_id)
        if len(session.objects) == 1:
            self.reset_state(session)
            return session.object_ids, []
        prompted = sorted(set(track.points) | set(track.masks))
        for frame_idx in prompted:
            self.clear_all_prompts_in_frame(session, frame_idx, obj_id, need_output=False)
        del session.objects[obj_id]
        updated = []
        if need_output:
            for frame_idx in prompted:
                conditioning = any(frame_idx in t.pending[True] for t in session.objects.values())
                updated.append((frame_idx, self._frame_masks(session, frame_idx, conditioning)))
        return session.object_ids, updated

    # -- propagation ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def propagate_in_video(
        self,
        session: VideoSession,
        start_frame_idx: int | None = None,
        max_frame_num_to_track: int | None = None,
        reverse: bool = False,
    ) -> Iterator[FrameMasks]:
        """Tracks every object from `start_frame_idx` (default: the earliest prompted frame, in either
        direction, as official) over at most `max_frame_num_to_track` more frames (default: to the video's end,
        or its start with `reverse`), yielding (frame, object ids, masks (objects, 1, H, W)) per frame."""
        self._prepare(session)
        if start_frame_idx is None:
            start_frame_idx = min(t for track in session.objects.values() for t in track.conditioning)
        start = _index(session, start_frame_idx)
        count = session.num_frames if max_frame_num_to_track is None else max_frame_num_to_track
        if count < 0:
            raise ValueError(f"max_frame_num_to_track is at least 0, got {count}")
        if reverse:
            order = range(start, max(start - count, 0) - 1, -1) if start > 0 else range(0)
        else:
            order = range(start, min(start + count, session.num_frames - 1) + 1)
        return self._propagate(session, list(order), reverse)

    def _propagate(self, session: VideoSession, order: list[int], reverse: bool) -> Iterator[FrameMasks]:
        for frame_idx in order:
            with torch.inference_mode():
                masks = []
                for track in session.objects.values():
                    result = track.conditioning.get(frame_idx)
                    if result is not None:
                        if self.clear_non_cond_mem_around_input:
                            self._clear_around(track, frame_idx)
                    else:
                        result = self._run(session, track, frame_idx, False, reverse, run_memory_encoder=True)
                        track.tracked[frame_idx] = result
                    track.directions[frame_idx] = reverse
                    assert result.masks is not None
                    masks.append(result.masks)
                out = self._video_masks(session, torch.cat(masks))
                if session.kept is KeptMemories.WINDOW:
                    self._forget(session, frame_idx, reverse)
            yield frame_idx, session.object_ids, out

    def _prepare(self, session: VideoSession) -> None:
        """Before propagating: the pending prompted frames' memories (their masks binarized), filed as
        conditioning or tracked frames (official `propagate_in_video_preflight`)."""
        if not session.objects:
            raise ValueError("no object has a prompt yet: add points, a box or a mask before propagating")
        for obj_id, track in session.objects.items():
            for conditioning in (False, True):
                stored = track.conditioning if conditioning else track.tracked
                for frame_idx, result in track.pending[conditioning].items():
                    if result.memory is None:
                        assert result.masks is not None
                        result = self._with_memory(session, frame_idx, result)
                    stored[frame_idx] = result
                    if self.clear_non_cond_mem_around_input:
                        self._clear_around(track, frame_idx)
                track.pending[conditioning].clear()
            if not track.conditioning:
                raise ValueError(f"object {obj_id} has no prompt on any frame: add one, or remove the object")
            for frame_idx in track.conditioning:
                track.tracked.pop(frame_idx, None)

    def _clear_around(self, track: ObjectTrack, frame_idx: int) -> None:
        """Forgets the object's tracked frames within num_maskmem (times the stride) of a prompted frame."""
        reach = self.tracker.memory_stride * self.tracker.memory.config.num_maskmem
        for t in range(frame_idx - reach, frame_idx + reach + 1):
            track.tracked.pop(t, None)

    def _forget(self, session: VideoSession, frame_idx: int, reverse: bool) -> None:
        """Streaming: drops what no later frame of this propagation reads (see `KeptMemories.WINDOW`)."""
        config = self.tracker.memory.config
        memory_reach = self.tracker.memory_stride * max(config.num_maskmem - 2, 0)
        pointer_reach = min(session.num_frames, config.max_pointers) - 2
        for track in session.objects.values():
            for t in list(track.tracked):
                behind = t - frame_idx if reverse else frame_idx - t
                result = track.tracked[t]
                if behind < 0 or behind > max(memory_reach, pointer_reach):
                    del track.tracked[t]
                elif behind > memory_reach and result.masks is not None:
                    assert result.memory is not None
                    memory = dataclasses.replace(result.memory, features=empty_features(result.pointer.device))
                    track.tracked[t] = FrameResult(None, result.object_score_logits, result.pointer, memory)

    # -- one frame --------------------------------------------------------------------------------------------

    def features(self, session: VideoSession, frame_idx: int) -> FrameFeatures:
        """The frame's image features (computed when the cached ones are another frame's)."""
        if session.features is not None and session.features[0] == frame_idx:
            return session.features[1]
        image = session.frames[frame_idx]
        if not isinstance(image, Image.Image):
            raise TypeError(f"frame {frame_idx} is not a PIL image: {type(image).__name__}")
        if (image.height, image.width) != session.video_size:
            raise ValueError(
                f"frame {frame_idx} is {image.width}x{image.height}, the video's first frame "
                f"{session.video_size[1]}x{session.video_size[0]}: every frame of a video has one size"
            )
        pixels = video_frame_input(image, self.image_size).to(self.model.device)
        session.features = None  # the old frame's features go before the new ones are computed
        features = encode_frame(self.model, pixels)
        session.features = (frame_idx, features)
        return features

    def _run(
        self,
        session: VideoSession,
        track: ObjectTrack,
        frame_idx: int,
        conditioning: bool,
        reverse: bool,
        run_memory_encoder: bool = False,
        points: Tensor | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
        previous_logits: Tensor | None = None,
    ) -> FrameResult:
        """One object on one frame (official `_run_single_frame_inference`): the tracking step on the object's
        memory bank, holes filled, the memory stored compactly."""
        features = self.features(session, frame_idx)
        with _sam_plus_hq(self.model):
            out: FrameOutput = self.tracker.track_step(
                frame_idx,
                conditioning,
                features,
                track.bank(),
                session.num_frames,
                points=points,
                labels=labels,
                reverse=reverse,
                run_memory_encoder=run_memory_encoder,
                mask=mask,
                previous_logits=previous_logits,
            )
        masks = out.low_res_masks
        if self.fill_hole_area > 0:
            masks = fill_holes_and_sprinkles(masks, self.fill_hole_area, 0, hole_logit=FILLED_HOLE_LOGIT)
        memory = None if out.memory is None else self._stored(session, out.memory)
        return FrameResult(masks, out.object_score_logits, out.pointer, memory)

    def _with_memory(self, session: VideoSession, frame_idx: int, result: FrameResult) -> FrameResult:
        """A prompted frame's result with its memory, encoded from its (hole-filled) masks, binarized."""
        assert result.masks is not None
        features = self.features(session, frame_idx)
        size = self.image_size
        high_res = F.interpolate(result.masks, size=(size, size), mode="bilinear", align_corners=False)
        encoded, positions = self.tracker.memory.memory_encoder.encode(
            features.embedding, high_res, result.object_score_logits, from_prompts=True
        )
        memory = FrameMemory(encoded, positions, result.pointer, result.object_score_logits)
        return dataclasses.replace(result, memory=self._stored(session, memory))

    def _stored(self, session: VideoSession, memory: FrameMemory) -> FrameMemory:
        """A memory as the session keeps it: features in bfloat16 (as official), one copy of the positions."""
        if session.memory_positions is None or session.memory_positions.shape != memory.positions.shape:
            session.memory_positions = memory.positions.clone()
        return dataclasses.replace(
            memory, features=memory.features.to(torch.bfloat16), positions=session.memory_positions
        )

    # -- outputs ----------------------------------------------------------------------------------------------

    def _frame_masks(self, session: VideoSession, frame_idx: int, conditioning: bool) -> Tensor:
        """Every object's latest masks on a frame at the video's size (NO_OBJECT_LOGIT where an object has no
        result there; official `_consolidate_temp_output_across_obj` at the video's resolution)."""
        height, width = session.video_size
        out = torch.full(
            (len(session.objects), 1, height, width), NO_OBJECT_LOGIT, dtype=torch.float32, device=self.model.device
        )
        for i, track in enumerate(session.objects.values()):
            result = track.latest(frame_idx, conditioning)
            if result is not None and result.masks is not None:
                out[i : i + 1] = self._resized(session, result.masks)
        return self._video_masks(session, out)

    def _resized(self, session: VideoSession, masks: Tensor) -> Tensor:
        if masks.shape[-2:] == session.video_size:
            return masks.float()
        return F.interpolate(masks.float(), size=session.video_size, mode="bilinear", align_corners=False)

    def _video_masks(self, session: VideoSession, masks: Tensor) -> Tensor:
        """Masks at the video's size, the non-overlapping constraint applied when set."""
        out = self._resized(session, masks)
        return NonOverlappingMasks()(out) if self.non_overlap_masks else out
