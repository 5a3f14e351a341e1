"""The frames of a video as a sequence of PIL images that are decoded only when they are indexed.

`open_frames(path)` reads a folder of JPEG / PNG frames (the layout of DAVIS and of SAM 2's own examples) or a
video file through PyAV (the `video` extra: `pip install 'finesam[video]'`). Both give a `FrameSource`: its
length, its frame size, a name per frame (what output files are called) and `source[i]`, an RGB image.

A video file is indexed once, without decoding (its packets' timestamps and keyframes); frames are then decoded
in order while they are asked for in order, and a frame behind the decoder, or far ahead of it, is reached by
seeking to the keyframe before it and decoding forward. The frames decoded on the way are kept in a small cache
(`cache_bytes`), so that walking a video backwards decodes each group of pictures a few times, not once per frame.
"""

import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

from PIL import Image, UnidentifiedImageError

from finesam.inputs import as_rgb, open_image, special_file

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
# decoded frames kept by a video file's reader (RGB): about 100 frames of 854 x 480, 14 of 1920 x 1080
DEFAULT_CACHE_BYTES = 128 * 2**20
VIDEO_EXTRA = "reading video files needs PyAV: pip install 'finesam[video]' (or pip install av)"


class FrameSource(Sequence[Image.Image]):
    """The frames of one video, decoded when indexed: `len`, `source[i]` (an RGB PIL image, negative indices and
    slices as a list), `size` (width, height, the same for every frame) and `names` (one per frame, unique, no
    suffix: the names of output files)."""

    path: Path
    size: tuple[int, int]
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...

    @overload
    def __getitem__(self, index: slice) -> list[Image.Image]: ...

    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        if isinstance(index, slice):
            return [self.frame(i) for i in range(*index.indices(len(self)))]
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"frame {index} of a video of {count} frames")
        return self.frame(index % count)

    def __iter__(self) -> Iterator[Image.Image]:
        for i in range(len(self)):
            yield self.frame(i)

    def frame(self, index: int) -> Image.Image:
        """Frame `index` (0 <= index < len), decoded."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases the open file, if any; a later index opens it again."""

    def __enter__(self) -> "FrameSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fps(self) -> float | None:
        """Frames per second where the source says (a video file), else None."""
        return None

    def __repr__(self) -> str:
        width, height = self.size
        return f"{type(self).__name__}({str(self.path)!r}, {len(self)} frames of {width} x {height})"


def open_frames(path: str | Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> FrameSource:
    """The frames of a folder of JPEG / PNG images or of a video file.

    Args:
        path: a folder (frames sorted by the integer value of their names when every name is an integer, as
            DAVIS and SAM 2 number them, else by name; other files are ignored) or a video file in any format
            FFmpeg reads (mp4, webm, avi, mov, mkv, ...).
        cache_bytes: how many bytes of decoded RGB frames a video file's reader keeps (at least two frames).

    Raises:
        ValueError: the path is missing; the folder holds no frame, frames of different sizes or two frames of
            one name; the file is not a video or has no video stream; PyAV is not installed (a video file).
    """
    path = Path(path)
    if path.is_dir():
        return FrameFolder(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    if (kind := special_file(path)) is not None:
        raise ValueError(f"{path}: is {kind}, not a video file or a folder of frames")
    return VideoFile(path, cache_bytes=cache_bytes)


def _oriented_size(file: Path) -> tuple[int, int]:
    """(width, height) of an image file as `as_rgb` turns it (its EXIF orientation applied), from its header."""
    try:
        with Image.open(file) as image:
            width, height = image.size
            # orientations 5 to 8 turn the picture a quarter: width and height swap
            if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                width, height = height, width
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ValueError(f"{file}: not a readable image: {e}") from None
    return width, height


_INTEGER = re.compile(r"[0-9]+")


class FrameFolder(FrameSource):
    """The JPEG / PNG frames of a folder, in the order of the integers their names are (else by name)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            files = [f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES and f.is_file()]
        except OSError as e:
            raise ValueError(f"{path}: cannot list the folder: {e.strerror or e}") from None
        if not files:
            raise ValueError(f"{path}: no frames (JPEG or PNG files) in the folder")
        if all(_INTEGER.fullmatch(f.stem) for f in files):
            files.sort(key=lambda f: (int(f.stem), f.name))
        else:
            files.sort(key=lambda f: f.name)
        self.files = files
        self.names = [f.stem for f in files]
        seen: dict[str, Path] = {}
        for file in files:
            if (other := seen.setdefault(file.stem, file)) is not file:
                raise ValueError(f"{path}: {other.name} and {file.name} are two frames of one name: keep one")
        sizes: dict[tuple[int, int], Path] = {}
        for file in files:
            sizes.setdefault(_oriented_size(file), file)
        if len(sizes) > 1:
            shown = ", ".join(f"{w} x {h} ({f.name})" for (w, h), f in list(sizes.items())[:3])
            raise ValueError(f"{path}: the frames are not all of one size: {shown}")
        (self.size,) = sizes

    def frame(self, index: int) -> Image.Image:
        image = as_rgb(open_image(self.files[index]))
        if image.size != self.size:  # replaced since the folder was opened
            raise ValueError(f"{self.files[index]}: {image.width} x {image.height}, not the video's {self.size}")
        return image


def _import_av() -> Any:
    try:
        import av
    except ImportError:
        raise ValueError(VIDEO_EXTRA) from None
    return av


class VideoFile(FrameSource):
    """The frames of a video file, through PyAV: indexed once without decoding, decoded when asked for."""

    def __init__(self, path: Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.path = path
        self._av = _import_av()
        self._container: Any = None
        self._decoded: Iterator[tuple[int, Any]] | None = None  # the open decoder's frames, in presentation order
        self._next = 0  # the index of the frame the open decoder gives next (when it is open)
        container = self._open()
        try:
            stream = container.streams.video[0]
            self.size = (stream.codec_context.width, stream.codec_context.height)
            rate = stream.average_rate
            self._fps = float(rate) if rate else None
            self._timestamps, self._keyframes = self._index(container, stream)
        except Exception:
            self.close()
            raise
        if not self._timestamps:
            self.close()
            raise ValueError(f"{path}: the video stream holds no frame")
        self._position = {pts: i for i, pts in enumerate(self._timestamps)}
        self.names = [f"{i:05d}" for i in range(len(self._timestamps))]
        width, height = self.size
        self.cache_frames = max(2, cache_bytes // max(1, 3 * width * height))
        self._cache: OrderedDict[int, Image.Image] = OrderedDict()
        self.decoded = 0  # frames converted to RGB so far (what reading backwards costs)

    @property
    def fps(self) -> float | None:
        return self._fps

    def _open(self) -> Any:
        av = self._av
        try:
            container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError) as e:
            raise ValueError(f"{self.path}: not a video file FFmpeg reads: {e}") from None
        if not container.streams.video:
            container.close()
            raise ValueError(f"{self.path}: holds no video stream")
        self._container = container
        return container

    def _index(self, container: Any, stream: Any) -> tuple[list[int], list[int]]:
        """Every frame's timestamp in presentation order, and the indices of the keyframes, from the packets
        (demuxed, not decoded)."""
        timestamps: list[int] = []
        keys: set[int] = set()
        try:
            for packet in container.demux(stream):
                pts = packet.pts if packet.pts is not None else packet.dts
                if pts is None or packet.size == 0:  # the empty packet that ends the stream
                    continue
                timestamps.append(pts)
                if packet.is_keyframe:
                    keys.add(pts)
        except self._av.error.FFmpegError as e:
            raise ValueError(f"{self.path}: the video cannot be read: {e}") from None
        timestamps.sort()
        if len(set(timestamps)) != len(timestamps):
            raise ValueError(f"{self.path}: frames with the same timestamp: the video cannot be indexed")
        keyframes = [i for i, pts in enumerate(timestamps) if pts in keys] or [0]
        return timestamps, keyframes  # the container is at its end: the first frame asked for seeks

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
        self._container, self._decoded = None, None

    def frame(self, index: int) -> Image.Image:
        if (cached := self._cache.get(index)) is not None:
            self._cache.move_to_end(index)
            return cached
        keyframe = self._keyframes[self._keyframe_before(index)]
        # forward from where the decoder is when that is on the way, else from the keyframe before the frame
        if self._decoded is None or not keyframe <= self._next <= index:
            self._seek(keyframe)
        image = self._decode_until(index)
        if image is None:  # the demuxer's seek landed after the frame: decode from the start
            self._seek(0, start=True)
            image = self._decode_until(index)
        if image is None:
            raise ValueError(f"{self.path}: frame {index} could not be decoded")
        return image

    def _keyframe_before(self, index: int) -> int:
        low, high = 0, len(self._keyframes) - 1  # the last keyframe <= index (the first frame counts as one)
        while low < high:
            middle = (low + high + 1) // 2
            if self._keyframes[middle] <= index:
                low = middle
            else:
                high = middle - 1
        return low

    def _seek(self, index: int, start: bool = False) -> None:
        container = self._container if self._container is not None else self._open()
        stream = container.streams.video[0]
        if start:
            container.seek(self._timestamps[0], stream=stream, backward=True, any_frame=False)
            self._next = 0
        else:
            container.seek(self._timestamps[index], stream=stream, backward=True, any_frame=False)
            self._next = index
        self._decoded = self._frames(container, stream)

    def _frames(self, container: Any, stream: Any) -> Iterator[tuple[int, Any]]:
        try:
            for decoded in container.decode(stream):
                pts = decoded.pts
                if pts is not None and (index := self._position.get(pts)) is not None:
                    yield index, decoded
        except self._av.error.FFmpegError as e:
            raise ValueError(f"{self.path}: the video cannot be decoded: {e}") from None

    def _decode_until(self, index: int) -> Image.Image | None:
        """Decodes forward to frame `index`, caching what it passes from `_next` on; None when the decoder
        starts beyond it."""
        assert self._decoded is not None
        first = self._next
        for found, decoded in self._decoded:
            if found < first:  # frames of the group before the keyframe sought (open groups of pictures)
                continue
            if found > index:
                self._decoded = None  # passed it: the next access seeks
                return None
            image = decoded.to_image()
            self.decoded += 1
            self._remember(found, image)
            self._next = found + 1
            if found == index:
                return image
        self._decoded = None
        return None

    def _remember(self, index: int, image: Image.Image) -> None:
        self._cache[index] = image
        self._cache.move_to_end(index)
        while len(self._cache) > self.cache_frames:
            self._cache.popitem(last=False)
