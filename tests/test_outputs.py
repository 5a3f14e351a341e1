"""Writing outputs: special files are never replaced, permissions follow the umask, dead writers' temporaries
are cleaned, and the CLI refuses a bad output before it loads the model (real FIFOs and subprocesses)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from finesam.weights import atomic_write

from conftest import photo
from helpers import finesam


def write_text(path: Path, text: str = "new") -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def test_a_fifo_or_a_folder_is_never_replaced(tmp_path):
    fifo, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        write_text(fifo)
    with pytest.raises(ValueError, match="is a folder"):
        write_text(folder)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and folder.is_dir() and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pipe"]  # no temporary left


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask):
    before = os.umask(umask)
    try:
        assert stat.S_IMODE(write_text(tmp_path / "new.txt").stat().st_mode) == 0o666 & ~umask
        kept = tmp_path / "kept.txt"
        kept.write_text("old")
        kept.chmod(0o604)
        assert stat.S_IMODE(write_text(kept).stat().st_mode) == 0o604 and kept.read_text() == "new"
    finally:
        os.umask(before)


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    target = tmp_path / "w.safetensors"
    stale = tmp_path / f".w.safetensors.{int(dead.stdout)}.abc.tmp"
    live = tmp_path / f".w.safetensors.{os.getppid()}.def.tmp"  # our parent runs
    other = tmp_path / f".other.safetensors.{int(dead.stdout)}.ghi.tmp"  # another target's
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    write_text(target)
    assert not stale.exists() and live.exists() and other.exists() and target.read_text() == "new"


@pytest.mark.parametrize("option", ["--out", "--logits", "--overlay"])
def test_segment_refuses_a_special_output_before_loading_the_model(tmp_path, option):
    image = tmp_path / "photo.png"
    photo("rocket").save(image)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    outputs = {"--out": tmp_path / "mask.png", option: fifo}
    # the weights do not exist: a check after loading would fail on them instead
    args = ["segment", image, "--weights", tmp_path / "absent.safetensors", "--box", "10,10,100,100"]
    result = finesam(*args, *(a for flag, path in outputs.items() for a in (flag, path)))
    assert result.returncode == 2, result.stderr
    assert "not a regular file" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert stat.S_ISFIFO(fifo.stat().st_mode) and not (tmp_path / "mask.png").exists()


def test_everything_refuses_a_file_as_its_output_folder(tmp_path):
    image = tmp_path / "photo.png"
    photo("rocket").save(image)
    (tmp_path / "out").write_text("mine")
    result = finesam("everything", image, "--weights", tmp_path / "absent.safetensors", "--out", tmp_path / "out")
    assert result.returncode == 2 and "not a folder" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out").read_text() == "mine"


def _commands_writing_into(tmp_path: Path, out: Path) -> dict[str, list[object]]:
    """Every command that writes into a folder, with `out` as that folder; inputs that do not exist, so that a
    check made after loading them would fail with another message."""
    absent = tmp_path / "absent.safetensors"
    config = tmp_path / "train.toml"
    config.write_text(f'[model]\nweights = "{absent}"\n[data]\ntrain = "{tmp_path}"\n[hq]\n[run]\nout = "{out}"\n')
    return {
        "everything": ["everything", tmp_path / "photo.png", "--weights", absent, "--out", out],
        "eval": ["eval", tmp_path, "--weights", absent, "--out", out],
        "convert": ["convert", tmp_path / "absent.pth", "--out", out],
        "download": ["download", "sam_vit_b", "--dir", out],
        "demo": ["demo", "--out-dir", out],
        "train": ["train", "--config", config],
        "synth": ["synth", out],
    }


@pytest.mark.parametrize("command", ["everything", "eval", "convert", "download", "demo", "train", "synth"])
def test_every_folder_output_refuses_a_file_before_any_work(tmp_path, command):
    photo("rocket").save(tmp_path / "photo.png")
    out = tmp_path / "out"
    out.write_text("mine")
    result = finesam(*_commands_writing_into(tmp_path, out)[command], env={"FINESAM_MIRROR": "http://127.0.0.1:9"})
    assert result.returncode == 2, result.stderr
    assert f"{out}: exists and is not a folder" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and out.read_text() == "mine"


@pytest.mark.parametrize("target", ["folder", "fifo"])
def test_segment_refuses_a_folder_or_fifo_as_its_mask(tmp_path, target):
    image = tmp_path / "photo.png"
    photo("rocket").save(image)
    out = tmp_path / "mask.png"
    if target == "folder":
        out.mkdir()
    else:
        os.mkfifo(out)
    args = ["segment", image, "--weights", tmp_path / "absent.safetensors", "--box", "10,10,100,100", "--out", out]
    result = finesam(*args)
    assert result.returncode == 2 and "refusing to replace it" in result.stderr and "Traceback" not in result.stderr
    assert out.is_dir() if target == "folder" else stat.S_ISFIFO(out.stat().st_mode)
