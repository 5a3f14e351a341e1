"""One frame of SAM 2 video tracking: the current frame's image features, conditioned on the memories and object
pointers of other frames, go through the SAM 2 decoder; the result becomes the frame's memory.

    frame features --+-- conditioning frame: + no_mem_embed ---------------------------.
                     '-- other frame: memory attention to the bank's memories -------- decoder (prompts or none)
                                                                                         -> masks, object score,
    memory bank: conditioning frames (slot 0), the previous frames (slots 1..6),            pointer
                 the object pointers of past frames (with their distances)              -> memory encoder: memory

`SAM2Tracker.track_step` is the official `SAM2Base.track_step` (points, a given mask, previous logits with new
points, or no prompt; the video predictor's settings), `SAM2Tracker.memory_conditioned` its
`_prepare_memory_conditioned_features`, `encode_frame` its `forward_image`. Which frames are
remembered is Python over the `MemoryBank`; every computation is a chain of `SegmentAnything2` or
`SAM2VideoMemory`.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from finesam.inputs import PADDING_LABEL, PADDING_POINT
from finesam.model.sam2.hiera import HIGH_RES_KEYS, NoMemoryEmbedding
from finesam.model.sam2.object_pointers import NoObjectPointer, pointer_tokens
from finesam.model.sam2.sam2 import SegmentAnything2
from finesam.model.sam2.video_memory import SAM2VideoMemory

# a given mask as logits: -10 outside, +10 inside (sigmoid(-10) = 4.5e-5)
MASK_LOGIT_SCALE, MASK_LOGIT_BIAS = 20.0, -10.0


@dataclass(frozen=True)
class FrameFeatures:
    """What the image encoder gives for a frame (one per object in the batch, or one shared).

    Attributes:
        embedding: the neck's stride-16 level, without `no_mem_embed` (B, dim, E, E).
        high_res: the decoder's skip features, `conv_s0` / `conv_s1` applied ((B, dim/8, 4E, 4E), (B, dim/4, 2E, 2E)).
    """

    embedding: Float[Tensor, "batch dim grid grid"]
    high_res: tuple[Tensor, Tensor]


@dataclass(frozen=True)
class FrameMemory:
    """What a segmented frame leaves to the others: its spatial memory, the memory's positions, its object
    pointer and object score."""

    features: Float[Tensor, "batch memory_dim grid grid"]
    positions: Float[Tensor, "batch memory_dim grid grid"]
    pointer: Float[Tensor, "batch dim"]
    object_score_logits: Float[Tensor, "batch 1"]


@dataclass
class MemoryBank:
    """The memories of one video's frames: the conditioning frames (prompted) and the tracked ones, by frame
    index, in the order they were added."""

    conditioning: dict[int, FrameMemory] = field(default_factory=dict)
    tracked: dict[int, FrameMemory] = field(default_factory=dict)


@dataclass(frozen=True)
class FrameOutput:
    """A tracked frame: the chosen mask, every mask output, the object score, the pointer and the memory.

    Attributes:
        low_res_masks: the chosen mask's logits (B, 1, 4E, 4E) (-1024 where the object is absent).
        high_res_masks: those logits upsampled to the model input (B, 1, 16E, 16E).
        low_res_multimasks: every output mask (B, M, 4E, 4E), M = 3 for multimask output, else 1.
        iou_predictions: their predicted IoUs (B, M).
        object_score_logits: > 0 where the object is present (B, 1).
        pointer: the object pointer (B, dim).
        memory: the frame's memory (None when the memory encoder was not run).
    """

    low_res_masks: Float[Tensor, "batch 1 low low"]
    high_res_masks: Float[Tensor, "batch 1 size size"]
    low_res_multimasks: Float[Tensor, "batch masks low low"]
    iou_predictions: Float[Tensor, "batch masks"]
    object_score_logits: Float[Tensor, "batch 1"]
    pointer: Float[Tensor, "batch dim"]
    memory: FrameMemory | None


@torch.no_grad()
def encode_frame(model: SegmentAnything2, pixels: Float[Tensor, "batch 3 size size"]) -> FrameFeatures:
    """A frame's features for tracking: the image encoder without its last layer, the `no_mem_embed` that only a
    conditioning frame adds (official `forward_image`).

    Args:
        model: the image model.
        pixels: preprocessed frames (`SegmentAnything2.preprocess`: squashed to the input size, normalised).

    Returns:
        The stride-16 embedding and the decoder's high-resolution features.
    """
    stages = list(model.image_encoder)
    if not isinstance(stages[-1], NoMemoryEmbedding):
        raise ValueError(f"the image encoder of a tracked model ends with NoMemoryEmbedding, not {stages[-1]!r}")
    image = model._reset_image_features()
    x: Any = pixels.to(device=model.device, dtype=model.image_encoder.dtype)
    try:
        for stage in stages[:-1]:  # the stages of the chain, as `SegmentAnything.decode` runs its own
            x = stage(*x) if isinstance(x, tuple) else stage(x)
        x = x[0] if isinstance(x, tuple) else x  # a passthrough stage returns its inputs
        high_res = (image[HIGH_RES_KEYS[0]], image[HIGH_RES_KEYS[1]])
    finally:
        model._reset_image_features()
    return FrameFeatures(x.float(), (high_res[0].float(), high_res[1].float()))


def select_conditioning(
    frame: int, conditioning: dict[int, FrameMemory], limit: int
) -> tuple[dict[int, FrameMemory], dict[int, FrameMemory]]:
    """The conditioning frames a frame attends to (all, or `limit` of them: the nearest before, the nearest at or
    after, then the nearest others), and the others (official `select_closest_cond_frames`)."""
    if limit == -1 or len(conditioning) <= limit:
        return conditioning, {}
    if limit < 2:
        raise ValueError(f"a limit on conditioning frames must be at least 2, got {limit}")
    selected: dict[int, FrameMemory] = {}
    before = max((t for t in conditioning if t < frame), default=None)
    if before is not None:
        selected[before] = conditioning[before]
    after = min((t for t in conditioning if t >= frame), default=None)
    if after is not None:
        selected[after] = conditioning[after]
    others = sorted((t for t in conditioning if t not in selected), key=lambda t: abs(t - frame))
    selected.update((t, conditioning[t]) for t in others[: limit - len(selected)])
    return selected, {t: m for t, m in conditioning.items() if t not in selected}


class SAM2Tracker:
    """SAM 2's per-frame tracking step on a `SegmentAnything2` and its `SAM2VideoMemory`.

    Attributes:
        model: the image model (its decoder and `no_mem_embed`).
        memory: the memory modules.
        max_conditioning_frames: conditioning frames a frame attends to (-1: all; `max_cond_frames_in_attn`).
        memory_stride: the temporal stride of the previous frames' memories (`memory_temporal_stride_for_eval`).
        multimask_in_sam / multimask_for_tracking / multimask_points: three masks (the best by IoU chosen) on
            conditioning frames with that many prompt points (a box counts two), and on tracked frames
            (`multimask_output_in_sam`, `multimask_output_for_tracking`, `multimask_min_pt_num` /
            `multimask_max_pt_num`).
        multimask_pointer: with multimask output, the pointer comes from the chosen multimask token
            (`use_multimask_token_for_obj_ptr`); else from the single-mask token.
    """

    def __init__(self, model: SegmentAnything2, memory: SAM2VideoMemory) -> None:
        if model.config.decoder.prompt_dim != memory.config.dim:
            raise ValueError(
                f"the memory's width {memory.config.dim} is not the model's {model.config.decoder.prompt_dim}"
            )
        self.model = model
        self.memory = memory
        self.max_conditioning_frames = -1
        self.memory_stride = 1
        self.multimask_in_sam = True
        self.multimask_for_tracking = True
        self.multimask_points = (0, 1)
        self.multimask_pointer = True

    def _previous_frame(self, frame: int, distance: int, reverse: bool) -> int:
        """The frame of the memory slot `distance` frames back (every `memory_stride`-th frame beyond the last)."""
        stride = self.memory_stride
        if distance == 1:
            return frame + 1 if reverse else frame - 1
        if reverse:
            return -(-(frame + 2) // stride) * stride + (distance - 2) * stride
        return ((frame - 2) // stride) * stride - (distance - 2) * stride

    def memory_tokens(
        self, frame: int, bank: MemoryBank, num_frames: int, reverse: bool = False
    ) -> tuple[Float[Tensor, "batch m memory_dim"], Float[Tensor, "batch m memory_dim"], int]:
        """The memory tokens a frame attends to: the selected conditioning frames (slot 0), the previous frames
        (slots 1..num_maskmem - 1, the farthest first), then the object pointers (conditioning frames in the past,
        then up to `max_pointers - 1` previous frames).

        Returns:
            The tokens, their positions, and how many of them are pointer tokens.
        """
        config = self.memory.config
        if not bank.conditioning:
            raise ValueError(f"frame {frame} is tracked without any conditioning frame in the memory bank")
        selected, unselected = select_conditioning(frame, bank.conditioning, self.max_conditioning_frames)
        slots: list[tuple[int, FrameMemory | None]] = [(0, m) for m in selected.values()]
        for slot in range(1, config.num_maskmem):
            previous = self._previous_frame(frame, config.num_maskmem - slot, reverse)
            slots.append((slot, bank.tracked.get(previous, unselected.get(previous))))
        tokens, positions = [], []
        for slot, remembered in slots:
            if remembered is None:
                continue
            # features may be stored in bfloat16 (as the official video predictor stores them): used in the
            # positions' precision (the official code upcasts them when pointers join them)
            tokens.append(remembered.features.flatten(2).transpose(1, 2).to(remembered.positions.dtype))
            positions.append(self.memory.memory_time(remembered.positions.flatten(2).transpose(1, 2), slot))
        max_pointers = min(num_frames, config.max_pointers)
        sign = -1 if reverse else 1
        past = {t: m for t, m in selected.items() if (t >= frame if reverse else t <= frame)}
        pointers = [
            ((frame - t) * sign if config.signed_pointer_time else abs(frame - t), m.pointer)
            for t, m in (past if config.only_past_pointers else selected).items()
        ]
        for distance in range(1, max_pointers):
            t = frame + distance if reverse else frame - distance
            if t < 0 or t >= num_frames:
                break
            remembered = bank.tracked.get(t, unselected.get(t))
            if remembered is not None:
                pointers.append((distance, remembered.pointer))
        count = 0
        if pointers:
            distances = torch.tensor([d for d, _ in pointers], device=tokens[0].device)
            stacked = torch.stack([p for _, p in pointers])
            if self.memory.pointer_time is not None:
                times = self.memory.pointer_time(distances / (max_pointers - 1))
            else:
                times = stacked.new_zeros(len(pointers), config.memory_dim)
            split_tokens, pointer_positions = pointer_tokens(stacked, times, config.memory_dim)
            tokens.append(split_tokens)
            positions.append(pointer_positions)
            count = split_tokens.shape[1]
        return torch.cat(tokens, dim=1), torch.cat(positions, dim=1), count

    def memory_conditioned(
        self,
        frame: int,
        conditioning: bool,
        features: FrameFeatures,
        bank: MemoryBank,
        num_frames: int,
        reverse: bool = False,
    ) -> Float[Tensor, "batch dim grid grid"]:
        """The frame's image embedding for the decoder: plus `no_mem_embed` on a conditioning frame without
        memories; else conditioned on the bank's memories by the memory attention.

        Args:
            frame: the frame's index.
            conditioning: the frame is an initial conditioning frame (prompted, attends to no memory).
            features: the frame's image features.
            bank: the other frames' memories.
            num_frames: frames in the video (bounds the pointers' distances).
            reverse: tracking backwards in time.
        """
        embedding = features.embedding
        if conditioning:
            return self.model.image_encoder.ensure_find(NoMemoryEmbedding)(embedding)
        memory, memory_positions, pointer_count = self.memory_tokens(frame, bank, num_frames, reverse)
        tokens = embedding.flatten(2).transpose(1, 2)
        positions = self.memory.image_positions(embedding).flatten(2).transpose(1, 2)
        if memory.shape[0] != tokens.shape[0]:
            memory = memory.expand(tokens.shape[0], -1, -1)
            memory_positions = memory_positions.expand(tokens.shape[0], -1, -1)
        conditioned = self.memory.memory_attention.condition(tokens, positions, memory, memory_positions, pointer_count)
        return conditioned.transpose(1, 2).reshape(embedding.shape)

    def use_multimask(self, conditioning: bool, points: int) -> bool:
        """Multimask output on this frame (official `_use_multimask`)."""
        low, high = self.multimask_points
        return self.multimask_in_sam and (conditioning or self.multimask_for_tracking) and low <= points <= high

    def _decode(
        self,
        embedding: Tensor,
        high_res: tuple[Tensor, Tensor],
        points: Tensor,
        labels: Tensor,
        multimask: bool,
        mask_prompt: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The SAM 2 decoder's masks, IoUs and object scores, and the mask tokens the pointer is read from."""
        model = self.model
        batch = embedding.shape[0]
        padding = points.new_tensor(PADDING_POINT).expand(batch, 1, 2)
        coords = torch.cat((points, padding), dim=1)
        kinds = torch.cat((labels.long(), labels.new_full((batch, 1), PADDING_LABEL).long()), dim=1)
        context = {
            "point_coords": coords,
            "point_labels": kinds,
            "mask_prompt": mask_prompt,
            "multimask_output": multimask,
        }
        model.set_context("sam", context)
        model._reset_image_features().update(dict(zip(HIGH_RES_KEYS, high_res, strict=True)))
        try:
            decoder = model.mask_decoder
            # the decoder's stages one by one: the transformer's tokens give the pointer
            passed = model.prompt_encoder(embedding)  # the embedding, with the prompts' embeddings in context
            pair = decoder[0](*passed) if isinstance(passed, tuple) else decoder[0](passed)
            tokens, image = decoder[1](*pair)
            masks, iou, scores = decoder[3](*decoder[2](tokens, image))
        finally:
            model._reset_context()
        first = model.config.decoder.iou_token + 1
        mask_tokens = tokens[:, first : first + model.config.decoder.num_mask_tokens]
        return masks, iou, mask_tokens, scores

    @torch.no_grad()
    def track_step(
        self,
        frame: int,
        conditioning: bool,
        features: FrameFeatures,
        bank: MemoryBank,
        num_frames: int,
        points: Float[Tensor, "batch n 2"] | None = None,
        labels: Int[Tensor, "batch n"] | None = None,
        reverse: bool = False,
        run_memory_encoder: bool = True,
        mask: Float[Tensor, "batch 1 size size"] | None = None,
        previous_logits: Float[Tensor, "batch 1 low low"] | None = None,
    ) -> FrameOutput:
        """Segments one frame from its features, its prompts (if any) and the other frames' memories, and encodes
        its memory (official `SAM2Base.track_step`; the bank is not changed: the caller files the memory).

        Args:
            frame: the frame's index.
            conditioning: the frame is an initial conditioning frame (attends to no memory).
            features: the frame's image features.
            bank: the other frames' memories.
            num_frames: frames in the video.
            points: prompt points in model-input pixels (a box as its two corners, labels 2 and 3), or None.
            labels: their labels.
            reverse: tracking backwards in time.
            run_memory_encoder: encode the frame's memory.
            mask: a mask given for the frame (at the model's input size, > 0 inside), which is the frame's output
                as it is (`use_mask_input_as_output_without_sam`); no points with it.
            previous_logits: the frame's previous low-resolution logits, decoded again with new points
                (`prev_sam_mask_logits`).

        Returns:
            The masks, object score, pointer and memory of the frame.
        """
        if (points is None) != (labels is None):
            raise ValueError("points and labels go together")
        if mask is not None:
            if points is not None or previous_logits is not None:
                raise ValueError("a given mask is the frame's output: it takes no points or previous logits")
            return self._mask_as_output(features, mask, run_memory_encoder)
        if previous_logits is not None and points is None:
            raise ValueError("previous logits are decoded again with new points: give points")
        batch = features.embedding.shape[0]
        prompted = points is not None and labels is not None
        if points is None or labels is None:
            points = features.embedding.new_zeros(batch, 1, 2)
            labels = torch.full((batch, 1), PADDING_LABEL, dtype=torch.long, device=points.device)
        multimask = self.use_multimask(conditioning, labels.shape[1] if prompted else 0)
        embedding = self.memory_conditioned(frame, conditioning, features, bank, num_frames, reverse)
        masks, iou, mask_tokens, scores = self._decode(
            embedding, features.high_res, points, labels, multimask, previous_logits
        )
        multimasks = self.memory.occluded_masks(masks, scores).float()
        size = self.model.config.image_size
        high_res = F.interpolate(multimasks, size=(size, size), mode="bilinear", align_corners=False)
        rows = torch.arange(batch, device=masks.device)
        if multimask:
            best = iou.argmax(dim=-1)
            low_res_masks, high_res_masks = multimasks[rows, best][:, None], high_res[rows, best][:, None]
            token = mask_tokens[:, 1:][rows, best] if self.multimask_pointer else mask_tokens[:, 0]
        else:
            low_res_masks, high_res_masks, token = multimasks, high_res, mask_tokens[:, 0]
        pointer = self.memory.object_pointer(token, scores)
        memory = self._memory(features, high_res_masks, scores, pointer, prompted) if run_memory_encoder else None
        return FrameOutput(low_res_masks, high_res_masks, multimasks, iou, scores, pointer, memory)

    def _memory(
        self, features: FrameFeatures, high_res_masks: Tensor, scores: Tensor, pointer: Tensor, prompted: bool
    ) -> FrameMemory:
        encoded, positions = self.memory.memory_encoder.encode(
            features.embedding, high_res_masks, scores, from_prompts=prompted
        )
        return FrameMemory(encoded, positions, pointer, scores)

    def _mask_as_output(self, features: FrameFeatures, mask: Tensor, run_memory_encoder: bool) -> FrameOutput:
        """A given mask as the frame's output: logits +-10, the object present where the mask has a pixel, the
        pointer from the decoder prompted by the mask alone (official `_use_mask_as_output`); the image features
        are the frame's own (no memory, no `no_mem_embed`)."""
        size = self.model.config.image_size
        if mask.shape[-2:] != (size, size) or mask.dim() != 4 or mask.shape[1] != 1:
            raise ValueError(
                f"a given mask is (B, 1, {size}, {size}) at the model's input size, got {tuple(mask.shape)}"
            )
        given = mask.float()
        high_res = given * MASK_LOGIT_SCALE + MASK_LOGIT_BIAS
        low = self.model.config.mask_input_size
        low_res = F.interpolate(high_res, size=(low, low), mode="bilinear", align_corners=False, antialias=True)
        batch = given.shape[0]
        points = given.new_zeros(batch, 1, 2)
        labels = torch.full((batch, 1), PADDING_LABEL, dtype=torch.long, device=given.device)
        prompt = self.memory.mask_input_downsample(given)
        _, _, mask_tokens, decoded_scores = self._decode(
            features.embedding, features.high_res, points, labels, False, prompt
        )
        pointer = self.memory.object_pointer(mask_tokens[:, 0], decoded_scores)
        present = (given.flatten(1) > 0).any(dim=1, keepdim=True).float()
        scores = MASK_LOGIT_SCALE * present + MASK_LOGIT_BIAS
        pointer = self.memory.object_pointer.ensure_find(NoObjectPointer)(pointer, scores)
        memory = self._memory(features, high_res, scores, pointer, prompted=False) if run_memory_encoder else None
        return FrameOutput(low_res, high_res, low_res, given.new_ones(batch, 1), scores, pointer, memory)
