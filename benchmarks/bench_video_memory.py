"""Memory of video tracking: peak RSS of tracking one object through a long 480p clip, streaming (the session
keeps a window of memories) against keeping every frame's memory, for SAM 2.1 Hiera-T and Hiera-B+.

    python benchmarks/bench_video_memory.py [--frames 1000] [--sizes tiny base_plus] [--modes window all]

The clip is written once to a temporary mp4 (854 x 480, moving crops of a photo drawn at random, h264) and read
back through `finesam.video.open_frames`, as `finesam track` reads a video: frames decoded when needed. Each
measurement runs in a fresh process on a converted random-weight model of that size (memory does not depend on
the weights' values): a box on frame 0, then propagation to the last frame. Printed per run: frames processed,
the RSS after loading the model and opening the session ("loaded"), the peak RSS during tracking over it (VmHWM,
reset after loading), RSS growth per 100 frames (from the 10% mark to the end: run enough frames that the window
is full there, > 16 frames of pointers), the session's own tensors at the end (`VideoSession.stored`) and the
frames per second, then the RSS at every tenth of the run.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference")]
from finesam.weights.loading import convert_checkpoint

from official_sam2 import build_official_sam2

WIDTH, HEIGHT = 854, 480

CHILD = """
import json, time, torch
from finesam.video.frames import open_frames
from finesam.video.predictor import VideoPredictor

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024

torch.set_grad_enabled(False)
predictor = VideoPredictor.from_weights({weights!r})
frames = open_frames({video!r})
session = predictor.init_state(frames, keep_memories={mode!r})
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here: the peak of tracking, not of loading
loaded = status("VmRSS")
predictor.add_new_points_or_box(session, 0, 1, box=[300, 120, 560, 400])
rss, started = [], time.perf_counter()
for frame, ids, masks in predictor.propagate_in_video(session):
    rss.append(status("VmRSS"))
elapsed = time.perf_counter() - started
entries, stored = session.stored()
print(json.dumps({{"loaded": loaded, "peak": status("VmHWM") - loaded, "rss": rss, "seconds": elapsed,
                  "entries": entries, "stored": stored / 2**20}}))
"""


def write_clip(path: Path, frames: int, seed: int = 0) -> Path:
    """A 480p clip: a random 'photo' (smooth colour noise) panned across, h264."""
    import av

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (HEIGHT // 16 + 8, (WIDTH + frames) // 16 + 8, 3), dtype=np.uint8)
    picture = np.kron(coarse, np.ones((16, 16, 1), dtype=np.uint8))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(frames):
            crop = np.ascontiguousarray(picture[:HEIGHT, i : i + WIDTH])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(crop, format="rgb24")))
        container.mux(stream.encode())
    return path


def converted(size: str, folder: Path) -> Path:
    name = f"sam2.1_hiera_{size}"
    official = build_official_sam2(name)
    torch.save({"model": official.state_dict()}, folder / f"{name}.pt")
    return convert_checkpoint(folder / f"{name}.pt", folder / "converted").written[0]


def run(weights: Path, video: Path, mode: str) -> dict:
    script = CHILD.format(weights=str(weights), video=str(video), mode=mode)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=1000)
    sizes = ["tiny", "small", "base_plus", "large"]
    parser.add_argument("--sizes", nargs="+", default=["tiny", "base_plus"], choices=sizes)
    parser.add_argument("--modes", nargs="+", default=["window", "all"], choices=["window", "all"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = write_clip(Path(tmp) / "clip.mp4", args.frames)
        print(f"{args.frames} frames of {WIDTH} x {HEIGHT}, one object (a box on frame 0), torch {torch.__version__}")
        for size in args.sizes:
            weights = converted(size, Path(tmp))
            for mode in args.modes:
                numbers = run(weights, video, mode)
                rss = numbers["rss"]
                mark = max(1, len(rss) // 10)
                growth = (rss[-1] - rss[mark - 1]) / max(1, len(rss) - mark) * 100
                print(
                    f"  sam2.1_hiera_{size:9s} {mode:6s} {len(rss)} frames, loaded {numbers['loaded']:6.0f} "
                    f"MiB, peak +{numbers['peak']:6.0f} MiB, growth {growth:+6.1f} MiB / 100 frames, session "
                    f"{numbers['entries']} results {numbers['stored']:7.1f} MiB, "
                    f"{len(rss) / numbers['seconds']:.2f} frames/s"
                )
                # where the growth happens: the RSS at every tenth of the run
                marks = sorted({*range(0, len(rss), max(1, len(rss) // 10)), len(rss) - 1})
                print("    RSS (MiB) after frame: " + ", ".join(f"{i + 1}: {rss[i]:.0f}" for i in marks))


if __name__ == "__main__":
    main()
