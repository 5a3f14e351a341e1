"""Small real clips for the video tests: crops of a photo that slide across it (a moving camera), written as a
folder of frames or encoded by PyAV into a video file, and decoded back the plain way (every frame in order)."""

from pathlib import Path

import numpy as np
from PIL import Image

from conftest import photo


def moving_crops(count: int, width: int = 96, height: int = 64, step: tuple[int, int] = (3, 4)) -> list[np.ndarray]:
    """`count` (height, width, 3) uint8 frames: crops of the astronaut photo, each `step` (x, y) pixels further."""
    picture = np.asarray(photo("astronaut"))
    dx, dy = step
    assert (count - 1) * dx + width <= picture.shape[1] and (count - 1) * dy + height <= picture.shape[0]
    return [np.ascontiguousarray(picture[dy * i : dy * i + height, dx * i : dx * i + width]) for i in range(count)]


def write_folder(folder: Path, frames: list[np.ndarray], suffix: str = ".png", name: str = "{:05d}") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name.format(i)}{suffix}" for i in range(len(frames))]
    for frame, path in zip(frames, paths, strict=True):
        if suffix == ".png":
            Image.fromarray(frame).save(path)
        else:
            Image.fromarray(frame).save(path, quality=95)
    return paths


def write_video(path: Path, frames: list[np.ndarray], codec: str = "libx264", gop: int = 12, rate: int = 10) -> Path:
    """The frames encoded into `path` (its suffix picks the container), a keyframe every `gop` frames."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def decoded_in_order(path: Path) -> list[np.ndarray]:
    """Every frame of a video file, decoded from the first to the last by PyAV alone."""
    import av

    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
