"""`finesam.video.frames.open_frames`: folders of frames and video files (PyAV) as sequences of PIL images
decoded when indexed. A video file read in order, at random and backwards gives the pixels of PyAV decoding every
frame in order; reading it backwards decodes each frame a few times at most (the cache), not once per frame."""

import random
import sys

import numpy as np
import pytest
from PIL import Image

from finesam.video.frames import FrameFolder, VideoFile, open_frames

from video_clips import decoded_in_order, moving_crops, write_folder, write_video

FRAMES = 40


@pytest.fixture(scope="module")
def clip() -> list[np.ndarray]:
    return moving_crops(FRAMES)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_a_folder_of_frames_is_read_in_the_order_of_its_numbers(tmp_path, clip, suffix):
    write_folder(tmp_path, clip[:12], suffix, name="{}")  # 0, 1, ..., 10, 11: by name 10 would come before 2
    (tmp_path / "notes.txt").write_text("not a frame")
    (tmp_path / "sub").mkdir()
    frames = open_frames(tmp_path)
    assert isinstance(frames, FrameFolder)
    assert len(frames) == 12 and frames.size == (96, 64)
    assert frames.names == [str(i) for i in range(12)]
    for i in (0, 2, 10, 11, -1):
        expected = np.asarray(Image.open(tmp_path / f"{frames.names[i]}{suffix}").convert("RGB"))
        assert np.array_equal(np.asarray(frames[i]), expected)
        assert frames[i].mode == "RGB"
    if suffix == ".png":
        assert np.array_equal(np.asarray(frames[10]), clip[10])
    assert len(frames[2:5]) == 3
    with pytest.raises(IndexError):
        frames[12]


def test_names_that_are_not_all_integers_are_sorted_by_name(tmp_path, clip):
    for name, frame in zip(["b", "a", "10", "c2"], clip, strict=False):
        Image.fromarray(frame).save(tmp_path / f"{name}.png")
    assert open_frames(tmp_path).names == ["10", "a", "b", "c2"]


def test_folder_errors(tmp_path, clip):
    with pytest.raises(ValueError, match="no frames"):
        open_frames(tmp_path)
    with pytest.raises(ValueError, match="no such file or folder"):
        open_frames(tmp_path / "missing")
    write_folder(tmp_path, clip[:2])
    Image.fromarray(clip[2][:32]).save(tmp_path / "00002.png")
    with pytest.raises(ValueError, match=r"not all of one size: 96 x 64 \(00000.png\), 96 x 32 \(00002.png\)"):
        open_frames(tmp_path)
    (tmp_path / "00002.png").unlink()
    Image.fromarray(clip[1]).save(tmp_path / "00001.jpg")
    with pytest.raises(ValueError, match="two frames of one name"):
        open_frames(tmp_path)


CODECS = {"h264.mp4": "libx264", "mpeg4.avi": "mpeg4", "vp9.webm": "libvpx-vp9", "h264.mov": "libx264"}


@pytest.mark.parametrize("name", list(CODECS))
def test_a_video_file_gives_the_frames_of_decoding_it_in_order(tmp_path, clip, name):
    path = write_video(tmp_path / name, clip, CODECS[name], gop=12)
    expected = decoded_in_order(path)
    assert len(expected) == FRAMES

    def pixels(frames: VideoFile, order: list[int]) -> dict[int, np.ndarray]:
        return {i: np.asarray(frames[i]) for i in order}

    with open_frames(path) as frames:
        assert isinstance(frames, VideoFile)
        assert len(frames) == FRAMES and frames.size == (96, 64) and frames.fps == 10
        assert frames.names[:2] == ["00000", "00001"] and len(set(frames.names)) == FRAMES
        in_order = pixels(frames, list(range(FRAMES)))
        assert frames.decoded == FRAMES  # in order: each frame decoded once
    order = list(range(FRAMES))
    random.Random(0).shuffle(order)
    at_random = pixels(open_frames(path, cache_bytes=0), order)  # no cache: every access seeks or decodes on
    backwards = open_frames(path)
    from_the_end = pixels(backwards, list(reversed(range(FRAMES))))
    for i in range(FRAMES):
        assert np.array_equal(in_order[i], expected[i]), i
        assert np.array_equal(at_random[i], expected[i]), i
        assert np.array_equal(from_the_end[i], expected[i]), i
    assert backwards.decoded <= 2 * FRAMES, backwards.decoded  # each group of pictures decoded once, + the last
    # a lossy codec: still close to the frames that were encoded
    assert np.abs(in_order[5].astype(int) - clip[5]).mean() < 12


def test_reading_backwards_with_a_small_cache_stays_linear(tmp_path, clip):
    path = write_video(tmp_path / "long_gop.mp4", clip, gop=FRAMES)  # one keyframe
    frames = open_frames(path, cache_bytes=8 * 3 * 96 * 64)  # 8 frames
    assert frames.cache_frames == 8
    expected = decoded_in_order(path)
    for i in reversed(range(FRAMES)):
        assert np.array_equal(np.asarray(frames[i]), expected[i]), i
    # every 8 frames back, one decode from the keyframe: 40 + 32 + 24 + 16 + 8, not 40 * 41 / 2
    assert frames.decoded == 120, frames.decoded


def test_video_file_errors(tmp_path, clip, monkeypatch):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 20)
    with pytest.raises(ValueError, match="not a video file FFmpeg reads"):
        open_frames(text)
    import av

    audio = tmp_path / "sound.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(ValueError, match="holds no video stream"):
        open_frames(audio)
    video = write_video(tmp_path / "clip.mp4", clip[:3])
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(ValueError, match=r"pip install 'finesam\[video\]'"):
        open_frames(video)
