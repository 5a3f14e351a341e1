"""`finesam segment --manifest M --onnx DIR --out OUT`: the dataset run of the torch command from an export, in a
process where torch is never imported: the same OUT folder (run.json with the export's digests in place of the
weights'), resumable, and the torch-only options refused in one line.

Tolerances (as tests/test_onnx_cli.py): every mask of annotations.json equals the torch command's wherever the
torch model's logit of that object is at least ONNX_TOLERANCE (1e-3) from the threshold, and the areas differ by
at most the pixels within it; the predicted IoUs (`score`) within SCORE_TOLERANCE (1e-4); everything else
(images, ids, categories, order) equal. Small random-weight model, real photos (400 x 267).
"""

import json
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from finesam.inputs import as_rgb, open_image
from finesam.labelling import read_manifest
from finesam.onnx.export import export
from finesam.rle import rle_to_mask

from helpers import (
    assert_resumed_run_is_whole,
    finesam,
    make_dataset,
    manifest_lines,
    torch_free_command,
    without_torch,
    write_manifest,
)

ONNX_TOLERANCE = 1e-3  # tests/test_onnx.py
SCORE_TOLERANCE = 1e-4
RUNTIMES = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = make_dataset(tmp_path_factory.mktemp("dataset"), broken=False)
    return write_manifest(folder / "prompts.jsonl", manifest_lines())


@pytest.fixture(scope="module")
def exports(small, small_export, tmp_path_factory):
    """The single-mask export (conftest) and a multimask export of the same model."""
    multimask = tmp_path_factory.mktemp("multimask") / "export"
    export(small, multimask, multimask_output=True)
    return {False: small_export["export"], True: multimask}


@pytest.fixture(scope="module")
def torch_runs(small_export, dataset, tmp_path_factory):
    """The torch command's run of the manifest, with and without --multimask (--keep-empty: every object)."""
    runs = {}
    for multimask in (False, True):
        out = tmp_path_factory.mktemp("torch") / "out"
        extra = ["--multimask"] if multimask else []
        result = finesam("segment", "--manifest", dataset, "--weights", small_export["weights"], "--out", out,
                         "--keep-empty", "--quiet", *extra)  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[multimask] = out
    return runs


def torch_logits(model, manifest, multimask: bool) -> list[list[np.ndarray]]:
    """Each object's logits of the mask `prompted_objects` chooses (the best by predicted IoU), per image."""
    logits = []
    for job in read_manifest(manifest):
        assert job.prompts is not None
        image = as_rgb(open_image(job.path))
        found: dict[int, np.ndarray] = {}
        for chosen, batch in job.prompts.batches():
            prediction = model.predict(image, **batch, multimask_output=multimask, return_logits=True)
            best = prediction.iou_predictions.argmax(dim=1)
            for i, values in zip(chosen, prediction.masks[torch.arange(len(best)), best], strict=True):
                found[i] = values.numpy()
        logits.append([found[i] for i in range(len(found))])
    return logits


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_onnx_manifest_run_writes_the_torch_run_without_torch(
    small, exports, dataset, torch_runs, tmp_path, runtime, multimask
):
    out = tmp_path / "out"
    extra = ["--multimask"] if multimask else []
    result = without_torch("segment", "--manifest", dataset, "--onnx", exports[multimask], "--runtime", runtime,
                           "--out", out, "--keep-empty", "--quiet", *extra)  # fmt: skip
    assert result.returncode == 0, result.stderr  # status 1 too if torch was imported
    assert "3 images, 9 masks, 0 failed" in result.stdout
    ours = json.loads((out / "annotations.json").read_text())
    theirs = json.loads((torch_runs[multimask] / "annotations.json").read_text())
    assert ours["images"] == theirs["images"] and ours["categories"] == theirs["categories"]
    assert len(ours["annotations"]) == len(theirs["annotations"]) == 9
    expected = [values for image in torch_logits(small, dataset, multimask) for values in image]
    for a, b, logits in zip(ours["annotations"], theirs["annotations"], expected, strict=True):
        assert {k: a[k] for k in ("id", "image_id", "category_id", "iscrowd")} == {
            k: b[k] for k in ("id", "image_id", "category_id", "iscrowd")
        }
        assert abs(a["score"] - b["score"]) <= SCORE_TOLERANCE, (a["id"], a["score"], b["score"])
        mask, torch_mask = (coco_mask.decode(r["segmentation"]).astype(bool) for r in (a, b))
        assert np.array_equal(mask, rle_to_mask(a["segmentation"]))
        decided = np.abs(logits) >= ONNX_TOLERANCE
        assert np.array_equal(torch_mask[decided], (logits > 0)[decided])  # the torch command's mask's logits
        assert np.array_equal(mask[decided], torch_mask[decided]), f"object {a['id']}: masks differ"
        assert abs(a["area"] - b["area"]) <= (~decided).sum()
    # run.json: the torch run's settings, with the export's digests in place of the weights'
    record = json.loads((out / "run.json").read_text())
    torch_record = json.loads((torch_runs[multimask] / "run.json").read_text())
    assert set(record["onnx"]) == {"model.json", "encoder.onnx", "decoder.onnx"}
    assert all(len(digest) == 64 for digest in record["onnx"].values())
    assert record["precision"] == "f32" and record["multimask"] is multimask
    for key in ("weights", "hq", "loras", "dtype", "hq_only"):
        del torch_record[key]
    assert {k: v for k, v in record.items() if k not in ("onnx", "precision")} == torch_record
    assert (out / "errors.jsonl").read_text() == ""


def test_killed_onnx_run_resumes_to_identical_files(small_export, tmp_path):
    """SIGKILL after the first image's part, the same command again: the files of an uninterrupted run."""
    names = {f"{i}.jpg": source for i, source in enumerate(["astronaut_crop", "rocket", "chelsea"] * 2)}
    folder = make_dataset(tmp_path / "images", names, broken=False)
    boxes = [[40, 30, 200, 250], [100, 20, 260, 260]]  # inside 400 x 267 and 267 x 400
    manifest = write_manifest(folder / "m.jsonl", [{"image": name, "boxes": boxes} for name in names])
    args = ["segment", "--manifest", manifest, "--onnx", small_export["export"], "--png", "--threads", "1"]
    whole = tmp_path / "whole"
    assert finesam(*args, "--out", whole).returncode == 0
    killed = tmp_path / "killed"
    command = torch_free_command(*args, "--out", killed)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list((killed / "parts").glob("*.json")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    committed = len(list((killed / "parts").glob("*.json")))
    assert 1 <= committed < len(names) and not (killed / "annotations.json").exists(), committed
    resumed = without_torch(*args, "--out", killed)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({committed} done before)" in resumed.stdout
    assert_resumed_run_is_whole(killed, whole)


def test_another_export_or_the_torch_model_is_another_run(small_export, dataset, torch_runs, tmp_path):
    out = tmp_path / "out"
    args = ["segment", "--manifest", dataset, "--out", out, "--quiet"]
    assert finesam(*args, "--onnx", small_export["export"]).returncode == 0
    before = (out / "annotations.json").read_bytes()
    digest = json.loads((out / "run.json").read_text())["onnx"]["model.json"]
    again = finesam(*args, "--onnx", small_export["export"])  # nothing left to do
    assert again.returncode == 0 and "(3 done before)" in again.stdout
    other = tmp_path / "other"
    shutil.copytree(small_export["export"], other)
    (other / "model.json").write_text((other / "model.json").read_text() + "\n")  # the same model, other bytes
    result = finesam(*args, "--onnx", other)
    assert result.returncode == 2 and "holds a run made with other settings (onnx: " in result.stderr
    assert "--overwrite" in result.stderr and (out / "annotations.json").read_bytes() == before
    result = finesam(*args, "--onnx", other, "--overwrite")
    assert result.returncode == 0 and "done before" not in result.stdout
    assert json.loads((out / "run.json").read_text())["onnx"]["model.json"] != digest
    # the torch command's folder is not resumed by an export, nor an export's by the torch model
    result = finesam("segment", "--manifest", dataset, "--out", torch_runs[False], "--onnx", other, "--keep-empty")
    assert result.returncode == 2 and "other settings" in result.stderr and "weights: '" in result.stderr
    result = finesam(*args, "--weights", small_export["weights"])
    assert result.returncode == 2 and "other settings" in result.stderr and "onnx: {" in result.stderr


def test_a_prompt_outside_its_image_fails_the_image_as_in_the_torch_run(small_export, dataset, tmp_path):
    lines = [{"image": "rocket.jpg", "boxes": [[0, 0, 300, 200]]}]
    lines.append({"image": "astronaut.png", "boxes": [[0, 0, 900, 10]]})
    manifest = write_manifest(dataset.parent / "outside.jsonl", lines)
    runs = {}
    models = {"torch": ["--weights", small_export["weights"]], "onnx": ["--onnx", small_export["export"]]}
    for name, model in models.items():
        result = finesam("segment", "--manifest", manifest, *model, "--out", tmp_path / name, "--quiet")
        assert result.returncode == 1 and "1 images, 1 masks, 1 failed" in result.stdout, result.stderr
        runs[name] = (tmp_path / name / "errors.jsonl").read_text()
    assert runs["onnx"] == runs["torch"] and "astronaut.png: box corners lie outside the 400x267 image" in runs["onnx"]


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        ("segment", ["--weights", "w.safetensors"], "--onnx runs an export, which fixes the model: drop --weights"),
        ("segment", ["--lora", "a.safetensors"], "drop --lora"),
        ("segment", ["--text", "a cat"], "--text: text prompts find their boxes with a torch detector: drop --onnx"),
        ("segment", ["--box", "1,1,9,9"], "--manifest gives the images and prompts: drop --box"),
        ("segment", ["--multimask"], "this export was made with multimask_output=False; export again with --multimask"),
        ("segment", ["--cache-dir", "c"], "--cache-dir keeps OpenVINO's compiled models: add --runtime openvino"),
        ("segment", ["--precision", "bf16"], "onnxruntime runs the export in f32 only"),
        ("everything", [], "--onnx: the automatic mask generator (its point grid, crops and NMS) runs the torch model"),
    ],
)
def test_onnx_dataset_refusals_are_one_line(small_export, dataset, tmp_path, command, extra, message):
    source = ["--manifest", dataset] if command == "segment" else [dataset.parent]
    out = tmp_path / "out"
    result = finesam(command, *source, "--onnx", small_export["export"], "--out", out, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"finesam {command}: error:") and message in lines[0], lines
    assert not out.exists()


def test_text_prompts_with_onnx_are_refused_without_torch(small_export, dataset, tmp_path):
    result = without_torch("segment", dataset.parent / "rocket.jpg", "--text", "a rocket", "--onnx",
                           small_export["export"], "--out", tmp_path / "m.png")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "finesam segment: error: --text: text prompts find their boxes with a torch detector: drop --onnx"
    )


def test_torchrun_is_refused_with_onnx(small_export, dataset, tmp_path):
    """Several processes (WORLD_SIZE > 1) are refused in one line; torchrun's single process runs."""
    out = tmp_path / "out"
    args = ["segment", "--manifest", dataset, "--onnx", small_export["export"], "--out", out, "--quiet"]
    result = finesam(*args, env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.strip() == (
        "finesam segment: error: --onnx runs in one process (the runtime uses every core; --threads): run it "
        "without torchrun"
    )
    result = finesam(*args, env={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})
    assert result.returncode == 0, result.stderr
    assert (out / "annotations.json").is_file()
