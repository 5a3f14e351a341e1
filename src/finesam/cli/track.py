"""`finesam track`: objects tracked through a video with SAM 2 / 2.1 (and HQ-SAM 2) from prompts on its frames,
written as the files video object segmentation benchmarks read.

    OUT/<frame>.png               one palette PNG per tracked frame: each pixel its object's id, 0 background
    OUT/<object>/<frame>.png      with --object-masks: one 0/255 mask per object and frame
    OUT/track.json                what the folder was made with (the source, prompts, weights, options)
    OUT/.finesam-track/           while tracking: the session saved every --save-every frames

A run killed at any moment, started again with the same command, continues from its last saved session and
writes the files an uninterrupted run writes; a finished run is not tracked again.
"""

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finesam.cli.common import (
    UsageError,
    check_distinct_paths,
    check_output_folder,
    inference,
    load_model,
    save_mask,
)
from finesam.cli.dataset_runs import file_digest
from finesam.cli.options import Commands, add_command, model_options, positive_int
from finesam.cli.overlay import distinct_colours, overlay
from finesam.data.pairs import read_mask
from finesam.inputs import (
    JSON_PROMPT_KEYS,
    MASK_THRESHOLD,
    check_prompts,
    open_image,
    parse_json_prompts,
    read_text_input,
    shown,
)
from finesam.model.sam2.sam2 import SegmentAnything2
from finesam.progress import progress, progress_bar
from finesam.video.checkpoint import read_notes, restore_session, save_session
from finesam.video.frames import VIDEO_EXTRA, FrameSource, open_frames
from finesam.video.palette import MAX_OBJECT_ID, object_index_map, object_masks, palette_image
from finesam.video.predictor import VideoPredictor
from finesam.weights import atomic_write, check_output
from finesam.weights.sam2_memory import load_video_memory

RUN_FORMAT = "finesam-track/1"
RUN_FILE = "track.json"
STATE_FOLDER = ".finesam-track"
STATE_FILE = "session.safetensors"
TRACK_KEYS = JSON_PROMPT_KEYS | {"frame", "object", "mask"}
VIDEO_SUFFIXES = (".mp4",)  # an --overlay of these names is a video file, any other a folder


@dataclass(frozen=True)
class TrackPrompt:
    """One object's prompt on one frame, as a line of the prompts file gives it (pixels of the video).

    `mask` is an annotation image: with `object`, that object's pixels (a palette image's pixels of that index,
    else the file's foreground by `read_mask`'s rule); without, every object of a palette / grey image."""

    line: int
    frame: int
    object: int | None
    points: list[list[float]] | None = None
    labels: list[int] | None = None
    box: list[float] | None = None
    mask: Path | None = None


@dataclass(frozen=True)
class ObjectPrompt:
    """A prompt of one object, checked against the video: what the predictor is given."""

    line: int
    frame: int
    object: int
    points: list[list[float]] | None
    labels: list[int] | None
    box: list[float] | None
    mask: np.ndarray | None

    def record(self, mask_digest: str | None) -> dict[str, Any]:
        """What the results depend on, for the run's identity."""
        return {
            "frame": self.frame,
            "object": self.object,
            "points": self.points,
            "labels": self.labels,
            "box": self.box,
            "mask": mask_digest,
        }


def _whole_number(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        return None
    return int(value)


def _prompt_line(data: Any, line: int, folder: Path) -> TrackPrompt:
    if not isinstance(data, dict):
        raise ValueError('expected an object: {"frame": 0, "object": 1, "points": [[x, y]], "labels": [1]}')
    if unknown := sorted(data.keys() - TRACK_KEYS):
        raise ValueError(f"unknown keys {unknown} (known: {sorted(TRACK_KEYS)})")
    if "frame" not in data:
        raise ValueError('"frame" is missing: the index of the frame the prompt is on (0: the first)')
    frame = _whole_number(data["frame"])
    if frame is None or frame < 0:
        raise ValueError(f'"frame" must be a whole number, 0 or more, got {shown(data["frame"])}')
    obj = None
    if "object" in data:
        obj = _whole_number(data["object"])
        if obj is None or not 1 <= obj <= MAX_OBJECT_ID:
            raise ValueError(
                f'"object" must be a whole number from 1 to {MAX_OBJECT_ID} (its index in the palette PNGs; '
                f"0 is the background), got {shown(data['object'])}"
            )
    if "mask" in data:
        if any(data.get(key) for key in JSON_PROMPT_KEYS):
            raise ValueError('give "mask" or points / a box, not both (one prompt per object and frame)')
        if not isinstance(data["mask"], str) or not data["mask"]:
            raise ValueError(
                f'"mask" must be the path of an image (relative to the prompts file), got {data["mask"]!r}'
            )
        return TrackPrompt(line, frame, obj, mask=folder / data["mask"])
    if obj is None:
        raise ValueError('"object" is missing: the id of the object (1 to 255) the prompt is for')
    objects = parse_json_prompts(data)
    if len(objects) != 1:
        raise ValueError(f"one object per line: this line describes {len(objects)} (one box or point list each)")
    return TrackPrompt(
        line,
        frame,
        obj,
        points=None if objects.points is None else objects.points[0],
        labels=None if objects.labels is None else objects.labels[0],
        box=None if objects.boxes is None else objects.boxes[0],
    )


def read_track_prompts(path: Path) -> list[TrackPrompt]:
    """The prompts of a JSON Lines file: one object a line, `{"frame": F, "object": ID, ...}` with the keys of
    the JSON prompt dialect (docs/prompting.md: "points", "labels", "box") for one object, or "mask": the path
    of an annotation image. Blank lines are skipped.

    Raises:
        UsageError: the file cannot be read, holds no prompt, or a line is malformed (the message names it).
    """
    try:
        text = read_text_input(path, "prompts")
    except ValueError as e:
        raise UsageError(f"cannot read prompts from {path}: {e}") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            prompts.append(_prompt_line(json.loads(line), number, path.parent))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: line {number}: not JSON: {e}") from None
        except ValueError as e:
            raise UsageError(f"{path}: line {number}: {e}") from None
    if not prompts:
        raise UsageError(f'{path}: no prompt: one JSON object a line, {{"frame": 0, "object": 1, "points": ...}}')
    return prompts


def _mask_objects(prompt: TrackPrompt, size: tuple[int, int]) -> dict[int, np.ndarray]:
    """The objects a mask prompt gives, by id (one with "object", every one of a palette / grey image
    without)."""
    assert prompt.mask is not None
    image = open_image(prompt.mask)
    if image.size != size:
        raise ValueError(f"{prompt.mask} is {image.width} x {image.height}, the video {size[0]} x {size[1]}")
    if prompt.object is None:
        found = object_masks(image)
        if not found:
            raise ValueError(f"{prompt.mask} holds no object (every pixel is 0)")
        if max(found) > MAX_OBJECT_ID:
            raise ValueError(f"{prompt.mask}: object ids go to {MAX_OBJECT_ID}")
        return found
    mask = np.asarray(image) == prompt.object if image.mode == "P" else read_mask(prompt.mask)
    if not mask.any():
        raise ValueError(f"{prompt.mask} holds no pixel of object {prompt.object}")
    return {prompt.object: mask}


def check_prompts_on(prompts: list[TrackPrompt], frames: FrameSource, source: Path) -> list[ObjectPrompt]:
    """The prompts checked against the video (frames that exist, points and boxes inside the frame, masks of its
    size, one prompt per object and frame), mask files read and split into their objects."""
    width, height = frames.size
    checked: list[ObjectPrompt] = []
    seen: dict[tuple[int, int], int] = {}
    for prompt in prompts:
        where = f"line {prompt.line}"
        if prompt.frame >= len(frames):
            raise UsageError(
                f"{where}: frame {prompt.frame} does not exist: {source} has {len(frames)} frames (0 to "
                f"{len(frames) - 1})"
            )
        if prompt.mask is not None:
            try:
                masks = _mask_objects(prompt, frames.size)
            except ValueError as e:
                raise UsageError(f"{where}: {e}") from None
        else:
            try:
                check_prompts(
                    points=None if prompt.points is None else np.array(prompt.points),
                    labels=None if prompt.labels is None else np.array(prompt.labels),
                    boxes=None if prompt.box is None else np.array(prompt.box),
                    original_size=(height, width),
                    mask_input_size=0,
                )
            except ValueError as e:
                raise UsageError(f"{where}: {e}") from None
            assert prompt.object is not None
            masks = {prompt.object: None}
        for obj, mask in masks.items():
            if (other := seen.setdefault((prompt.frame, obj), prompt.line)) != prompt.line:
                raise UsageError(
                    f"{where}: object {obj} already has a prompt on frame {prompt.frame} (line {other}): give "
                    "all of one object's clicks on one frame on one line"
                )
            checked.append(ObjectPrompt(prompt.line, prompt.frame, obj, prompt.points, prompt.labels, prompt.box, mask))
    return checked


def tracked_order(frames: int, prompted: list[int], start: int | None, count: int | None, reverse: bool) -> list[int]:
    """The frames a propagation visits, in order: from `start` (default: the earliest prompted frame) over at
    most `count` more frames (default: to the end, or to the start with `reverse`), as the predictor does."""
    first = min(prompted) if start is None else start
    if not 0 <= first < frames:
        raise UsageError(f"--start-frame {first}: the video has {frames} frames (0 to {frames - 1})")
    more = frames if count is None else count
    if reverse:
        return list(range(first, max(first - more, 0) - 1, -1)) if first > 0 else []
    return list(range(first, min(first + more, frames - 1) + 1))


class TrackRun:
    """The output folder of one `finesam track` run and the state that lets it resume."""

    def __init__(self, out: Path, identity: dict[str, Any], names: list[str]) -> None:
        self.out = out
        self.identity = {"format": RUN_FORMAT, **identity}
        self.names = names
        self.state = out / STATE_FOLDER / STATE_FILE

    def palette_path(self, frame: int) -> Path:
        return self.out / f"{self.names[frame]}.png"

    def object_path(self, obj: int, frame: int) -> Path:
        return self.out / str(obj) / f"{self.names[frame]}.png"

    def recorded(self) -> dict[str, Any] | None:
        path = self.out / RUN_FILE
        if not path.exists():
            return None
        try:
            data = json.loads(read_text_input(path, "the run's record"))
        except ValueError as e:
            raise UsageError(f"{path}: not a record of finesam track ({e}): remove it or use another --out") from None
        if not isinstance(data, dict) or "identity" not in data:
            raise UsageError(f"{path}: not a record of finesam track: remove it or use another --out")
        return data

    def check(self, order: list[int], objects: list[int], overwrite: bool) -> bool:
        """Whether the folder holds this run, finished. Refuses a folder of another run (unless `overwrite`) and
        one holding files the run would replace that no run recorded."""
        if overwrite:
            return False
        record = self.recorded()
        if record is not None and record["identity"] == self.identity:
            return bool(record.get("complete"))
        if record is not None:
            changed = sorted(
                k
                for k in self.identity.keys() | record["identity"].keys()
                if self.identity.get(k) != record["identity"].get(k)
            )
            raise UsageError(
                f"{self.out} holds the results of another track run (it differs in: {', '.join(changed)}): use "
                "another --out, or --overwrite to start again there"
            )
        written = [self.palette_path(f) for f in order] + [self.out / str(obj) for obj in objects]
        if found := [path for path in written if path.exists()]:
            raise UsageError(
                f"{self.out} holds {found[0].name}{' and more' if len(found) > 1 else ''}, which this run would "
                "replace, and no track run made it: use an empty --out, or --overwrite"
            )
        return False

    def start(self, complete: bool = False) -> None:
        text = json.dumps({"identity": self.identity, "complete": complete}, indent=1)
        atomic_write(self.out / RUN_FILE, lambda tmp: tmp.write_text(text))

    def finish(self) -> None:
        self.start(complete=True)
        shutil.rmtree(self.out / STATE_FOLDER, ignore_errors=True)


def _identity(args: argparse.Namespace, frames: FrameSource, prompts: list[ObjectPrompt], order: list[int]) -> dict:
    width, height = frames.size
    return {
        "source": {"path": str(args.source.resolve()), "frames": len(frames), "size": [width, height]},
        "prompts": [p.record(None if p.mask is None else _mask_digest(p.mask)) for p in prompts],
        "frames": [order[0], order[-1], len(order)] if order else [],
        "weights": file_digest(args.weights, "--weights"),
        "hq": None if args.hq is None else file_digest(args.hq, "--hq"),
        "device": args.device,
        "dtype": args.dtype,
        "threshold": args.threshold,
        "non_overlap": args.non_overlap,
        "fill_hole_area": args.fill_hole_area,
        "object_masks": args.object_masks,
    }


def _mask_digest(mask: np.ndarray) -> str:
    return hashlib.sha256(np.packbits(mask).tobytes() + str(mask.shape).encode()).hexdigest()


def _check_outputs(args: argparse.Namespace, frames: FrameSource, objects: list[int]) -> None:
    out = check_output_folder(args.out, "--out")
    source = args.source.resolve()
    if out.resolve() == source or (args.overlay is not None and args.overlay.resolve() == source):
        raise UsageError(f"{args.source} holds the frames: write the results in another folder")
    if args.overlay is not None:
        if args.overlay.suffix.lower() in VIDEO_SUFFIXES:
            check_output(args.overlay)
            if frames.names and not _has_av():
                raise UsageError(f"--overlay {args.overlay}: {VIDEO_EXTRA}")
        else:
            check_output_folder(args.overlay, "--overlay")
            taken = [out.resolve(), *((out / str(obj)).resolve() for obj in objects)]
            if args.overlay.resolve() in taken:
                raise UsageError(f"--overlay {args.overlay}: the masks are written there: give another folder")
    inputs = [("--weights", args.weights), ("--prompts", args.prompts)]
    inputs += [("--hq", args.hq)] if args.hq is not None else []
    inputs += [("SOURCE", args.source)] if args.source.is_file() else []
    outputs = [("--out", out / RUN_FILE), ("--out", out / STATE_FOLDER / STATE_FILE)]
    if args.overlay is not None and args.overlay.suffix.lower() in VIDEO_SUFFIXES:
        outputs.append(("--overlay", args.overlay))
    check_distinct_paths(outputs, inputs)


def _has_av() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


@inference
def run_track(args: argparse.Namespace) -> None:
    if args.hq_only:
        raise UsageError("--hq-only: HQ-SAM 2 on video returns SAM's mask plus the HQ mask (as its authors' code)")
    if args.weights.is_dir():
        raise UsageError(f"--weights {args.weights}: video tracking needs a SAM 2 / 2.1 file (.safetensors or .pt)")
    frames = open_frames(args.source)
    prompts = check_prompts_on(read_track_prompts(args.prompts), frames, args.source)
    objects = sorted({p.object for p in prompts})
    order = tracked_order(len(frames), [p.frame for p in prompts], args.start_frame, args.max_frames, args.reverse)
    if not order:
        raise UsageError("--reverse from frame 0: there is no frame before it to track (give --start-frame)")
    _check_outputs(args, frames, objects)
    run = TrackRun(args.out, _identity(args, frames, prompts, order), frames.names)
    complete = run.check(order, objects, args.overwrite)
    tracked, seconds = (0, 0.0) if complete else _track(args, run, frames, prompts, order)
    if args.overlay is not None:
        _write_overlay(args, run, frames, prompts, order, objects)
    rate = f", {tracked / seconds:.2f} frames/s" if tracked and seconds > 0 else ""
    before = len(order) - tracked
    print(
        f"{args.out}\t{len(order)} frames, {len(objects)} objects{rate}"
        + (f" ({before} done before)" if before else "")
    )


def _predictor(args: argparse.Namespace) -> VideoPredictor:
    model = load_model(args)
    if not isinstance(model, SegmentAnything2):
        raise UsageError(f"--weights {args.weights}: video tracking needs SAM 2 / 2.1 weights")
    assert model.device is not None  # a loaded model's
    memory = load_video_memory(args.weights, device=model.device)
    return VideoPredictor(model, memory, fill_hole_area=args.fill_hole_area, non_overlap_masks=args.non_overlap)


def _track(
    args: argparse.Namespace, run: TrackRun, frames: FrameSource, prompts: list[ObjectPrompt], order: list[int]
) -> tuple[int, float]:
    """Tracks the frames of `order` not done yet and writes their files; returns how many it tracked, and in how
    many seconds (from the prompts to the last frame)."""
    predictor = _predictor(args)
    session = predictor.init_state(frames, keep_memories="window")
    notes = read_notes(run.state) if not args.overwrite else None
    done, started = 0, time.perf_counter()
    if notes is not None and notes.get("identity") == run.identity and 0 < notes.get("done", 0) <= len(order):
        restore_session(session, run.state, predictor.model.device or "cpu")
        done = notes["done"]
    else:
        shutil.rmtree(run.out / STATE_FOLDER, ignore_errors=True)
        run.start()
        for prompt in prompts:
            if prompt.mask is not None:
                predictor.add_new_mask(session, prompt.frame, prompt.object, prompt.mask)
            else:
                predictor.add_new_points_or_box(
                    session,
                    prompt.frame,
                    prompt.object,
                    points=None if prompt.points is None else np.array(prompt.points, dtype=np.float32),
                    labels=None if prompt.labels is None else np.array(prompt.labels, dtype=np.int32),
                    box=None if prompt.box is None else np.array(prompt.box, dtype=np.float32),
                )
    remaining = order[done:]
    before = done
    with progress_bar(len(order), "frames", unit="frame", initial=done, quiet=args.quiet) as bar:
        if remaining:
            tracked = predictor.propagate_in_video(
                session, start_frame_idx=remaining[0], max_frame_num_to_track=len(remaining) - 1, reverse=args.reverse
            )
            try:
                for frame, object_ids, masks in tracked:
                    _write_frame(args, run, frame, object_ids, masks)
                    done += 1
                    if done % args.save_every == 0 and done < len(order):
                        save_session(session, run.state, {"identity": run.identity, "done": done})
                    bar.update(1)
            except KeyboardInterrupt:
                raise KeyboardInterrupt(f"what is done is kept in {run.out}: the same command resumes") from None
    run.finish()
    return done - before, time.perf_counter() - started


def _write_frame(
    args: argparse.Namespace, run: TrackRun, frame: int, object_ids: list[int], masks: torch.Tensor
) -> None:
    index = object_index_map(object_ids, masks, args.threshold)
    picture = palette_image(index)
    atomic_write(run.palette_path(frame), lambda tmp: picture.save(tmp, format="PNG"))
    if args.object_masks:
        for i, obj in enumerate(object_ids):
            save_mask((masks[i, 0] > args.threshold).cpu().numpy(), run.object_path(obj, frame))


def _write_overlay(
    args: argparse.Namespace,
    run: TrackRun,
    frames: FrameSource,
    prompts: list[ObjectPrompt],
    order: list[int],
    objects: list[int],
) -> None:
    """The tracked frames with their objects tinted (from the palette PNGs written) and the prompts drawn: a
    folder of PNGs, or a video file."""
    colours = dict(zip(objects, distinct_colours(len(objects)), strict=True))

    def drawn(frame: int) -> Image.Image:
        index = np.asarray(Image.open(run.palette_path(frame)))
        here = [p for p in prompts if p.frame == frame and p.mask is None]
        boxes = [p.box for p in here if p.box is not None]
        points = [(x, y, label) for p in here for (x, y), label in zip(p.points or [], p.labels or [], strict=True)]
        return overlay(frames[frame], [index == obj for obj in objects], boxes, points, colours=list(colours.values()))

    shown_frames = sorted(order)
    if args.overlay.suffix.lower() not in VIDEO_SUFFIXES:
        for frame in progress(shown_frames, "overlay", quiet=args.quiet):
            picture = drawn(frame)
            atomic_write(args.overlay / f"{run.names[frame]}.png", lambda tmp, p=picture: p.save(tmp, format="PNG"))
        print(args.overlay)
        return
    import av

    rate = Fraction(frames.fps or 24).limit_denominator(1001)
    width, height = frames.size
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"

    def encode(tmp: Path) -> None:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=rate)
            stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
            for frame in progress(shown_frames, "overlay", quiet=args.quiet):
                pixels = np.asarray(drawn(frame))
                pixels = np.pad(pixels, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")  # even sizes
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode())

    print(atomic_write(args.overlay, encode))


def _frame_index(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def add_commands(commands: Commands) -> None:
    track = add_command(
        commands,
        "track",
        "track objects through a video (SAM 2 / 2.1, HQ-SAM 2) from prompts on its frames",
        (model_options("inject the HQ-SAM 2 adapter with these weights"),),
        description="Tracks objects through a video from prompts on its frames and writes one palette PNG per "
        "frame (pixel = object id, 0 background; the DAVIS / SA-V format). A run killed and started again with "
        "the same command continues where it stopped.",
    )
    track.add_argument("source", type=Path, metavar="VIDEO_OR_FOLDER", help="a video file or a folder of frames")
    track.add_argument(
        "--prompts",
        type=Path,
        required=True,
        metavar="PROMPTS.jsonl",
        help='one object a line: {"frame": 0, "object": 1, "points": [[x, y]], "labels": [1], "box": [x1, y1, '
        'x2, y2]} in pixels of the video, or {"frame": 0, "object": 1, "mask": "mask.png"}',
    )
    track.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder of the palette PNGs")
    track.add_argument(
        "--object-masks", action="store_true", help="also one 0/255 PNG per object and frame: DIR/<object>/<frame>.png"
    )
    track.add_argument(
        "--overlay",
        type=Path,
        metavar="DIR|VIDEO.mp4",
        help="the frames with their objects and prompts drawn: a folder of PNGs, or a video when the name ends in .mp4",
    )
    track.add_argument("--reverse", action="store_true", help="track backwards from the start frame")
    track.add_argument(
        "--start-frame",
        type=_frame_index,
        metavar="N",
        help="where tracking starts (default: the earliest prompted frame)",
    )
    track.add_argument(
        "--max-frames", type=_frame_index, metavar="N", help="track at most N frames after the start frame"
    )
    track.add_argument(
        "--threshold", type=float, default=MASK_THRESHOLD, help="mask logits above this are the object's"
    )
    track.add_argument(
        "--non-overlap",
        action="store_true",
        help="each pixel in one object's mask at most (the highest logit's); the palette PNGs always are",
    )
    track.add_argument(
        "--fill-hole-area",
        type=int,
        default=8,
        metavar="PIXELS",
        help="fill background holes up to this area in the low-resolution masks (0: off)",
    )
    track.add_argument(
        "--save-every",
        type=positive_int,
        default=20,
        metavar="N",
        help="save the session every N frames, where a killed run resumes",
    )
    track.add_argument(
        "--overwrite", action="store_true", help="start again in a DIR that holds another run's (or other) files"
    )
    track.set_defaults(run=run_track)
