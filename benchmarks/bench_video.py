"""Video tracking speed: finesam's `VideoPredictor` against Meta's `sam2` 1.1.0 `SAM2VideoPredictor` (built as
`build_sam2_video_predictor` builds it) and HF transformers' `Sam2VideoModel`, in the same process, alternating.

One run is a whole session on a clip of JPEG frames: start it, prompt each object with a box on the first frame,
propagate to the end. The official predictor reads and resizes every frame in `init_state`; ours decodes each frame
when it is tracked; HF's session gets the frames preprocessed by the run itself (its video processor needs
torchvision), so every column pays for its decoding. Same seeded random weights for the official predictor and ours
(our converter); HF gets the image model's weights renamed (`finesam.weights.hf`) and random memory weights (speed
does not depend on them). Prints milliseconds per frame and the ratios to the official time.

    python benchmarks/bench_video.py --size tiny --frames 12 --objects 1,3 --repeats 3
"""

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference"), str(Path(__file__).resolve().parent)]

import torch
import transformers  # before the reference: its torchvision stand-in confuses transformers' import checks
from PIL import Image

from finesam.model.sam2.processing import video_frame_input
from finesam.video.predictor import VideoPredictor
from finesam.weights.hf import to_hf_state_dict
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.loading import convert_checkpoint

from bench import alternating_median_ms
from official_sam2 import VIDEO_PREDICTOR, build_official_sam2

SIZES = {"tiny": "sam2.1_hiera_tiny", "small": "sam2.1_hiera_small", "base_plus": "sam2.1_hiera_base_plus"}


def write_clip(folder: Path, frames: int, size: tuple[int, int]) -> None:
    """Shifted crops of a real photo (the object moves) as JPEG files 00000.jpg ..."""
    from skimage import data

    source = Image.fromarray(data.coffee()).resize((1800, 1200), Image.Resampling.LANCZOS)
    width, height = size
    for t in range(frames):
        left, top = 100 + 12 * t, 60 + 6 * t
        crop = source.crop((left, top, left + 2 * width, top + 2 * height)).resize(size, Image.Resampling.BILINEAR)
        crop.save(folder / f"{t:05d}.jpg", format="JPEG", quality=95)


def boxes(count: int, size: tuple[int, int]) -> list[list[float]]:
    width, height = size
    return [[width * (0.1 + 0.2 * i), height * 0.2, width * (0.35 + 0.2 * i), height * 0.7] for i in range(count)]


def official_run(official: Any, folder: Path, prompts: list[list[float]]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            state = official.init_state(str(folder))
            for i, box in enumerate(prompts):
                official.add_new_points_or_box(state, frame_idx=0, obj_id=i + 1, box=box)
            for _ in official.propagate_in_video(state):
                pass

    return run


def ours_run(predictor: VideoPredictor, paths: list[Path], prompts: list[list[float]]) -> Callable[[], None]:
    class Frames:  # decoded when indexed, as `finesam.video.frames` reads a folder
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> Image.Image:
            with Image.open(paths[i]) as image:
                return image.convert("RGB")

    def run() -> None:
        session = predictor.init_state(Frames())  # type: ignore[arg-type]
        for i, box in enumerate(prompts):
            predictor.add_new_points_or_box(session, frame_idx=0, obj_id=i + 1, box=box)
        for _ in predictor.propagate_in_video(session):
            pass

    return run


def hf_model(official_state: dict[str, torch.Tensor]) -> Any:
    """HF's Sam2VideoModel (Hiera-T defaults): the image model's weights, random memory weights."""
    model = transformers.Sam2VideoModel(transformers.Sam2VideoConfig()).eval()
    image = to_hf_state_dict({k: v for k, v in official_state.items() if not is_memory_key(k)}, "sam2")
    missing = model.load_state_dict(image, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys[:5]
    return model


def hf_run(model: Any, paths: list[Path], prompts: list[list[float]], side: int) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            frames = []
            for path in paths:
                with Image.open(path) as image:
                    frames.append(video_frame_input(image.convert("RGB"), side)[0])
            width, height = Image.open(paths[0]).size
            session = transformers.Sam2VideoInferenceSession(
                video=torch.stack(frames), video_height=height, video_width=width, dtype=torch.float32
            )
            scale = torch.tensor([side / width, side / height])
            for i, box in enumerate(prompts):
                corners = torch.tensor(box).view(1, 1, 2, 2) * scale
                index = session.obj_id_to_idx(i + 1)
                session.add_point_inputs(
                    index, 0, {"point_coords": corners, "point_labels": torch.tensor([[[2, 3]]], dtype=torch.int32)}
                )
            session.obj_with_new_inputs = list(range(1, len(prompts) + 1))
            model(inference_session=session, frame_idx=0)
            for _ in model.propagate_in_video_iterator(session):
                pass

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--objects", default="1,3", help="object counts, comma-separated")
    parser.add_argument("--width", type=int, default=854)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", action="store_true", help="leave HF transformers out")
    args = parser.parse_args()
    torch.manual_seed(0)
    name = SIZES[args.size]
    official: Any = build_official_sam2(name, VIDEO_PREDICTOR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.save({"model": official.state_dict()}, root / f"{name}.pt")
        path = convert_checkpoint(root / f"{name}.pt", root / "converted").written[0]
        ours = VideoPredictor.from_weights(path)
        ours_bf16 = VideoPredictor.from_weights(path, dtype=torch.bfloat16)
        hf = None if args.no_hf or args.size != "tiny" else hf_model(official.state_dict())
        folder = root / "clip"
        folder.mkdir()
        size = (args.width, args.height)
        write_clip(folder, args.frames, size)
        paths = sorted(folder.glob("*.jpg"))
        print(f"{name}, {args.frames} frames of {args.width}x{args.height}, {torch.get_num_threads()} threads")
        print(f"{'objects':>7} {'official':>10} {'ours':>10} {'ratio':>6} {'ours bf16':>10} {'ratio':>6}", end="")
        print(f" {'HF':>10} {'ratio':>6}" if hf is not None else "")
        for count in (int(c) for c in args.objects.split(",")):
            prompts = boxes(count, size)
            runs = [official_run(official, folder, prompts), ours_run(ours, paths, prompts)]
            runs.append(ours_run(ours_bf16, paths, prompts))
            if hf is not None:
                runs.append(hf_run(hf, paths, prompts, official.image_size))
            per_frame = [ms / args.frames for ms in alternating_median_ms(*runs, repeats=args.repeats)]
            line = f"{count:>7} {per_frame[0]:>8.0f}ms"
            for ms in per_frame[1:]:
                line += f" {ms:>8.0f}ms {ms / per_frame[0]:>5.2f}x"
            print(line)


if __name__ == "__main__":
    main()
