"""The `finesam` command, run as a real subprocess: convert, segment, demo, and its error messages."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import SMALL, TOLERANCE, photo
from helpers import finesam
from official import HQSamPredictor, SamPredictor, build_official


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, official_small) -> Path:
    path = tmp_path_factory.mktemp("weights") / "sam_small.pth"
    torch.save(official_small.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    result = finesam("convert", checkpoint, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out / "sam_small.safetensors")]
    return out / "sam_small.safetensors"


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "rocket.png"
    photo("rocket").save(path)
    return path


def assert_mask_is_the_official_one(mask_file: Path, logits: np.ndarray) -> None:
    """The mask written (0 / 255) is the official `logits > 0`, except at pixels whose official logit is within
    TOLERANCE of 0: logits agree within TOLERANCE, so float rounding may put those (a few in a photo, with
    random weights) on either side. At least 99% of the pixels are decided."""
    mask = np.asarray(Image.open(mask_file))
    assert mask.shape == logits.shape and np.isin(mask, (0, 255)).all()
    decided = np.abs(logits) > TOLERANCE
    assert decided.mean() >= 0.99
    assert np.array_equal(mask[decided], np.where(logits > 0, 255, 0)[decided])


def official_predict(official, image_path, **kwargs):
    predictor = SamPredictor(official)
    predictor.set_image(np.asarray(Image.open(image_path).convert("RGB")))
    return predictor.predict(return_logits=True, **kwargs)


def test_segment_several_boxes_writes_one_mask_per_box(tmp_path, converted, image_path, official_small):
    boxes = [[50, 40, 400, 500], [300, 100, 780, 520]]
    result = finesam(
        "segment",
        image_path,
        "--weights",
        converted,
        *(a for b in boxes for a in ("--box", ",".join(map(str, b)))),
        "--out",
        tmp_path / "mask.png",
        "--logits",
        tmp_path / "logits.npy",
    )
    assert result.returncode == 0, result.stderr
    for i, box in enumerate(boxes):
        expected_logits, expected_iou, _ = official_predict(
            official_small, image_path, box=np.array(box), multimask_output=False
        )
        logits = np.load(tmp_path / f"logits_{i}.npy")
        assert logits.dtype == np.float32 and logits.shape == (534, 800)
        assert np.abs(logits - expected_logits[0]).max() <= TOLERANCE
        mask = np.asarray(Image.open(tmp_path / f"mask_{i}.png"))
        assert np.array_equal(mask, np.where(logits > 0, 255, 0))
        assert f"mask_{i}.png\tpredicted IoU {expected_iou[0]:.4f}" in result.stdout


def test_segment_multimask_keeps_the_best_mask(tmp_path, converted, checkpoint, image_path, official_small):
    expected_logits, expected_iou, _ = official_predict(
        official_small,
        image_path,
        point_coords=np.array([[400.0, 260.0], [100.0, 100.0]]),
        point_labels=np.array([1, 0]),
        multimask_output=True,
    )
    best = int(expected_iou.argmax())
    for weights in (converted, checkpoint):  # a converted file or the official .pth directly
        out = tmp_path / f"{weights.suffix[1:]}.png"
        result = finesam(
            "segment",
            image_path,
            "--weights",
            weights,
            "--point",
            "400,260",
            "--point",
            "100,100,0",
            "--multimask",
            "--out",
            out,
        )
        assert result.returncode == 0, result.stderr
        assert_mask_is_the_official_one(out, expected_logits[best])
        assert f"predicted IoU {expected_iou[best]:.4f}" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--box", "1,2,3"], "--box X1,Y1,X2,Y2 takes 4 numbers"),
        (["--box", "10,10,5,50"], "x2 >= x1"),
        (["--box", "0,0,900,100"], "outside the 800x534 image"),
        (["--point", "10,10,2"], "LABEL must be 1 (foreground) or 0 (background)"),
        (["--point", "nan,3"], "NaN or infinite"),
        ([], "give at least one --box or --point"),
    ],
)
def test_segment_rejects_bad_prompts_with_a_message(tmp_path, image_path, args, message):
    # weights that do not exist: the prompts are refused before the model loads (and encodes the image)
    absent = tmp_path / "absent.safetensors"
    result = finesam("segment", image_path, "--weights", absent, *args, "--out", tmp_path / "m.png")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m.png").exists()


def test_segment_reports_unreadable_inputs(tmp_path, converted, image_path):
    result = finesam(
        "segment",
        image_path,
        "--weights",
        tmp_path / "none.safetensors",
        "--box",
        "1,1,5,5",
        "--out",
        tmp_path / "m.png",
    )
    assert result.returncode == 2 and "none.safetensors" in result.stderr
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = finesam(
        "segment", tmp_path / "broken.png", "--weights", converted, "--box", "1,1,5,5", "--out", tmp_path / "m.png"
    )
    assert result.returncode == 2 and "broken.png: not a readable image" in result.stderr


def test_demo_without_checkpoint_says_what_to_download(tmp_path):
    env = {"FINESAM_HOME": str(tmp_path / "cache"), "FINESAM_CHECKPOINT": "", "FINESAM_OFFLINE": "1"}
    result = finesam("demo", "--out-dir", tmp_path / "out", env=env)
    assert result.returncode == 1
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in result.stderr
    assert "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_tiny.pth" in result.stderr
    assert str(tmp_path / "cache" / "sam_hq_vit_tiny.pth") in result.stderr  # the smallest is suggested
    assert "finesam download sam_hq_vit_tiny" in result.stderr
    assert not (tmp_path / "out").exists()


def test_demo_converts_and_segments_with_a_checkpoint(tmp_path, checkpoint):
    env = {"FINESAM_HOME": str(tmp_path / "cache"), "FINESAM_CHECKPOINT": str(checkpoint)}
    result = finesam("demo", "--out-dir", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "cache" / "sam_small.safetensors").is_file()
    overlay = Image.open(tmp_path / "out" / "demo_overlay.png")
    example = Image.open(tmp_path / "out" / "example.png")
    assert overlay.size == example.size == (960, 640)
    assert "house (box)" in result.stdout and "predicted IoU" in result.stdout


@pytest.fixture(scope="module")
def official_hq():
    return build_official(SMALL, seed=1, hq=True)


@pytest.fixture(scope="module")
def hq_checkpoint(tmp_path_factory, official_hq) -> Path:
    path = tmp_path_factory.mktemp("hq") / "sam_hq_small.pth"
    torch.save(official_hq.state_dict(), path)
    return path


def official_hq_predict(official, image_path, hq_only: bool, **kwargs):
    predictor = HQSamPredictor(official)
    predictor.set_image(np.asarray(Image.open(image_path).convert("RGB")))
    return predictor.predict(return_logits=True, hq_token_only=hq_only, **kwargs)


def test_convert_hq_checkpoint_writes_base_and_adapter(tmp_path, hq_checkpoint):
    result = finesam("convert", hq_checkpoint, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(tmp_path / "sam_hq_small.safetensors"),
        str(tmp_path / "sam_hq_small.hq.safetensors"),
    ]
    assert "SAM part" in result.stderr


@pytest.mark.parametrize("hq_only", [False, True])
def test_segment_with_hq(tmp_path, hq_checkpoint, image_path, official_hq, hq_only):
    box = [60, 50, 500, 450]
    expected, iou, _ = official_hq_predict(official_hq, image_path, hq_only, box=np.array(box), multimask_output=False)
    finesam("convert", hq_checkpoint, "--out", tmp_path)
    for weights in (
        ["--weights", tmp_path / "sam_hq_small.safetensors", "--hq", tmp_path / "sam_hq_small.hq.safetensors"],
        ["--weights", hq_checkpoint],  # the official HQ-SAM .pth: its HQ part is used automatically
    ):
        out = tmp_path / "hq.png"
        extra = ["--hq-only"] if hq_only else []
        result = finesam(
            "segment",
            image_path,
            *weights,
            "--box",
            ",".join(map(str, box)),
            *extra,
            "--out",
            out,
            "--logits",
            tmp_path / "hq.npy",
        )
        assert result.returncode == 0, result.stderr
        assert np.abs(np.load(tmp_path / "hq.npy") - expected[0]).max() <= TOLERANCE
        assert_mask_is_the_official_one(out, expected[0])
        assert f"predicted IoU {iou[0]:.4f}" in result.stdout


def test_hq_only_without_hq_weights_is_an_error(tmp_path, converted, image_path):
    result = finesam(
        "segment", image_path, "--weights", converted, "--box", "1,1,50,50", "--hq-only", "--out", tmp_path / "m.png"
    )
    assert result.returncode == 2 and "--hq-only needs HQ-SAM weights" in result.stderr


def test_prompts_file_encodes_once_and_writes_one_mask_per_prompt(tmp_path, converted, image_path, official_small):
    prompts = [
        {"box": [50, 40, 400, 500]},
        {"points": [[400, 260], [100, 100]], "labels": [1, 0]},
        {"box": [300, 100, 780, 520], "points": [[500, 300]], "multimask": True},
    ]
    (tmp_path / "prompts.json").write_text(json.dumps({"prompts": prompts}))
    result = finesam(
        "segment",
        image_path,
        "--weights",
        converted,
        "--prompts",
        tmp_path / "prompts.json",
        "--out",
        tmp_path / "mask.png",
        "--overlay",
        tmp_path / "overlay.png",
    )
    assert result.returncode == 0, result.stderr
    official_kwargs = [
        {"box": np.array(prompts[0]["box"]), "multimask_output": False},
        {"point_coords": np.array(prompts[1]["points"]), "point_labels": np.array([1, 0]), "multimask_output": False},
        {
            "box": np.array(prompts[2]["box"]),
            "point_coords": np.array([[500, 300]]),
            "point_labels": np.array([1]),
            "multimask_output": True,
        },
    ]
    for i, kwargs in enumerate(official_kwargs):
        logits, iou, _ = official_predict(official_small, image_path, **kwargs)
        best = int(iou.argmax())
        assert_mask_is_the_official_one(tmp_path / f"mask_{i}.png", logits[best])
    picture = np.asarray(Image.open(tmp_path / "overlay.png").convert("RGB")).astype(int)
    original = np.asarray(Image.open(image_path).convert("RGB")).astype(int)
    assert picture.shape == original.shape
    changed = np.abs(picture - original).sum(axis=2) > 0
    assert changed.mean() > 0.05  # masks tinted, prompts drawn
    assert str(tmp_path / "overlay.png") in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read prompts"),
        ('{"prompts": []}', "expected a non-empty list of prompts"),
        ('[{"labels": [1]}]', 'prompt 0: "labels" were given without "points"'),
        ('[{"points": []}]', 'prompt 0: give "box" (or "boxes") and/or "points"'),
        ('[{"box": [1, 2, 3, 4], "colour": "red"}]', "prompt 0: unknown keys ['colour']"),
        ('[{"box": [1, 2, 30, 40]}, {"box": [50, 60, 10, 70]}]', 'prompt 1: "box" must be x1, y1, x2, y2'),
        ('[{"points": [[10, 10]], "labels": [3]}]', 'prompt 0: "labels" must be 1 (foreground) or 0 (background)'),
        ('[{"points": [[[1, 2]], [[3, 4], [5, 6]]]}]', "prompt 0: the point lists of one prompt must be equally long"),
    ],
)
def test_prompts_file_errors(tmp_path, image_path, content, message):
    (tmp_path / "p.json").write_text(content)
    absent = tmp_path / "absent.safetensors"  # every prompt is checked before the model loads
    result = finesam(
        "segment", image_path, "--weights", absent, "--prompts", tmp_path / "p.json", "--out", tmp_path / "m.png"
    )
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("m*.png"))


def test_dtype_and_device_options(tmp_path, converted, image_path):
    box = ["--box", "50,40,400,500"]
    base = finesam("segment", image_path, "--weights", converted, *box, "--out", tmp_path / "f32.png")
    bf16 = finesam(
        "segment", image_path, "--weights", converted, *box, "--dtype", "bfloat16", "--out", tmp_path / "bf16.png"
    )
    assert base.returncode == 0 and bf16.returncode == 0, bf16.stderr
    agreement = (np.asarray(Image.open(tmp_path / "f32.png")) == np.asarray(Image.open(tmp_path / "bf16.png"))).mean()
    assert agreement > 0.9
    both = finesam(
        "segment",
        image_path,
        "--weights",
        converted,
        *box,
        "--prompts",
        tmp_path / "x.json",
        "--out",
        tmp_path / "m.png",
    )
    assert both.returncode == 2 and "not both" in both.stderr
    if not torch.cuda.is_available():
        gpu = finesam(
            "segment", image_path, "--weights", converted, *box, "--device", "cuda", "--out", tmp_path / "m.png"
        )
        assert gpu.returncode == 2 and "--device cuda is not usable here" in gpu.stderr
