"""Labelling whole datasets: `finesam everything DIR_OR_LIST` and `finesam segment --manifest`, run as real
subprocesses (and under a real torchrun), read back with pycocotools.

Every mask of annotations.json equals what the automatic generator / `predict` of the same weights give for that
image in this process (bit for bit: same code, same threads); the prompted masks also match the official
predictor within MIN_IOU. A run killed with SIGKILL and started again ends with byte-identical files.
"""

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
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from skimage import data as skimage_data

from finesam.adapters import SAMLoraAdapter
from finesam.amg import AutomaticMaskGenerator, rle_to_mask
from finesam.amg.rle import mask_to_rle
from finesam.fast import apply_fast_paths
from finesam.inputs import as_rgb, open_image
from finesam.labelling import ImageJob, LabellingRun, ObjectPrompts, SegmentedObject, images_of, read_manifest
from finesam.labelling.coco import annotation, coco_box, mask_polygons
from finesam.labelling.prefetch import prefetched
from finesam.model import SegmentAnything
from finesam.weights import save_lora
from finesam.weights.loading import sam_from_state_dict

from conftest import SMALL, photo
from helpers import FINESAM_COMMAND, assert_resumed_run_is_whole, finesam, make_dataset, manifest_lines, write_manifest
from official import SamPredictor, build_official, structured

# the generator settings under which test_amg's structured random weights keep several masks per photo
OPTIONS = dict(points_per_side=8, pred_iou_thresh=0.1, stability_score_thresh=0.3, stability_score_offset=0.01)
CLI_OPTIONS = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
MIN_IOU = 0.999  # official predictor vs ours, masks at the original size
SCORE_TOLERANCE = 1e-4
MIN_POLYGON_IOU = 0.98  # polygons rasterised by pycocotools vs the mask they were traced from (holes filled)


@pytest.fixture(scope="module")
def official():
    return structured(build_official(SMALL, seed=2))


@pytest.fixture(scope="module")
def sam(official) -> SegmentAnything:
    """The model as the command loads it (with the fast paths), so that their outputs are equal bit for bit."""
    model = sam_from_state_dict(official.state_dict())
    apply_fast_paths(model)
    return model


@pytest.fixture(scope="module")
def weights(tmp_path_factory, official) -> Path:
    path = tmp_path_factory.mktemp("weights") / "sam_small.pth"
    torch.save(official.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("dataset"))


def load(path: Path) -> Image.Image:
    return as_rgb(open_image(path))


def everything(source: Path, weights: Path, out: Path, *extra: object, env: dict[str, str] | None = None):
    return finesam("everything", source, "--weights", weights, "--out", out, *CLI_OPTIONS, *extra, env=env)


@pytest.fixture(scope="module")
def everything_run(tmp_path_factory, dataset, weights):
    out = tmp_path_factory.mktemp("everything") / "out"
    return everything(dataset, weights, out, "--polygons", "--png"), out


def test_everything_on_a_folder_equals_the_generator(everything_run, dataset, sam):
    result, out = everything_run
    assert result.returncode == 1, result.stderr  # the broken image
    coco = COCO(str(out / "annotations.json"))
    names = [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)]
    assert names == ["astronaut.png", "rocket.jpg", "sub/chelsea.jpg"]  # sorted, hidden files and text left out
    generator = AutomaticMaskGenerator(sam, **OPTIONS, output_mode="uncompressed_rle")
    total = 0
    for image_id, name in zip(sorted(coco.imgs), names, strict=True):
        image = load(dataset / name)
        assert (coco.imgs[image_id]["width"], coco.imgs[image_id]["height"]) == image.size
        expected = generator.generate(image)
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(annotations) == len(expected) >= 1
        for record, reference in zip(annotations, expected, strict=True):
            mask = coco_mask.decode(record["rle"]).astype(bool)
            assert np.array_equal(mask, rle_to_mask(reference["segmentation"]))  # type: ignore[arg-type]
            assert record["score"] == reference["predicted_iou"]
            assert record["stability_score"] == reference["stability_score"]
            assert record["area"] == mask.sum() == coco_mask.area(record["rle"])
            assert record["bbox"] == coco_mask.toBbox(record["rle"]).tolist()
            assert record["category_id"] == 1 and record["iscrowd"] == 0
            with Image.open(out / record["mask_file"]) as png:
                assert np.array_equal(np.asarray(png) == 255, mask)
            if mask.sum() >= 100:  # polygons read back by pycocotools: the mask, holes filled
                assert polygon_iou(coco.annToMask(record).astype(bool), mask) >= MIN_POLYGON_IOU
        total += len(annotations)
    assert total >= 5
    assert f"3 images, {total} masks, 1 failed" in result.stdout
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["image"] for e in errors] == ["broken.jpg"] and "truncated" in errors[0]["error"]
    assert "broken.jpg" in result.stderr and "errors.jsonl" in result.stderr


def polygon_iou(rasterised: np.ndarray, mask: np.ndarray) -> float:
    from scipy.ndimage import binary_fill_holes

    filled = binary_fill_holes(mask)
    return float((rasterised & filled).sum() / (rasterised | filled).sum())


def test_manifest_equals_predict(tmp_path, dataset, weights, sam, official):
    manifest = write_manifest(dataset / "prompts.jsonl", manifest_lines())
    out = tmp_path / "out"
    # --keep-empty: every object has its annotation, to be compared with predict (empty masks included)
    result = finesam("segment", "--manifest", manifest, "--weights", weights, "--out", out, "--png", "--keep-empty")
    assert result.returncode == 0, result.stderr
    coco = COCO(str(out / "annotations.json"))
    assert {c["id"]: c["name"] for c in coco.dataset["categories"]} == {1: "object", 3: "category 3"}
    for image_id, line in zip(sorted(coco.imgs), manifest_lines(), strict=True):
        assert coco.imgs[image_id]["file_name"] == line["image"]
        image = load(dataset / line["image"])
        records = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        objects = len(line.get("boxes") or line["points"])
        assert len(records) == objects
        assert [r["category_id"] for r in records] == line.get("category_ids", [1] * objects)
        prompts = read_manifest(manifest)[image_id - 1].prompts
        assert prompts is not None
        for group in prompts.groups():  # predict with the same batch as one call of the manifest run
            take = {k: [line[k][i] for i in group] for k in ("boxes", "points", "labels") if k in line}
            masks, scores = sam.predict(image, **take).best()
            for i, mask, score in zip(group, masks, scores.tolist(), strict=True):
                ours = coco_mask.decode(records[i]["segmentation"]).astype(bool)
                assert np.array_equal(ours, mask.numpy()) and records[i]["score"] == score
                with Image.open(out / records[i]["mask_file"]) as png:
                    assert np.array_equal(np.asarray(png) == 255, ours)
    # the official predictor, boxes of the first image in one batched call
    predictor = SamPredictor(official)
    predictor.set_image(np.asarray(load(dataset / "astronaut.png")))
    boxes = torch.tensor(manifest_lines()[0]["boxes"], dtype=torch.float)
    boxes = predictor.transform.apply_boxes_torch(boxes, predictor.original_size)
    expected, iou, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
    for record, mask, score in zip(coco.loadAnns(coco.getAnnIds(imgIds=1)), expected[:, 0], iou[:, 0], strict=True):
        ours = coco_mask.decode(record["segmentation"]).astype(bool)
        assert mask_iou(ours, mask.numpy()) >= MIN_IOU
        assert abs(record["score"] - score.item()) <= SCORE_TOLERANCE


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def run_in_background(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*FINESAM_COMMAND, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_killed_run_resumes_to_identical_files(tmp_path, weights):
    names = {f"{i}.jpg": source for i, source in enumerate(["astronaut_crop", "rocket", "chelsea"] * 2)}
    folder = make_dataset(tmp_path / "images", names)
    whole = tmp_path / "whole"
    assert finesam("everything", folder, "--weights", weights, "--out", whole, *CLI_OPTIONS, "--png").returncode == 1
    killed = tmp_path / "killed"
    process = run_in_background("everything", folder, "--weights", weights, "--out", killed, *CLI_OPTIONS, "--png")
    deadline = time.monotonic() + 120
    while len(list((killed / "parts").glob("*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    committed = len(list((killed / "parts").glob("*.json")))
    assert 2 <= committed < len(names) + 1 and not (killed / "annotations.json").exists()
    resumed = everything(folder, weights, killed, "--png")
    assert resumed.returncode == 1, resumed.stderr
    assert "done before" in resumed.stdout
    assert_resumed_run_is_whole(killed, whole)


def test_changed_settings_are_refused_and_overwrite_starts_again(tmp_path, weights, official):
    folder = make_dataset(tmp_path / "images", {"a.png": "astronaut_crop"}, broken=False)
    out = tmp_path / "out"

    def run(*extra: object, weights: Path = weights) -> subprocess.CompletedProcess[str]:
        return finesam("everything", folder, "--weights", weights, "--out", out, *CLI_OPTIONS, *extra)

    assert run().returncode == 0
    before = (out / "annotations.json").read_bytes()
    result = run("--pred-iou-thresh=0.5")
    assert result.returncode == 2 and "pred_iou_thresh: 0.1 -> 0.5" in result.stderr and "--overwrite" in result.stderr
    other = tmp_path / "other.pth"
    torch.save({k: v + 1e-3 for k, v in official.state_dict().items()}, other)
    result = run(weights=other)
    assert result.returncode == 2 and "weights: " in result.stderr
    manifest = write_manifest(folder / "m.jsonl", [{"image": "a.png", "boxes": [[0, 0, 50, 50]]}])
    result = finesam("segment", "--manifest", manifest, "--weights", weights, "--out", out)
    assert (
        result.returncode == 2
        and "holds the results of `finesam everything`, not of `finesam segment`" in result.stderr
    )
    assert (out / "annotations.json").read_bytes() == before
    # a new image: only it is segmented
    photo("rocket").resize((400, 267)).save(folder / "b.jpg")
    result = run()
    assert result.returncode == 0 and "2 images" in result.stdout and "(1 done before)" in result.stdout
    result = run("--pred-iou-thresh=0.5", "--overwrite")
    assert result.returncode == 0 and "2 images" in result.stdout and "done before" not in result.stdout
    assert json.loads((out / "run.json").read_text())["pred_iou_thresh"] == 0.5


def test_a_lora_is_injected_and_part_of_the_settings(tmp_path, dataset, weights, sam):
    lora = SAMLoraAdapter(sam, name="style", rank=2)
    with torch.no_grad():
        for layer in lora.loras:
            layer.up.weight.copy_(torch.randn(layer.up.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    path = save_lora(lora, tmp_path / "style.lora.safetensors")
    line = manifest_lines(boxes_only=True)[0]
    manifest = write_manifest(dataset / "one.jsonl", [line])
    out = tmp_path / "out"
    args = ["segment", "--manifest", manifest, "--weights", weights, "--out", out]
    assert finesam(*args, "--lora", path).returncode == 0
    records = json.loads((out / "annotations.json").read_text())["annotations"]
    image = load(dataset / line["image"])
    without, _ = sam.predict(image, boxes=line["boxes"]).best()
    lora.inject()
    try:
        expected, scores = sam.predict(image, boxes=line["boxes"]).best()
    finally:
        lora.eject()
    for record, mask, score in zip(records, expected, scores.tolist(), strict=True):
        assert np.array_equal(coco_mask.decode(record["segmentation"]).astype(bool), mask.numpy())
        assert record["score"] == score
    assert not torch.equal(expected, without)  # the LoRA changes the masks
    result = finesam(*args)
    assert result.returncode == 2 and "loras: [" in result.stderr
    result = finesam(*args, "--lora", tmp_path / "missing.safetensors")
    assert result.returncode == 2 and "--lora" in result.stderr and "missing.safetensors" in result.stderr


def test_torchrun_two_processes_equal_one(tmp_path, everything_run, dataset, weights):
    _, single = everything_run
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "finesam.cli", "everything", str(dataset), "--weights", str(weights), "--out", str(out)]
    command += [*CLI_OPTIONS, "--polygons", "--png", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    distributed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert distributed.returncode != 0  # the broken image, reported by rank 0
    assert "1 failed" in distributed.stdout, distributed.stderr[-3000:]
    for name in ("annotations.json", "errors.jsonl", "run.json"):
        assert (out / name).read_bytes() == (single / name).read_bytes(), name


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ('{"boxes": [[0, 0, 1, 1]]}', '"image"'),
        ('{"image": "a.png"}', '"boxes") and/or "points"'),
        ('{"image": "a.png", "boxes": [[0, 0, 1]]}', "[x1, y1, x2, y2] or a list of them"),
        ('{"image": "a.png", "boxes": [[0, 0, 1, true]]}', '"boxes" must hold numbers'),
        ('{"image": "a.png", "boxes": []}', '"boxes") and/or "points"'),
        ('{"image": "a.png", "points": [[[1, 2]], []]}', "one per object"),
        ('{"image": "a.png", "points": [[[1, 2]]], "labels": [[2]]}', "1 (foreground) or 0"),
        ('{"image": "a.png", "points": [[[1, 2]]], "labels": [[1, 1]]}', "the shape of"),
        ('{"image": "a.png", "boxes": [[0, 0, 1, 1]], "points": [[[1, 2]], [[3, 4]]]}', "one point list per box"),
        ('{"image": "a.png", "boxes": [[0, 0, 1, 1]], "category_ids": [0]}', "positive integers"),
        ('{"image": "a.png", "boxes": [[0, 0, 1, 1]], "category_ids": [1, 2]}', "1 integers"),
        ('{"image": "a.png", "boxes": [[0, 0, 1, 1]], "box": []}', '"box" or "boxes", not both'),
        ('{"image": "a.png", "boxes": [[0, 0, 1, 1]], "multimask": true}', "unknown keys ['multimask']"),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "ok.png", "boxes": [[0, 0, 5, 5]]}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:3: ") as error:
        read_manifest(manifest)
    assert message in str(error.value)


def test_bad_command_lines_write_nothing(tmp_path, dataset, weights):
    duplicate = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "boxes": [[0, 0, 1, 1]]}] * 2)
    cases = [
        (["segment", "--manifest", duplicate], "on line 1 too"),
        (["segment", dataset / "rocket.jpg", "--box", "1,1,9,9", "--png"], "--png: for folders"),
        (["segment", "--manifest", duplicate, "--box", "1,1,9,9"], "drop --box"),
        (["everything", dataset, "--format", "coco"], "--format is for one image"),
        (["everything", tmp_path / "empty.txt"], "no images"),
    ]
    (tmp_path / "empty.txt").write_text("# nothing here\n")
    for args, message in cases:
        result = finesam(*args, "--weights", weights, "--out", tmp_path / "out")
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert not (tmp_path / "out").exists()


def test_a_list_of_paths_and_a_prompt_outside_the_image(tmp_path, dataset, weights):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# the photos\n{dataset / 'rocket.jpg'}\n\n{dataset / 'missing.jpg'}\n")
    jobs = images_of(listing)
    assert [job.path for job in jobs] == [dataset / "rocket.jpg", dataset / "missing.jpg"]
    manifest = write_manifest(
        tmp_path / "m.jsonl",
        [
            {"image": str(dataset / "rocket.jpg"), "boxes": [[0, 0, 10, 10]]},
            {"image": str(dataset / "astronaut.png"), "boxes": [[0, 0, 900, 10]]},
        ],
    )
    result = finesam("segment", "--manifest", manifest, "--weights", weights, "--out", tmp_path / "out", "--quiet")
    # the random weights' mask for the small box is empty: left out of annotations.json, and counted
    assert result.returncode == 1 and "1 images, 0 masks, 1 failed" in result.stdout
    assert "1 empty masks left out" in result.stdout
    error = json.loads((tmp_path / "out" / "errors.jsonl").read_text())
    assert error["image"].endswith("astronaut.png") and "astronaut.png: box corners lie outside" in error["error"]


def test_folder_listing_leaves_out_hidden_files_and_the_output(tmp_path):
    folder = make_dataset(tmp_path / "images", {"b.png": "rocket", "a/c.jpg": "rocket"}, broken=False)
    (folder / "out" / "masks").mkdir(parents=True)
    photo("rocket").save(folder / "out" / "masks" / "0000.png")
    assert [job.file_name for job in images_of(folder, exclude=folder / "out")] == ["a/c.jpg", "b.png"]
    with pytest.raises(ValueError, match="no such folder or list file"):
        images_of(folder / "out" / "missing")
    (folder / "empty" / ".hidden").mkdir(parents=True)
    photo("rocket").save(folder / "empty" / ".hidden" / "d.png")
    with pytest.raises(ValueError, match="no images"):
        images_of(folder / "empty")


def test_objects_are_grouped_by_point_count():
    prompts = ObjectPrompts(
        points=[[[1, 1]], [[1, 1], [2, 2]], [[3, 3]]], labels=[[1], [1, 1], [1]], category_ids=[1] * 3
    )
    assert prompts.groups() == [[0, 2], [1]]
    assert ObjectPrompts(boxes=[[0, 0, 1, 1]] * 2, category_ids=[1, 1]).groups() == [[0, 1]]


def shapes(height: int = 240, width: int = 320) -> dict[str, np.ndarray]:
    """Real and drawn masks: the horse silhouette, a ring (a hole), parts touching the border, two parts, a line."""
    yy, xx = np.mgrid[:height, :width]
    horse = np.asarray(Image.fromarray(~skimage_data.horse()).resize((width, height), Image.Resampling.NEAREST))
    ring = ((yy - 120) ** 2 + (xx - 160) ** 2 < 90**2) & ((yy - 120) ** 2 + (xx - 160) ** 2 >= 40**2)
    border = (xx < 60) | (yy >= height - 30)
    parts = ((yy - 50) ** 2 + (xx - 60) ** 2 < 30**2) | ((abs(yy - 170) < 40) & (abs(xx - 240) < 50))
    line = (abs(yy - xx) <= 1) & (yy < 200)
    return {"horse": horse.astype(bool), "ring": ring, "border": border, "parts": parts, "line": line}


@pytest.mark.parametrize("name", list(shapes()))
def test_polygons_round_trip_through_pycocotools(name):
    mask = shapes()[name]
    polygons = mask_polygons(mask)
    assert polygons and all(len(p) >= 6 and len(p) % 2 == 0 for p in polygons)
    rasterised = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygons, *mask.shape))).astype(bool)
    assert polygon_iou(rasterised, mask) >= MIN_POLYGON_IOU
    if name == "ring":  # the hole's contour is left out: one polygon
        assert len(polygons) == 1


def test_annotations_match_the_coco_api():
    rng = np.random.default_rng(0)
    for mask in [*shapes().values(), rng.random((50, 70)) > 0.7, np.zeros((20, 30), bool)]:
        record = annotation(SegmentedObject(mask_to_rle(mask), 0.5, 2), polygons=False)
        assert np.array_equal(coco_mask.decode(record["segmentation"]).astype(bool), mask)
        assert record["area"] == coco_mask.area(record["segmentation"]) == mask.sum()
        assert record["bbox"] == coco_mask.toBbox(record["segmentation"]).tolist() == coco_box(mask)


def test_prefetch_loads_ahead_keeps_order_and_hands_over_errors():
    import threading

    loaded = {i: threading.Event() for i in range(5)}

    def load(i: int) -> int:
        loaded[i].set()
        if i == 3:
            raise ValueError("unreadable")
        return i * 10

    seen = []
    for job, value in prefetched(range(5), load, ahead=2):
        if job + 1 in loaded:  # the next image is decoded while this one is worked on
            assert loaded[job + 1].wait(timeout=10)
        seen.append((job, str(value) if isinstance(value, ValueError) else value))
    assert seen == [(0, 0), (1, 10), (2, 20), (3, "unreadable"), (4, 40)]


def test_a_part_made_for_another_file_is_not_done(tmp_path):
    image = tmp_path / "a.png"
    photo("rocket").save(image)
    job = ImageJob(image, "a.png", None)
    run = LabellingRun(tmp_path / "out", {"command": "test"})
    run.start(overwrite=False)
    run.commit(job, Image.open(image), [SegmentedObject(mask_to_rle(np.ones((534, 800), bool)), 1.0, 1)])
    assert run.done(job)
    os.utime(image, ns=(time.time_ns(), image.stat().st_mtime_ns + 10**9))
    assert not run.done(ImageJob(image, "a.png", None))
    summary = run.merge([job])
    assert (summary.images, summary.failures) == (0, 1)
    assert "not processed" in (tmp_path / "out" / "errors.jsonl").read_text()
