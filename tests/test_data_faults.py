"""The second fault round of the data commands (issue 34): a run never replaces or deletes what it did not make,
no input hangs it, Ctrl-C stops it, writers fail in one line, text inputs share one BOM rule, folder scans take
images only, manifests are read as recorded, COCO files score against themselves, messages say what happened.

Real subprocesses, real FIFOs and links, a real small tmpfs for a full disk; the small random weights of the
other CLI tests.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as coco_mask

from conftest import SMALL, photo
from helpers import FINESAM_COMMAND, finesam
from official import build_official

SIZE = (96, 64)  # small photos: each image takes a few milliseconds with the small weights


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "sam_small.pth"
    torch.save(build_official(SMALL, seed=2).state_dict(), path)
    return path


def save_photo(path: Path, source: str = "rocket", size: tuple[int, int] = SIZE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    photo(source).resize(size).save(path, format=fmt)
    return path


def write_lines(path: Path, lines: list[object], bom: bool = False) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def box_line(name: str, box: tuple[int, int, int, int] = (5, 5, 60, 50)) -> dict[str, object]:
    return {"image": name, "boxes": [list(box)]}


def manifest_run(manifest: Path, weights: Path, out: Path, *extra: object):
    return finesam("segment", "--manifest", manifest, "--weights", weights, "--out", out, *extra)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# 1. data loss ----------------------------------------------------------------------------------------------------


def test_overwrite_removes_only_what_the_earlier_run_recorded(tmp_path, weights):
    images = tmp_path / "images"
    for name in ("a.png", "b.jpg"):
        save_photo(images / name)
    manifest = write_lines(images / "m.jsonl", [box_line("a.png"), box_line("b.jpg")])
    out = tmp_path / "out"
    assert manifest_run(manifest, weights, out).returncode == 0  # no --png: masks/ is not the run's
    truth = save_photo(out / "masks" / "gt" / "a.png", "chelsea")
    notes = out / "parts" / "notes.txt"
    notes.write_text("mine")
    result = manifest_run(manifest, weights, out, "--multimask", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert truth.is_file() and notes.read_text() == "mine"
    # an earlier --png run: its recorded PNGs go, a file of the user's beside them stays
    png_out = tmp_path / "png"
    assert manifest_run(manifest, weights, png_out, "--png").returncode == 0
    recorded = [p for p in (png_out / "masks").rglob("*.png") if p.is_file()]
    assert len(recorded) == 2
    extra = save_photo(png_out / "masks" / "a.png" / "reviewed.png")
    only_a = write_lines(images / "a.jsonl", [box_line("a.png")])
    result = manifest_run(only_a, weights, png_out, "--png", "--multimask", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert extra.is_file() and json.loads((png_out / "run.json").read_text())["multimask"] is True
    left = sorted(p.relative_to(png_out).as_posix() for p in (png_out / "masks").rglob("*") if p.is_file())
    assert left == ["masks/a.png/0000.png", "masks/a.png/reviewed.png"]  # b.jpg's recorded mask (and folder) went
    # a hand-made masks/ is never written into by --png, even with --overwrite
    for extra_options in ([], ["--overwrite"]):
        result = manifest_run(manifest, weights, out, "--png", *extra_options)
        assert result.returncode == 2 and "masks" in result.stderr and "use another --out" in result.stderr
        assert truth.is_file()


def test_outputs_that_no_run_recorded_are_refused_unless_overwrite(tmp_path, weights):
    images = tmp_path / "images"
    save_photo(images / "a.png")
    manifest = write_lines(images / "m.jsonl", [box_line("a.png")])
    for name in ("annotations.json", "errors.jsonl"):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text("the dataset's own")
        for command in (
            ["segment", "--manifest", manifest],
            ["everything", images, "--points-per-side=2"],
        ):
            result = finesam(*command, "--weights", weights, "--out", out)
            assert result.returncode == 2 and f"{out / name} exists" in result.stderr, result.stderr
            assert (out / name).read_text() == "the dataset's own" and not (out / "run.json").exists()
        assert manifest_run(manifest, weights, out, "--overwrite").returncode == 0
        assert (out / "run.json").is_file() and (out / name).read_text() != "the dataset's own"


@pytest.mark.parametrize("source", ["folder", "list", "manifest"])
def test_png_mask_folders_are_unique_per_image(tmp_path, weights, source):
    images = tmp_path / "images"
    names = ["a.png", "a.jpg", "a.PNG", "sub/a.png", "A.png"]
    for name, picture in zip(names, ["rocket", "chelsea", "astronaut_crop", "coffee", "astronaut"], strict=True):
        save_photo(images / name, picture)
    out = tmp_path / "out"
    if source == "manifest":
        # boxes of different sizes: every image's masks differ
        lines = [box_line(name, (2 * i, 2 * i, 60 + 5 * i, 40 + 4 * i)) for i, name in enumerate(names)]
        result = manifest_run(
            write_lines(tmp_path / "m.jsonl", [{**line, "image": f"images/{line['image']}"} for line in lines]),
            weights,
            out,
            "--png",
        )
    else:
        given = images if source == "folder" else write_lines(tmp_path / "list.txt", [f"images/{n}" for n in names])
        result = finesam(
            "everything",
            given,
            "--weights",
            weights,
            "--out",
            out,
            "--png",
            "--points-per-side=4",
            "--pred-iou-thresh=0",
            "--stability-score-thresh=0",
        )
    assert result.returncode == 0, result.stderr
    document = json.loads((out / "annotations.json").read_text())
    assert len(document["images"]) == len(names)
    folders: dict[int, set[str]] = {}
    for record in document["annotations"]:
        path = out / record["mask_file"]
        mask = np.asarray(Image.open(path)) > 0
        assert np.array_equal(mask, coco_mask.decode(record["segmentation"]).astype(bool)), record["mask_file"]
        folders.setdefault(record["image_id"], set()).add(str(Path(record["mask_file"]).parent).lower())
    assert len(folders) == len(names)
    for image_id, mine in folders.items():  # unique even where case is ignored
        assert all(not mine & theirs for other, theirs in folders.items() if other != image_id)


def test_segment_outputs_never_replace_inputs_or_each_other(tmp_path, weights):
    image = save_photo(tmp_path / "image.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"box": [5, 5, 60, 50]}, {"box": [1, 1, 30, 30]}]))
    (tmp_path / "link.png").symlink_to(image)
    os.link(image, tmp_path / "hard.png")
    before = snapshot(tmp_path)
    base = ["segment", image, "--weights", weights, "--box", "5,5,60,50"]
    cases = [
        ["--out", image],  # the input itself
        ["--out", tmp_path / "link.png"],  # through a symbolic link
        ["--out", tmp_path / "hard.png"],  # through a hard link
        ["--out", tmp_path / "m.png", "--logits", tmp_path / "m.png"],
        ["--out", tmp_path / "m.png", "--overlay", tmp_path / "m.png"],
        ["--out", tmp_path / "m.png", "--overlay", tmp_path / "sub" / ".." / "image.png"],
        ["--out", tmp_path / "m.png", "--logits", tmp_path / "logits.png"],  # not .npy
        ["--out", tmp_path / "m.png", "--weights", tmp_path / "m.png"],
    ]
    for extra in cases:
        result = finesam(*base, *extra)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (extra, result.stderr)
    # with --prompts the outputs are numbered: m_1.png is the overlay too
    result = finesam(
        "segment",
        image,
        "--weights",
        weights,
        "--prompts",
        prompts,
        "--out",
        tmp_path / "m.png",
        "--overlay",
        tmp_path / "m_1.png",
    )
    assert result.returncode == 2 and "m_1.png" in result.stderr
    result = finesam("segment", image, "--weights", weights, "--prompts", prompts, "--out", prompts.with_suffix(".png"))
    assert result.returncode == 0, result.stderr
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    assert "same file" in finesam(*base, "--out", image).stderr


# 2. hangs -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def alarm():
    """A test that would hang fails instead: SIGALRM interrupts a blocked open after 30 s."""

    def timed_out(signum: int, frame: object) -> None:
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, timed_out)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_inputs_that_block_on_open_are_refused_in_one_line(tmp_path, weights, alarm):
    images = tmp_path / "images"
    save_photo(images / "a.png")
    fifo = images / "b.png"
    os.mkfifo(fifo)
    (images / "c.png").symlink_to(fifo)
    fifo_list, fifo_prompts = tmp_path / "list.txt", tmp_path / "prompts.json"
    os.mkfifo(fifo_list)
    os.mkfifo(fifo_prompts)
    lists = [write_lines(tmp_path / f"{n}.txt", ["images/a.png", f"images/{n}"]) for n in ("b.png", "c.png")]
    manifest = write_lines(tmp_path / "m.jsonl", [box_line("images/a.png"), box_line("images/b.png")])
    cases = [
        (["segment", fifo, "--box", "1,1,9,9", "--out", tmp_path / "m.png"], "FIFO"),
        (["segment", "/dev/zero", "--box", "1,1,9,9", "--out", tmp_path / "m.png"], "a device"),
        (["segment", images / "a.png", "--prompts", fifo_prompts, "--out", tmp_path / "m.png"], "FIFO"),
        (["segment", "--manifest", manifest, "--out", tmp_path / "o1"], "m.jsonl:2"),
        (["segment", "--manifest", fifo_list, "--out", tmp_path / "o2"], "FIFO"),
        (["everything", lists[0], "--out", tmp_path / "o3"], "b.png.txt:2"),
        (["everything", lists[1], "--out", tmp_path / "o4"], "c.png.txt:2"),  # a link to a FIFO
        (["everything", fifo_list, "--out", tmp_path / "o5"], "FIFO"),
        (["everything", fifo, "--out", tmp_path / "o6"], "FIFO"),
    ]
    for args, words in cases:
        result = finesam(*args, "--weights", weights)
        assert result.returncode == 2 and words in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    # a folder leaves them out and says so
    result = finesam("everything", images, "--weights", weights, "--out", tmp_path / "o7", "--points-per-side=2")
    assert result.returncode == 0, result.stderr
    assert [i["file_name"] for i in json.loads((tmp_path / "o7" / "annotations.json").read_text())["images"]] == [
        "a.png"
    ]


def test_a_load_that_never_returns_does_not_keep_the_process_alive(tmp_path):
    """The decoding thread blocked for good on a real FIFO: the first SIGINT ends the process at once."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    script = (
        "import sys, time\n"
        "from finesam.labelling.prefetch import prefetched\n"
        "def load(path):\n"
        "    if path == 'slow':\n"
        "        time.sleep(0.2)\n"
        "        return path\n"
        "    return open(path).read()\n"
        "try:\n"
        f"    for job, value in prefetched(['slow', {str(fifo)!r}], load):\n"
        "        print(job, flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "slow"
    time.sleep(0.3)  # the thread is now blocked in open(fifo); the consumer waits for it
    process.send_signal(signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the first SIGINT did not end the process")
    assert process.returncode == 130 and "interrupted" in out


def test_ctrl_c_stops_a_run_at_once_and_keeps_what_was_committed(tmp_path, weights):
    images = tmp_path / "images"
    names = [f"{i:02d}.png" for i in range(24)]
    for i, name in enumerate(names):
        save_photo(images / name, ["rocket", "chelsea", "coffee"][i % 3])
    listing = write_lines(tmp_path / "list.txt", [f"images/{n}" for n in names])
    out = tmp_path / "out"
    args = ["everything", listing, "--weights", weights, "--out", out, "--points-per-side=4"]
    process = subprocess.Popen(
        [*FINESAM_COMMAND, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list((out / "parts").glob("*.json")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    try:
        _, err = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the first SIGINT did not end the run")
    assert time.monotonic() - sent < 10
    assert process.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    parts = list((out / "parts").glob("*.json"))
    assert 1 <= len(parts) < len(names) and all(json.loads(p.read_text())["key"] for p in parts)
    assert not (out / "annotations.json").exists()


# 3. tracebacks owed a line: long names, a full disk --------------------------------------------------------------


def test_long_legal_names_work_and_too_long_ones_are_refused_before_any_work(tmp_path, weights):
    image = save_photo(tmp_path / "image.png")
    box = ["--box", "5,5,60,50"]
    longest = "m" * (255 - len(".png"))  # the longest legal name: its temporary must fit too
    result = finesam(
        "segment",
        image,
        "--weights",
        weights,
        *box,
        "--out",
        tmp_path / f"{longest}.png",
        "--logits",
        tmp_path / f"{'l' * 251}.npy",
        "--overlay",
        tmp_path / f"{'o' * 251}.png",
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"{longest}.png").is_file() and not list(tmp_path.glob(".*.tmp"))
    for option in ("--out", "--logits", "--overlay"):
        outputs = {
            "--out": tmp_path / "m.png",
            option: tmp_path / ("x" * 253 + (".npy" if option == "--logits" else ".png")),
        }
        # absent weights: a check after loading would fail on them instead
        result = finesam(
            "segment",
            image,
            "--weights",
            tmp_path / "absent.pth",
            *box,
            *(a for flag, path in outputs.items() for a in (flag, path)),
        )
        assert result.returncode == 2 and "over the limit of 255" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    # a dataset whose image names are the longest legal ones: mask folders and files fit
    images = tmp_path / "images"
    long_image = save_photo(images / f"{'i' * 251}.jpg")
    manifest = write_lines(images / "m.jsonl", [box_line(long_image.name)])
    result = manifest_run(manifest, weights, tmp_path / "out", "--png")
    assert result.returncode == 0, result.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB tmpfs, and a way to fill it to `free` bytes. Mounting needs root, as the suite runs (CI
    included): elsewhere this is a failure that says so, not a skip."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.fail(f"cannot mount a 256 KiB tmpfs for the full-disk tests (needs root): {mounted.stderr!r}")

    def fill(free: int = 0) -> None:
        filler = disk / "filler"
        with open(filler, "ab", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        if free:
            os.truncate(filler, max(0, filler.stat().st_size - free))

    yield disk, fill
    subprocess.run(["umount", "-l", str(disk)], check=False)


def one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in ("No space left on device", *words)), result.stderr


def test_a_full_disk_is_one_line_and_what_was_committed_stays(small_disk, tmp_path, weights):
    disk, fill = small_disk
    image = save_photo(tmp_path / "image.png", size=(400, 267))  # its logits: 427 kB, more than the disk
    result = finesam(
        "segment",
        image,
        "--weights",
        weights,
        "--box",
        "5,5,60,50",
        "--out",
        disk / "m.png",
        "--logits",
        disk / "m.npy",
    )
    one_error_line(result, str(disk / "m.npy"))
    assert (disk / "m.png").is_file() and not (disk / "m.npy").exists() and not list(disk.glob(".*.tmp"))
    (disk / "m.png").unlink()
    # a dataset run: the first image committed, then the disk fills; then the merge of a finished run
    images = tmp_path / "images"
    for name in ("a.png", "b.png", "c.png"):
        save_photo(images / name)
    first = write_lines(images / "first.jsonl", [box_line("a.png")])
    out = disk / "out"
    assert manifest_run(first, weights, out).returncode == 0
    committed = snapshot(out)
    fill()
    every = write_lines(images / "first.jsonl", [box_line(n) for n in ("a.png", "b.png", "c.png")])
    one_error_line(manifest_run(every, weights, out), "the same command resumes")
    assert {k: v for k, v in snapshot(out).items() if k in committed} == committed
    (disk / "filler").unlink()
    assert manifest_run(every, weights, out).returncode == 0
    finished = snapshot(out)
    (out / "annotations.json").unlink()
    fill()
    one_error_line(manifest_run(every, weights, out), "annotations.json")
    assert {k: v for k, v in snapshot(out).items()} == {k: v for k, v in finished.items() if k != "annotations.json"}
    # convert: the converted file does not fit
    (disk / "filler").unlink()
    fill(free=8192)
    result = finesam("convert", weights, "--out", disk / "converted")
    one_error_line(result, "converted")
    assert not (disk / "converted").exists() or not list((disk / "converted").iterdir())  # no temporary left
    # export: the traced graphs do not fit in its staging folder; no earlier export is there to lose
    if importlib.util.find_spec("onnx") is not None and importlib.util.find_spec("onnxruntime") is not None:
        (disk / "filler").unlink()
        fill(free=65536)
        one_error_line(finesam("export", "--weights", weights, "--out", disk / "onnx"), "onnx")
        assert not list((disk / "onnx").iterdir())


# 4. wrong results ------------------------------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted_in_every_text_input(tmp_path, weights):
    images = tmp_path / "images"
    save_photo(images / "a.png")
    listing = write_lines(tmp_path / "list.txt", ["images/a.png"], bom=True)
    manifest = write_lines(tmp_path / "m.jsonl", [box_line("images/a.png")], bom=True)
    prompts = tmp_path / "prompts.json"
    prompts.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"box": [5, 5, 60, 50]}]).encode())
    result = finesam("everything", listing, "--weights", weights, "--out", tmp_path / "o1", "--points-per-side=2")
    assert result.returncode == 0, result.stderr
    assert manifest_run(manifest, weights, tmp_path / "o2").returncode == 0
    for out in ("o1", "o2"):
        names = [i["file_name"] for i in json.loads((tmp_path / out / "annotations.json").read_text())["images"]]
        assert names == ["images/a.png"]
    result = finesam(
        "segment", images / "a.png", "--weights", weights, "--prompts", prompts, "--out", tmp_path / "m.png"
    )
    assert result.returncode == 0, result.stderr
    from finesam.training.config import load_config

    config = tmp_path / "train.toml"
    config.write_bytes(
        b"\xef\xbb\xbf" + f'[model]\nweights = "{weights}"\n[data]\ntrain = "{images}"\n[lora]\n'.encode()
    )
    assert load_config(config).model.weights == weights
    # a BOM elsewhere than at the start is the text's own
    broken = write_lines(tmp_path / "broken.txt", ["images/a.png", "\ufeffimages/a.png"])
    result = finesam("everything", broken, "--weights", weights, "--out", tmp_path / "o3", "--points-per-side=2")
    assert result.returncode == 1 and "no such file" in result.stderr


def test_folder_scans_take_images_only_and_say_what_they_skipped(tmp_path, weights):
    images = tmp_path / "images"
    save_photo(images / "a.png")
    save_photo(images / "B.JPG")
    save_photo(images / "sub" / "c.tiff")
    for name in ("clip.mpg", "figure.ps", "data.h5", "notes.txt", "README"):
        (images / name).write_bytes(b"\x00\x00\x01\xba" + bytes(64))  # an MPEG pack header, and other bytes
    (images / ".hidden.mpg").write_bytes(bytes(8))
    out = tmp_path / "out"
    result = finesam("everything", images, "--weights", weights, "--out", out, "--points-per-side=2")
    assert result.returncode == 0, result.stderr
    names = [i["file_name"] for i in json.loads((out / "annotations.json").read_text())["images"]]
    assert names == ["B.JPG", "a.png", "sub/c.tiff"]
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "5 files that are not images" in skipped[0] and "clip.mpg" in skipped[0]
    assert ".hidden" not in skipped[0]


def test_manifest_and_list_paths_are_read_as_recorded(tmp_path, weights):
    images = tmp_path / "images"
    save_photo(images / "sub" / "a.png")
    manifest = write_lines(tmp_path / "m.jsonl", [box_line("images\\sub\\a.png"), box_line("images\\sub\\gone.png")])
    out = tmp_path / "out"
    result = manifest_run(manifest, weights, out)
    assert result.returncode == 1, result.stderr
    document = json.loads((out / "annotations.json").read_text())
    assert [i["file_name"] for i in document["images"]] == ["images/sub/a.png"] and document["annotations"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["image"] for e in errors] == ["images/sub/gone.png"]
    assert str(tmp_path / "images" / "sub" / "gone.png") in errors[0]["error"]  # what was tried
    listing = write_lines(tmp_path / "list.txt", ["images\\sub\\a.png"])
    result = finesam("everything", listing, "--weights", weights, "--out", tmp_path / "o2", "--points-per-side=2")
    assert result.returncode == 0, result.stderr


def empty_and_full(height: int = 20, width: int = 30) -> list:
    from finesam.amg.rle import mask_to_rle
    from finesam.labelling import SegmentedObject

    full = np.zeros((height, width), bool)
    full[3:12, 4:20] = True
    other = np.zeros((height, width), bool)
    other[10:18, 15:29] = True
    empty = np.zeros((height, width), bool)
    return [SegmentedObject(mask_to_rle(m), s, 1) for m, s in ((full, 0.9), (empty, 0.5), (other, 0.7))]


def self_score(annotations: Path) -> float:
    """COCOeval's segmentation AP of a COCO file's annotations scored against the file itself."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(annotations))
        found = truth.loadRes([dict(a) for a in truth.dataset["annotations"]])
        evaluation = COCOeval(truth, found, "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return float(evaluation.stats[0])


def test_empty_masks_are_left_out_and_counted_so_the_file_scores_itself_perfectly(tmp_path, weights):
    from finesam.labelling import ImageJob, LabellingRun

    image = save_photo(tmp_path / "a.png", size=(30, 20))
    job = ImageJob(image, "a.png")
    for keep_empty in (False, True):
        run = LabellingRun(tmp_path / f"out{keep_empty}", {"command": "test"}, keep_empty=keep_empty, png=True)
        run.start(overwrite=False)
        run.commit(job, Image.open(image), empty_and_full())
        summary = run.merge([job])
        document = json.loads((run.out / "annotations.json").read_text())
        areas = [a["area"] for a in document["annotations"]]
        if keep_empty:
            assert (summary.masks, summary.empty) == (3, 0) and 0 in areas
            assert self_score(run.out / "annotations.json") < 1.0  # why they are left out by default
        else:
            assert (summary.masks, summary.empty) == (2, 1) and 0 not in areas
            assert all(a["bbox"][2] > 0 and a["bbox"][3] > 0 for a in document["annotations"])
            assert self_score(run.out / "annotations.json") == 1.0
    # the CLI: the option is a setting of the run; a manifest's file scores itself perfectly
    images = tmp_path / "images"
    for name in ("a.png", "b.png"):
        save_photo(images / name)
    manifest = write_lines(images / "m.jsonl", [box_line("a.png"), box_line("b.png", (0, 0, 2, 2))])
    out = tmp_path / "cli"
    result = manifest_run(manifest, weights, out)
    assert result.returncode == 0 and self_score(out / "annotations.json") == 1.0
    result = manifest_run(manifest, weights, out, "--keep-empty")
    assert result.returncode == 2 and "keep_empty: False -> True" in result.stderr


# 5. messages that mislead ----------------------------------------------------------------------------------------


def test_unreadable_images_say_what_they_are(tmp_path, weights):
    files = {
        "clip.jpg": b"\x00\x00\x01\xba" + bytes(200),  # an MPEG stream named .jpg
        "paper.png": b"%PDF-1.4\n" + bytes(200),
        "empty.jpg": b"",
    }
    expected = {"clip.jpg": "no image format PIL reads", "paper.png": "no image format PIL reads", "empty.jpg": "empty"}
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        result = finesam("segment", path, "--weights", weights, "--box", "1,1,5,5", "--out", tmp_path / "m.png")
        assert result.returncode == 2 and expected[name] in result.stderr, result.stderr
        assert "truncated or corrupt" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    # permission denied, as a user who may not read the file: root reads everything, so as root the open runs
    # as nobody; any other user is refused a mode-000 file of its own
    secret = save_photo(tmp_path / "secret.png")
    secret.chmod(0o600 if os.geteuid() == 0 else 0o000)
    tmp_path.chmod(0o755)
    from finesam.inputs import open_image

    as_root = os.geteuid() == 0
    if as_root:
        os.seteuid(65534)  # nobody, for this one open; the real user stays root and takes the effective one back
    try:
        with pytest.raises(ValueError) as refused:
            open_image(secret)
    finally:
        if as_root:
            os.seteuid(0)
    assert "permission denied" in str(refused.value) and "truncated" not in str(refused.value)


def test_an_output_folder_that_is_the_input_folder_is_named(tmp_path, weights):
    images = tmp_path / "images"
    save_photo(images / "a.png")
    for out in (images, tmp_path):
        result = finesam("everything", images, "--weights", weights, "--out", out)
        assert result.returncode == 2 and "the input folder" in result.stderr and "no images" not in result.stderr
    result = finesam("everything", images, "--weights", weights, "--out", images / "labels", "--points-per-side=2")
    assert result.returncode == 0, result.stderr


# 6. the output-path rule, property-based ----------------------------------------------------------------------------

FILES = ("f0", "f1", "f2")  # regular files, each with its own bytes
NAMES = (*FILES, "s0", "s1", "h0", "m0", "m1", "x/../f0")  # s: symbolic links, h: a hard link, m: missing


def make_universe(root: Path, links: tuple[str, str, str]) -> dict[str, str]:
    """The files of NAMES under `root`: s0, s1 link to `links[0]`, `links[1]` (a file, or a missing name), h0 is a
    hard link to `links[2]`. Returns each name's ground truth: the underlying file, or the path it would be."""
    for name in FILES:
        (root / name).write_text(f"the user's {name}")
    truth = {name: name for name in NAMES}
    truth["x/../f0"] = "f0"
    for link, target in (("s0", links[0]), ("s1", links[1])):
        (root / link).symlink_to(root / target)
        truth[link] = truth[target]
    os.link(root / links[2], root / "h0")
    truth["h0"] = links[2]
    return truth


def state(root: Path) -> dict[str, tuple[str, object]]:
    """What each entry under `root` is: a link and its target, or a file and its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_file():
            found[key] = ("file", path.read_bytes())
    return found


@settings(max_examples=60, deadline=None)
@given(
    links=st.tuples(st.sampled_from(("f0", "f1", "m0")), st.sampled_from(("f1", "f2", "m1")), st.sampled_from(FILES)),
    inputs=st.lists(st.sampled_from(NAMES), max_size=3),
    outputs=st.lists(st.sampled_from(NAMES), min_size=1, max_size=3),
)
def test_outputs_never_touch_inputs_or_each_other(links, inputs, outputs):
    """For any inputs, outputs and links: the check refuses exactly the runs where two paths are one file; a run
    it lets through changes no file but its outputs (and the inputs not at all)."""
    import tempfile

    from finesam.cli.common import UsageError, check_distinct_paths
    from finesam.weights import atomic_write

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "x").mkdir()
        truth = make_universe(root, links)
        before = state(root)
        clash = len({truth[n] for n in outputs}) < len(outputs) or bool(
            {truth[n] for n in outputs} & {truth[n] for n in inputs}
        )
        try:
            check_distinct_paths([("out", root / n) for n in outputs], [("in", root / n) for n in inputs])
        except UsageError:
            assert clash
            assert state(root) == before
            return
        assert not clash
        for name in outputs:
            atomic_write(root / name, lambda tmp: tmp.write_text("written"))
        written = {n for n in outputs} | {truth[n] for n in outputs if not (root / n).is_symlink()}
        after = state(root)
        for name, entry in before.items():
            if name not in written and name not in outputs:
                assert after.get(name) == entry, (name, outputs, inputs)
        for name in inputs:
            assert state(root).get(name) == before.get(name)


USER_FILES = ("annotations.json", "errors.jsonl", "masks/gt/a.png", "masks/a.png/0000.png", "parts/notes.txt", "x.txt")


@settings(max_examples=40, deadline=None)
@given(
    user=st.lists(st.sampled_from(USER_FILES), unique=True, max_size=4),
    runs=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), min_size=1, max_size=3),
)
def test_a_run_never_replaces_or_removes_what_no_run_made(user, runs):
    """Files of the user's in OUT before any run, then runs with random --png / --overwrite / settings: each file
    stays as it was, except an annotations.json / errors.jsonl that --overwrite was given to replace."""
    import tempfile

    from finesam.amg.rle import mask_to_rle
    from finesam.labelling import ImageJob, LabellingRun, SegmentedObject

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        image = root / "a.png"
        Image.new("RGB", (8, 6), (10, 20, 30)).save(image)
        out = root / "out"
        for name in user:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text(f"the user's {name}")
        before = state(out) if out.exists() else {}
        mask = np.zeros((6, 8), bool)
        mask[1:4, 2:6] = True
        replaceable: set[str] = set()
        for png, overwrite, other_setting in runs:
            job = ImageJob(image, "a.png")
            run = LabellingRun(out, {"command": "test", "setting": other_setting}, png=png)
            try:
                run.check_outputs(overwrite)
                if not overwrite:
                    run.check()
            except ValueError:
                continue
            if overwrite:
                replaceable |= {"annotations.json", "errors.jsonl"}
            run.start(overwrite)
            if not run.done(job):
                run.commit(job, Image.open(image), [SegmentedObject(mask_to_rle(mask), 0.9, 1)])
            run.merge([job])
        after = state(out) if out.exists() else {}
        for name, entry in before.items():
            if name not in replaceable:
                assert after.get(name) == entry, (name, user, runs)


def test_the_output_rule_in_real_runs(tmp_path, weights):
    """A few real runs of the rule's cases: nothing of the user's changes, whatever the command is given."""
    image = save_photo(tmp_path / "image.png")
    (tmp_path / "alias.png").symlink_to(image)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "m.png")
    before = state(tmp_path)
    for outputs in (
        ["--out", tmp_path / "alias.png"],
        ["--out", tmp_path / "m.png", "--overlay", tmp_path / "dangling.png"],
        [
            "--out",
            tmp_path / "m.png",
            "--logits",
            tmp_path / "image.npy",
            "--overlay",
            tmp_path / "x" / ".." / "alias.png",
        ],
    ):
        result = finesam("segment", image, "--weights", weights, "--box", "5,5,60,50", *outputs)
        assert result.returncode == 2 and "same file" in result.stderr, result.stderr
        assert state(tmp_path) == before
    # a dataset run whose manifest is kept in OUT under the name of an output
    out = tmp_path / "out"
    manifest = write_lines(tmp_path / "m.jsonl", [box_line("image.png")])
    assert manifest_run(manifest, weights, out).returncode == 0
    kept = write_lines(out / "errors.jsonl", [box_line("../image.png")])
    result = manifest_run(kept, weights, out)
    assert result.returncode == 2 and "same file" in result.stderr
    assert json.loads(kept.read_text()) == box_line("../image.png")
