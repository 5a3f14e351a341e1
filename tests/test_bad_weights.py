"""Weights files that cannot be read, or that hold tensors of a dtype the model cannot take, are one line naming
the file and the problem (issue 34), in every command that loads weights; float64 weights load as float32."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from finesam.adapters.lora import SAMLoraAdapter
from finesam.weights import convert_checkpoint, load_sam, save_lora

from conftest import SMALL, photo
from helpers import FINESAM_COMMAND, finesam
from official import build_official


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("weights")
    folder.chmod(0o755)  # the unprivileged run below walks through it
    official = build_official(SMALL, seed=3, hq=True).state_dict()
    torch.save(official, folder / "hq.pth")
    base, hq = convert_checkpoint(folder / "hq.pth", folder).written
    lora = save_lora(SAMLoraAdapter(load_sam(base), name="tune", rank=2), folder / "tune.lora.safetensors")
    photo("rocket").resize((240, 160)).save(folder / "rocket.png")
    return {"folder": folder, "pth": folder / "hq.pth", "base": base, "hq": hq, "lora": lora}


def retyped(path: Path, out: Path, dtype: torch.dtype) -> Path:
    """A copy of a safetensors file (metadata kept) or a `.pth` with every tensor cast to `dtype`."""
    if path.suffix == ".pth":
        torch.save({k: v.to(dtype) for k, v in torch.load(path).items()}, out)
        return out
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file({k: v.to(dtype) for k, v in load_file(path).items()}, out, metadata)
    return out


def segment(files: dict[str, Path], out: Path, *weights: object) -> subprocess.CompletedProcess[str]:
    return finesam("segment", files["folder"] / "rocket.png", *weights, "--box", "20,20,200,140", "--out", out)


def assert_one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and len(line) < 600, line
    assert line.startswith(f"finesam {result.args[1]}: error: ") and all(w in line for w in words), line


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
def test_integer_weights_are_one_line_naming_the_file(files, tmp_path, dtype):
    name = str(dtype).removeprefix("torch.")
    wrong = retyped(files["base"], tmp_path / "base.safetensors", dtype)
    assert_one_line(segment(files, tmp_path / "a.png", "--weights", wrong), str(wrong), "wrong dtype", name)
    wrong_hq = retyped(files["hq"], tmp_path / "base.hq.safetensors", dtype)
    result = segment(files, tmp_path / "b.png", "--weights", files["base"], "--hq", wrong_hq)
    assert_one_line(result, str(wrong_hq), "wrong dtype", f"({name}, expected float32)")
    wrong_lora = retyped(files["lora"], tmp_path / "tune.lora.safetensors", dtype)
    result = segment(files, tmp_path / "c.png", "--weights", files["base"], "--lora", wrong_lora)
    assert_one_line(result, str(wrong_lora), "wrong dtype")
    assert not list(tmp_path.glob("*.png"))


def test_integer_pth_weights_are_one_line_in_segment_and_convert(files, tmp_path):
    wrong = retyped(files["pth"], tmp_path / "hq.pth", torch.int64)
    assert_one_line(segment(files, tmp_path / "a.png", "--weights", wrong), str(wrong), "wrong dtype", "int64")
    assert_one_line(finesam("convert", wrong, "--out", tmp_path / "out"), str(wrong), "wrong dtype", "int64")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("kind", ["base", "pth"])
def test_float64_weights_load_as_float32_and_give_the_same_masks(files, tmp_path, kind):
    suffix = ".pth" if kind == "pth" else ".safetensors"
    doubled = retyped(files[kind], tmp_path / f"double{suffix}", torch.float64)
    model = load_sam(doubled)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for weights, out in ((files[kind], tmp_path / "f32.png"), (doubled, tmp_path / "f64.png")):
        assert segment(files, out, "--weights", weights).returncode == 0
    masks = [np.asarray(Image.open(tmp_path / name)) for name in ("f32.png", "f64.png")]
    np.testing.assert_array_equal(masks[0], masks[1])


def test_weights_that_cannot_be_opened_are_one_line(files, tmp_path):
    under_a_file = files["folder"] / "rocket.png" / "sam.safetensors"
    result = segment(files, tmp_path / "a.png", "--weights", under_a_file)
    assert_one_line(result, str(under_a_file), "no such file", "rocket.png is a file, not a folder")
    fifo = tmp_path / "sam.safetensors"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    assert_one_line(segment(files, tmp_path / "b.png", "--weights", fifo), str(fifo), "not a regular file")
    assert_one_line(segment(files, tmp_path / "c.png", "--weights", files["base"], "--hq", fifo), "not a regular file")


def test_permission_denied_is_one_line(files, tmp_path):
    """A real EACCES from `open`: the file is mode 000 and the command runs without the capabilities that let
    root read it anyway (setpriv drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)."""
    locked = files["folder"] / "locked.safetensors"
    shutil.copy(files["base"], locked)
    locked.chmod(0o000)
    out = files["folder"] / "out"
    out.mkdir(mode=0o777, exist_ok=True)
    out.chmod(0o777)
    prefix: list[str] = []
    if os.geteuid() == 0:
        drop = "-dac_override,-dac_read_search"
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "root needs setpriv (util-linux) to drop the capability that reads mode 000"
        prefix = [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}"]
    for command in (["segment", str(files["folder"] / "rocket.png"), "--box", "1,1,9,9", "--out", str(out / "m.png")],
                    ["convert", str(locked.with_suffix(".pth")), "--out", str(out)]):  # fmt: skip
        if command[0] == "convert":
            shutil.copy(files["pth"], locked.with_suffix(".pth"))
            locked.with_suffix(".pth").chmod(0o000)
        else:
            command += ["--weights", str(locked)]
        result = subprocess.run([*prefix, *FINESAM_COMMAND, *command], capture_output=True, text=True, timeout=120)
        weights = locked if command[0] == "segment" else locked.with_suffix(".pth")
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == f"finesam {command[0]}: error: {weights}: cannot be read: permission denied"
