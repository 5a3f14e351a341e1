"""Text prompts (Grounded SAM): a zero-shot detector of HF transformers finds boxes for phrases, SAM masks them.

No detector weights can be downloaded here: `tiny_detectors` builds small Grounding DINO, OWLv2 and OWL-ViT
models with random weights and their processors from local vocabularies, saved to folders and loaded back by
path as a user's local detector would be. The tests prove the wiring: the boxes finesam uses are what
transformers' own post-processing returns for the same outputs and thresholds (in image pixels, clipped to the
image), the masks are `predict`'s with those boxes, and the dataset form names its COCO categories by the
phrases, resumes and shares out under torchrun like the other dataset runs.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from finesam.amg.rle import from_coco, rle_to_mask
from finesam.detection import DetectorError, TextDetector, grounding_text, masks_of_detections, parse_phrases
from finesam.detection import segment_text as segment_by_text
from finesam.model import SegmentAnything
from finesam.weights import convert_checkpoint, load_hq, load_sam, save_sam

import tiny_detectors
from conftest import SMALL, photo
from helpers import finesam
from official import build_official
from served import Served
from test_serve_browser import api_union, browser_paths, overlay_mask, wait_for

PHRASES = ["a dog", "a cat"]
TEXT = "A dog. a  cat."
# thresholds under which the random-weight detectors keep several boxes (and a text threshold that keeps all)
THRESHOLDS = {
    "grounding_dino": (0.5, 0.0),
    "mm_grounding_dino": (0.05, 0.0),
    "owlv2": (0.3, None),
    "owlvit": (0.3, None),
}


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("detectors")
    return {name: build(root / name) for name, build in tiny_detectors.BUILDERS.items()}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, small) -> Path:
    return save_sam(small, tmp_path_factory.mktemp("weights") / "small.safetensors")


@pytest.fixture(scope="module")
def sam(weights) -> SegmentAnything:
    """The model as the command loads it (fast paths included): its outputs equal the command's bit for bit."""
    return load_sam(weights)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "rocket.png"
    photo("rocket").resize((240, 160), Image.Resampling.BILINEAR).save(path)
    return path


def image_of(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def transformers_detections(folder: Path, image: Image.Image, box_threshold: float, text_threshold: float | None):
    """What transformers' own processor, model and post-processing give: (scores, boxes in pixels, labels)."""
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(folder).eval()
    grounding = text_threshold is not None
    text = grounding_text(PHRASES) if grounding else [PHRASES]
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    size = [(image.height, image.width)]
    if grounding:
        result = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold, target_sizes=size
        )[0]
        labels = None
    else:
        result = processor.post_process_grounded_object_detection(
            outputs, threshold=box_threshold, target_sizes=size, text_labels=[PHRASES]
        )[0]
        labels = [PHRASES[i] for i in result["labels"].tolist()]
    return result["scores"], result["boxes"], labels


def test_phrases_are_parsed_like_grounding_dino_text():
    assert parse_phrases(TEXT) == PHRASES
    assert parse_phrases(["Dog", " dog ", "traffic  light"]) == ["dog", "traffic light"]
    assert grounding_text(PHRASES) == "a dog. a cat."
    for bad in ("", " . .", ["a.b"]):
        with pytest.raises(ValueError, match=r"no phrase|cannot hold"):
            parse_phrases(bad)


@pytest.mark.parametrize("kind", sorted(THRESHOLDS))
def test_boxes_are_what_the_post_processing_of_transformers_returns(detectors, image_path, kind):
    image = image_of(image_path)
    box_threshold, text_threshold = THRESHOLDS[kind]
    detector = TextDetector.load(detectors[kind])
    found = detector.detect(image, TEXT, box_threshold, text_threshold)
    scores, boxes, labels = transformers_detections(detectors[kind], image, box_threshold, text_threshold)
    assert len(found) == len(scores) > 0
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    clipped = torch.stack([boxes[:, [0, 2]].clamp(0, image.width), boxes[:, [1, 3]].clamp(0, image.height)], -1)
    clipped = clipped[:, [0, 0, 1, 1], [0, 1, 0, 1]]  # x1, y1, x2, y2
    for detection, i in zip(found, order, strict=True):
        assert detection.score == float(scores[i])
        assert detection.box == tuple(clipped[i].tolist())
        assert detection.label == PHRASES[detection.phrase]
        if labels is not None:  # class queries: the post-processing names the query
            assert detection.label == labels[i]
    assert all(
        0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height for x1, y1, x2, y2 in (d.box for d in found)
    )
    limited = detector.detect(image, TEXT, box_threshold, text_threshold, max_detections=2)
    assert limited == found[:2]


def test_grounding_names_each_box_by_its_best_phrase_above_the_text_threshold(detectors, image_path):
    image = image_of(image_path)
    detector = TextDetector.load(detectors["grounding_dino"])
    inputs = detector.inputs(image, PHRASES)
    probabilities = detector.outputs(inputs).logits[0].sigmoid()
    scores = probabilities.max(-1).values
    kept = probabilities[scores > 0.5]
    # "[CLS] a dog . a cat . [SEP]": the tokens of each phrase
    assert inputs["input_ids"][0].tolist()[1:3] == detector.processor.tokenizer.convert_tokens_to_ids(["a", "dog"])
    best = torch.stack([kept[:, 1:3].max(-1).values, kept[:, 4:6].max(-1).values], -1)
    found = detector.detect(image, PHRASES, 0.5, 0.0)
    order = sorted(range(len(kept)), key=lambda i: -float(scores[scores > 0.5][i]))  # highest score first
    assert [d.phrase for d in found] == best.argmax(-1)[order].tolist()
    threshold = float(best.max(-1).values.median())
    named = detector.detect(image, PHRASES, 0.5, threshold)
    assert 0 < len(named) < len(found)
    assert len(named) == int((best.max(-1).values > threshold).sum())
    assert detector.detect(image, PHRASES, 0.5, 1.0) == []


def test_masks_are_predict_with_the_boxes(detectors, image_path, sam):
    image = image_of(image_path)
    detector = TextDetector.load(detectors["owlvit"])
    found = segment_by_text(sam, detector, image, TEXT, box_threshold=0.3)
    assert found
    boxes = [list(item.detection.box) for item in found]
    masks, scores = sam.predict(image, boxes=boxes).best()
    for item, mask, score in zip(found, masks, scores.tolist(), strict=True):
        assert np.array_equal(item.mask, mask.numpy()) and item.predicted_iou == score
    assert [item.detection for item in found] == detector.detect(image, TEXT, 0.3)
    assert segment_by_text(sam, detector, image, TEXT, box_threshold=1.0) == []
    assert masks_of_detections(sam, image, []) == []


def test_thresholds_the_post_processing_does_not_take_are_refused(detectors, image_path):
    detector = TextDetector.load(detectors["owlv2"])
    assert detector.default_thresholds() == (0.1, None)
    with pytest.raises(DetectorError, match="text threshold is for phrase-grounding"):
        detector.detect(image_of(image_path), TEXT, text_threshold=0.3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        detector.detect(image_of(image_path), TEXT, box_threshold=1.5)


def test_a_detector_that_does_not_load_says_why(tmp_path, monkeypatch):
    with pytest.raises(DetectorError, match="does not exist"):
        TextDetector.load(tmp_path / "missing")
    with pytest.raises(DetectorError, match=r"cannot load the detector .*save_pretrained"):
        TextDetector.load(tmp_path)  # a folder without a detector
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, read at import
    with pytest.raises(DetectorError, match=r"cannot load the detector 'nobody/no-such-detector': .*cached"):
        TextDetector.load("nobody/no-such-detector")


def test_without_transformers_the_message_names_the_extra(tmp_path, weights, image_path):
    for source, out in ((image_path, tmp_path / "m.png"), (image_path.parent, tmp_path / "labels")):
        code = (
            "import sys; sys.modules['transformers'] = None\n"
            "from finesam.cli import main\n"
            f"main(['segment', {str(source)!r}, '--weights', {str(weights)!r}, '--text', 'a dog', "
            f"'--out', {str(out)!r}])\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert "transformers is missing: pip install 'finesam[text]'" in result.stderr
        assert not out.exists()  # refused before anything is written (a dataset run records nothing)


def test_segment_text_writes_masks_and_detections(tmp_path, detectors, weights, image_path, sam):
    out = tmp_path / "masks.png"
    result = finesam(
        "segment", image_path, "--weights", weights, "--text", TEXT, "--detector", detectors["grounding_dino"],
        "--box-threshold", "0.5", "--text-threshold", "0", "--max-detections", "5",
        "--out", out, "--detections", tmp_path / "found.json", "--overlay", tmp_path / "overlay.png",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "found.json").read_text())
    image = image_of(image_path)
    expected = TextDetector.load(detectors["grounding_dino"]).detect(image, TEXT, 0.5, 0.0, 5)
    assert len(records) == len(expected) == 5
    masks, scores = sam.predict(image, boxes=[list(d.box) for d in expected]).best()
    for i, (record, detection) in enumerate(zip(records, expected, strict=True)):
        assert record == {
            "label": detection.label,
            "score": detection.score,
            "box": list(detection.box),
            "predicted_iou": scores[i].item(),
            "mask": f"masks_{i}.png",
        }
        written = np.asarray(Image.open(tmp_path / record["mask"]))
        assert np.array_equal(written, np.where(masks[i].numpy(), 255, 0))
        assert f"masks_{i}.png\t{detection.label}\tscore {detection.score:.4f}" in result.stdout
    assert Image.open(tmp_path / "overlay.png").size == image.size


def test_grounded_hq_sam_masks_with_the_hq_adapter_injected(tmp_path, detectors, image_path):
    checkpoint = tmp_path / "sam_hq_small.pth"
    torch.save(build_official(SMALL, seed=3, hq=True).state_dict(), checkpoint)
    base, hq = convert_checkpoint(checkpoint, tmp_path).written
    result = finesam(
        "segment", image_path, "--weights", base, "--hq", hq, "--text", TEXT, "--detector", detectors["owlv2"],
        "--box-threshold", "0.3", "--out", tmp_path / "m.png", "--detections", tmp_path / "found.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "found.json").read_text())
    assert records
    model = load_sam(base)
    image = image_of(image_path)
    boxes = [record["box"] for record in records]
    without, _ = model.predict(image, boxes=boxes).best()
    load_hq(model, hq).inject()
    masks, scores = model.predict(image, boxes=boxes).best()
    for record, mask, score in zip(records, masks, scores.tolist(), strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / record["mask"])) > 0, mask.numpy())
        assert record["predicted_iou"] == score
    assert not torch.equal(masks, without)  # HQ-SAM's masks, not SAM's


def test_segment_text_with_nothing_found(tmp_path, detectors, weights, image_path):
    result = finesam(
        "segment", image_path, "--weights", weights, "--text", TEXT, "--detector", detectors["owlv2"],
        "--box-threshold", "1", "--out", tmp_path / "m.png", "--detections", tmp_path / "found.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "nothing found for a dog. a cat. (box threshold 1.0): no mask written" in result.stderr
    assert json.loads((tmp_path / "found.json").read_text()) == []
    assert not list(tmp_path.glob("m*.png"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--box", "1,1,5,5"], "--text finds the boxes: drop --box"),
        (["--detector", "/nowhere/detector"], "the detector folder /nowhere/detector does not exist"),
        (["--detector", "{owlv2}", "--text-threshold", "0.3"], "text threshold is for phrase-grounding"),
        (["--text", " . "], "--text: no phrase"),
        (["--box-threshold", "2"], "expected a number from 0 to 1"),
        (["--detections", "found.json", "--text", ""], "no phrase"),
    ],
)
def test_segment_text_refuses_with_a_message(tmp_path, detectors, weights, image_path, extra, message):
    extra = [e.format(owlv2=detectors["owlv2"]) for e in extra]
    args = ["segment", image_path, "--weights", weights, "--text", TEXT, "--out", tmp_path / "m.png"]
    result = finesam(*args, *extra)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    result = finesam("segment", image_path, "--weights", weights, "--box", "1,1,5,5", "--out", tmp_path / "m.png",
                     "--detections", tmp_path / "f.json")  # fmt: skip
    assert result.returncode == 2 and "--detections lists what --text finds" in result.stderr


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dataset")
    for name, source in {"a.png": "rocket", "b.jpg": "chelsea", "sub/c.png": "coffee"}.items():
        (folder / name).parent.mkdir(exist_ok=True)
        photo(source).resize((160, 107), Image.Resampling.BILINEAR).save(folder / name)
    return folder


def dataset_args(dataset: Path, weights: Path, detector: Path, out: Path) -> list[object]:
    return ["segment", dataset, "--weights", weights, "--text", TEXT, "--detector", detector, "--box-threshold",
            "0.3", "--max-detections", "4", "--out", out, "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory, dataset, weights, detectors) -> Path:
    out = tmp_path_factory.mktemp("run")
    result = finesam(*dataset_args(dataset, weights, detectors["owlvit"], out))
    assert result.returncode == 0, result.stderr
    return out


def test_a_dataset_gets_coco_categories_named_by_the_phrases(dataset_run, dataset, detectors, sam):
    document = json.loads((dataset_run / "annotations.json").read_text())
    assert document["categories"] == [{"id": 1, "name": "a dog"}, {"id": 2, "name": "a cat"}]
    assert [image["file_name"] for image in document["images"]] == ["a.png", "b.jpg", "sub/c.png"]
    detector = TextDetector.load(detectors["owlvit"])
    total = 0
    for image_record in document["images"]:
        image = image_of(dataset / image_record["file_name"])
        found = detector.detect(image, TEXT, 0.3, None, 4)
        records = [a for a in document["annotations"] if a["image_id"] == image_record["id"]]
        masks, scores = sam.predict(image, boxes=[list(d.box) for d in found]).best()
        kept = [i for i in range(len(found)) if masks[i].any()]  # empty masks are left out, as in every run
        assert len(records) == len(kept)
        for record, i in zip(records, kept, strict=True):
            assert record["category_id"] == found[i].phrase + 1
            assert record["detection_score"] == found[i].score and record["score"] == scores[i].item()
            assert np.array_equal(coco_mask.decode(record["segmentation"]).astype(bool), masks[i].numpy())
        total += len(records)
    assert total > 0


def test_a_dataset_run_resumes_and_refuses_other_phrases(tmp_path, dataset_run, dataset, weights, detectors):
    out = tmp_path / "out"
    args = dataset_args(dataset, weights, detectors["owlvit"], out)
    assert finesam(*args).returncode == 0
    (out / "annotations.json").unlink()
    next(iter((out / "parts").glob("*.json"))).unlink()  # as if killed before the last image was committed
    result = finesam(*args)
    assert result.returncode == 0 and "(2 done before)" in result.stdout, result.stdout
    assert (out / "annotations.json").read_bytes() == (dataset_run / "annotations.json").read_bytes()
    result = finesam(*[("a dog. a bicycle." if a == TEXT else a) for a in args])
    assert result.returncode == 2 and "text: ['a dog', 'a cat'] -> ['a dog', 'a bicycle']" in result.stderr


def test_torchrun_two_processes_equal_one(tmp_path, dataset_run, dataset, weights, detectors):
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    command += ["finesam.cli", *map(str, dataset_args(dataset, weights, detectors["owlvit"], out))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("annotations.json", "errors.jsonl", "run.json"):
        assert (out / name).read_bytes() == (dataset_run / name).read_bytes(), name


@pytest.fixture(scope="module")
def served(weights, detectors) -> Iterator[Served]:
    server = Served("--weights", weights, "--detector", detectors["owlvit"])
    yield server
    server.close()


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


def test_the_api_finds_detections_and_their_boxes_mask_like_predict(served, detectors, image_path, sam):
    status, uploaded = served.upload(png_bytes(image_path), "rocket.png")
    assert status == 200, uploaded
    status, model = served.call("GET", "/api/model")
    assert status == 200 and model["detector"] == str(detectors["owlvit"])
    status, answer = served.call(
        "POST", f"/api/images/{uploaded['id']}/detections", {"text": TEXT, "box_threshold": 0.3, "max_detections": 3}
    )
    assert status == 200, answer
    image = image_of(image_path)
    expected = TextDetector.load(detectors["owlvit"]).detect(image, TEXT, 0.3, None, 3)
    assert answer["detections"] == [d.as_json() for d in expected] and expected
    for detection in answer["detections"]:
        status, masks = served.call("POST", f"/api/images/{uploaded['id']}/masks", {"box": detection["box"]})
        assert status == 200, masks
        mask = rle_to_mask(from_coco(masks["masks"][0]["rle"]))
        assert np.array_equal(mask, sam.predict(image, boxes=detection["box"]).masks[0, 0].numpy())
    for body, message in [
        ({}, '"text" must be the phrases to find'),
        ({"text": "a dog", "box_threshold": 2}, "between 0 and 1"),
        ({"text": "a dog", "text_threshold": 0.2}, "text threshold is for phrase-grounding"),
        ({"text": "a dog", "max_detections": 0}, "at least 1"),
        ({"text": " . "}, "no phrase"),
        ({"text": "a dog", "colour": 1}, "unknown keys ['colour']"),
    ]:
        status, answer = served.call("POST", f"/api/images/{uploaded['id']}/detections", body)
        assert status == 422 and message in answer["error"], (body, answer)


def test_a_server_without_a_detector_says_how_to_get_one(weights, image_path):
    server = Served("--weights", weights)
    try:
        _, uploaded = server.upload(png_bytes(image_path))
        status, answer = server.call("POST", f"/api/images/{uploaded['id']}/detections", {"text": "a dog"})
        assert status == 422 and "start it with --detector" in answer["error"]
        assert server.call("GET", "/api/model")[1]["detector"] is None
    finally:
        server.close()


def test_the_page_adds_the_detections_as_objects_editable_with_clicks(served, image_path, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    chromium, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,950"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path)})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    try:
        browser.get(served.page)
        wait_for(lambda: browser.find_element(By.ID, "text").is_enabled(), "the text box, enabled")
        browser.find_element(By.ID, "file").send_keys(str(image_path))
        image_id = wait_for(lambda: browser.execute_script("return finesam.image && finesam.image.id"), "the upload")
        browser.find_element(By.ID, "box-threshold").send_keys("0.3")
        browser.find_element(By.ID, "text").send_keys(TEXT)
        browser.find_element(By.ID, "detect").click()

        def objects() -> list[Any]:
            script = "return finesam.busy === 0 && finesam.objects.map(o => [o.name, o.score, o.box, !!o.results.main])"
            return browser.execute_script(script) or []

        found = wait_for(lambda: [o for o in objects() if o[3]] if all(o[3] for o in objects()) else [], "the masks")
        _, answer = served.call("POST", f"/api/images/{image_id}/detections", {"text": TEXT, "box_threshold": 0.3})
        assert [[o[0], o[1], o[2]] for o in found] == [[d["label"], d["score"], d["box"]] for d in answer["detections"]]
        listed = browser.find_element(By.ID, "objects").text
        assert all(f"{d['label']} {d['score']:.2f}" in listed for d in answer["detections"])
        requests = browser.execute_script("return finesam.objects.map(o => o.results.main.request)")
        np.testing.assert_array_equal(overlay_mask(browser), api_union(served, image_id, requests))

        # the first detection edited like any object: picked in the list, then a background click
        browser.find_elements(By.CSS_SELECTOR, "#objects li")[0].click()
        canvas = browser.find_element(By.ID, "prompts-main")
        ActionChains(browser).move_to_element_with_offset(canvas, 0, 0).context_click().perform()
        wait_for(
            lambda: browser.execute_script(
                "const r = finesam.objects[0].results.main; return finesam.busy === 0 && r && r.request.points"
            ),
            "the edited mask",
        )
        edited = browser.execute_script("return finesam.objects[0].results.main.request")
        assert edited["box"] == answer["detections"][0]["box"] and edited["labels"] == [0]
        requests = browser.execute_script("return finesam.objects.map(o => o.results.main.request)")
        np.testing.assert_array_equal(overlay_mask(browser), api_union(served, image_id, requests))
        assert len(browser.execute_script("return finesam.objects")) == len(answer["detections"])
    finally:
        browser.quit()


def test_serve_refuses_a_detector_folder_that_does_not_exist_before_it_loads(weights, tmp_path):
    result = finesam("serve", "--weights", weights, "--port", "0", "--detector", tmp_path / "missing")
    assert result.returncode == 2 and "--detector: the detector folder" in result.stderr, result.stderr
