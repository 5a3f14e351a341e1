"""`finesam segment IMAGE --onnx DIR [--runtime onnxruntime|openvino]`: the masks of the torch command, from an
export, in a process where torch is never imported.

Tolerance: ONNX_TOLERANCE (1e-3) max abs between the logits the two commands save (`--logits`), and the same mask
wherever |logit| >= it (as tests/test_onnx.py), on a real photo (small random-weight model).
"""

import json

import numpy as np
import pytest
from PIL import Image

from test_onnx import assert_same_logits

from conftest import PHOTOS
from helpers import finesam, without_torch


@pytest.fixture(scope="module")
def files(small_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    PHOTOS["landscape"]().save(folder / "photo.png")
    prompts = [{"box": [100, 150, 900, 700]}, {"boxes": [[300, 100, 1500, 1000], [50, 50, 400, 500]]}]
    prompts.append({"points": [[600, 400], [800, 500]], "labels": [1, 0]})
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return {
        **small_export,
        "photo": folder / "photo.png",
        "prompts": folder / "prompts.json",
    }


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_segment_onnx_gives_the_masks_of_the_torch_command_without_torch(files, tmp_path, runtime):
    common = [files["photo"], "--prompts", files["prompts"]]
    expected = finesam("segment", *common, "--weights", files["weights"], "--out", tmp_path / "torch.png",
                       "--logits", tmp_path / "torch.npy")  # fmt: skip
    assert expected.returncode == 0, expected.stderr
    actual = without_torch("segment", *common, "--onnx", files["export"], "--runtime", runtime,
                           "--out", tmp_path / "onnx.png", "--logits", tmp_path / "onnx.npy",
                           "--overlay", tmp_path / "overlay.png")  # fmt: skip
    assert actual.returncode == 0, actual.stderr
    torch_lines, onnx_lines = expected.stdout.splitlines(), actual.stdout.splitlines()
    assert len(onnx_lines) == 2 * 4 + 1  # four masks (one, two, one prompts), their logits, the overlay
    for i in range(4):
        logits = np.load(tmp_path / f"onnx_{i}.npy")
        assert_same_logits(logits, np.load(tmp_path / f"torch_{i}.npy"), f"mask {i}")
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"onnx_{i}.png")) > 0, logits > 0)
        # the same predicted IoU printed, to the 4 decimals shown
        torch_iou, onnx_iou = (float(lines[2 * i].split()[-1]) for lines in (torch_lines, onnx_lines))
        assert abs(torch_iou - onnx_iou) <= 1e-3
    assert Image.open(tmp_path / "overlay.png").size == Image.open(files["photo"]).size


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "w.safetensors"], "--onnx runs an export, which fixes the model: drop --weights"),
        (["--dtype", "bfloat16"], "drop --dtype"),
        (["--cache-dir", "cache"], "--cache-dir keeps OpenVINO's compiled models: add --runtime openvino"),
        (["--multimask"], "this export was made with multimask_output=False; export again with --multimask"),
        (["--text", "a cat"], "--text: text prompts find their boxes with a torch detector: drop --onnx"),
        (["--png"], "--png: for folders, lists and manifests; for one image --out names the mask file"),
    ],
)
def test_segment_onnx_refuses_in_one_line(files, tmp_path, extra, message):
    result = finesam("segment", files["photo"], "--onnx", files["export"], "--box", "10,10,300,300",
                     "--out", tmp_path / "mask.png", *extra)  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("finesam segment: error:") and message in lines[0], lines
    assert not (tmp_path / "mask.png").exists()


def test_segment_onnx_needs_an_export_folder(files, tmp_path):
    """--onnx names a folder with a model.json (the torch command's --weights stays required without --onnx)."""
    result = finesam(
        "segment", files["photo"], "--onnx", tmp_path, "--box", "10,10,300,300", "--out", tmp_path / "m.png"
    )
    assert result.returncode == 2 and "no model.json there" in result.stderr
    result = finesam("segment", files["photo"], "--box", "10,10,300,300", "--out", tmp_path / "m.png")
    assert result.returncode == 2 and "the following arguments are required: --weights" in result.stderr
