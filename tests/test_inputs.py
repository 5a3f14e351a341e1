"""Images as users have them: modes, EXIF orientation, numpy arrays, tiny and huge sizes, batches; with and
without the HQ adapter. Masks are compared with `torch.equal` against the same image in plain RGB, and with
the official predictors (TOLERANCE, 1e-4) where they accept the input.
"""

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from finesam.inputs import as_rgb

from conftest import SMALL, TOLERANCE, max_diff, photo
from helpers import with_adapter
from official import HQSamPredictor, build_official

BOX = [40, 30, 300, 250]


def masks(model, image, **prompt):
    return model.predict(image, **(prompt or {"boxes": BOX}), return_logits=True).masks


@pytest.fixture(scope="module")
def rgb() -> Image.Image:
    return photo("chelsea")


def test_rgba_la_palette_and_grayscale_match_their_rgb_versions(small, rgb):
    rgba = rgb.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
    assert torch.equal(masks(small, rgba), masks(small, rgb))  # alpha is dropped, colours kept
    gray = rgb.convert("L")
    assert torch.equal(masks(small, gray), masks(small, gray.convert("RGB")))
    assert torch.equal(masks(small, gray.convert("LA")), masks(small, gray.convert("RGB")))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    assert torch.equal(masks(small, palette), masks(small, palette.convert("RGB")))


def test_16_bit_images_are_scaled_not_clipped(small, rgb):
    gray8 = np.asarray(rgb.convert("L"))
    gray16 = gray8.astype(np.uint16) * 257  # 0..255 -> 0..65535 exactly
    as_pil16 = Image.fromarray(gray16)
    assert as_pil16.mode.startswith("I;16")
    assert np.array_equal(np.asarray(as_rgb(as_pil16))[..., 0], gray8)
    expected = masks(small, Image.fromarray(gray8))
    assert torch.equal(masks(small, as_pil16), expected)
    assert torch.equal(masks(small, gray16), expected)  # a uint16 numpy array
    png = io.BytesIO()
    as_pil16.save(png, format="PNG")
    assert torch.equal(masks(small, Image.open(io.BytesIO(png.getvalue()))), expected)  # read back as I;16 / I


def test_exif_rotated_jpeg_is_oriented_as_a_viewer_shows_it(small, rgb, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    rgb.save(path, exif=exif.tobytes(), quality=95)
    stored = Image.open(path)
    assert stored.size == rgb.size
    displayed = Image.fromarray(np.asarray(stored.transpose(Image.Transpose.ROTATE_270)))  # pixels only, no EXIF
    prediction = small.predict(Image.open(path), boxes=[40, 30, 300, 500])
    assert prediction.masks.shape[-2:] == (displayed.height, displayed.width) == (rgb.width, rgb.height)
    assert torch.equal(prediction.masks, small.predict(displayed, boxes=[40, 30, 300, 500]).masks)


def test_numpy_arrays_equal_pil_images(small, rgb):
    array = np.asarray(rgb)
    assert torch.equal(masks(small, array), masks(small, rgb))
    assert torch.equal(masks(small, np.asarray(rgb.convert("L"))), masks(small, rgb.convert("L")))
    with_alpha = np.concatenate([array, np.full((*array.shape[:2], 1), 7, np.uint8)], axis=2)
    assert torch.equal(masks(small, with_alpha), masks(small, rgb))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (np.zeros((10, 10, 3), np.float32), "must be uint8"),
        (np.zeros((10, 10, 2), np.uint8), "HxWx3, HxWx4 or HxW"),
        (np.zeros((0, 10, 3), np.uint8), "the image is empty"),
        ("image.png", "expected a PIL image or a numpy array"),
    ],
)
def test_bad_images_raise_a_clear_error(small, bad, message):
    with pytest.raises(ValueError, match=message):
        small.predict(bad, boxes=[0, 0, 1, 1])


@pytest.mark.parametrize("size", [(1, 1), (1, 5000), (5000, 1), (3, 2)])
def test_tiny_and_elongated_images(small, size):
    width, height = size
    image = Image.new("RGB", size, (120, 30, 200))
    prediction = small.predict(image, points=[[0.5 * width, 0.5 * height]], multimask_output=True)
    assert prediction.masks.shape == (1, 3, height, width)


def test_huge_image_memory_stays_bounded():
    """8000x6000: memory beyond the image itself and its output masks stays small (measured in a subprocess)."""
    script = textwrap.dedent(
        """
        import resource, sys, numpy as np, torch
        sys.path[:0] = ["tests", "reference"]
        from conftest import SMALL
        from finesam.model import SegmentAnything
        model = SegmentAnything(SMALL).eval()
        image = np.random.default_rng(0).integers(0, 256, (6000, 8000, 3), dtype=np.uint8)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prediction = model.predict(image, boxes=[[100, 100, 4000, 3000], [10, 10, 7000, 5000]], multimask_output=True)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert prediction.masks.shape == (2, 3, 6000, 8000) and prediction.masks.dtype == torch.bool
        print((after - before) // 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    growth_mb = int(result.stdout.split()[-1])
    # output: 6 bool masks of 48 MB = 288 MB; one prompt's float logits: 3 x 192 MB = 576 MB. A float pass over
    # the whole batch would add 1.1 GB more.
    assert growth_mb < 288 + 576 + 400, f"peak memory grew by {growth_mb} MB"


def test_batch_of_images_equals_one_by_one(small):
    images = [photo("coffee"), photo("astronaut"), np.asarray(photo("rocket"))]
    batched = small.encode_images(images)
    for image, embedding in zip(images, batched, strict=True):
        single = small.encode_image(image)
        assert embedding.original_size == single.original_size and embedding.input_size == single.input_size
        assert max_diff(embedding.embedding, single.embedding) <= TOLERANCE


@pytest.fixture(scope="module")
def hq_pair():
    official = build_official(SMALL, seed=1, hq=True)
    model, adapter = with_adapter(official)
    adapter.inject()
    return official, model


def test_hq_batch_of_images_keeps_per_image_features(hq_pair):
    _, model = hq_pair
    images = [photo("coffee"), photo("astronaut")]
    batched = model.encode_images(images)
    for image, embedding in zip(images, batched, strict=True):
        single = model.encode_image(image)
        early = embedding.features["early_embedding"]
        assert early.shape[0] == 1
        assert max_diff(early, single.features["early_embedding"]) <= TOLERANCE
        prediction = model.predict(embedding, boxes=[50, 60, 500, 600], return_logits=True)
        assert (
            max_diff(prediction.masks, model.predict(single, boxes=[50, 60, 500, 600], return_logits=True).masks)
            <= TOLERANCE
        )


def test_hq_mask_input_refinement_and_batches_match_official(hq_pair):
    official, model = hq_pair
    image = photo("rocket")
    predictor = HQSamPredictor(official)
    predictor.set_image(np.asarray(image))
    embedding = model.encode_image(image)
    points, labels = np.array([[400.0, 260.0]]), np.array([1])
    _, _, low_res = predictor.predict(point_coords=points, point_labels=labels, multimask_output=True)
    expected, iou, _ = predictor.predict(
        point_coords=points, point_labels=labels, mask_input=low_res, multimask_output=False, return_logits=True
    )
    first = model.predict(embedding, points=points, labels=labels, multimask_output=True)
    refined = model.predict(
        embedding, points=points, labels=labels, mask_input=first.low_res_logits, return_logits=True
    )
    assert max_diff(refined.masks[0], torch.from_numpy(expected)) <= TOLERANCE
    assert max_diff(refined.iou_predictions[0], torch.from_numpy(iou)) <= TOLERANCE
    boxes = np.array([[10, 20, 300, 400], [200, 100, 700, 500]], dtype=np.float64)
    batched = model.predict(embedding, boxes=boxes, return_logits=True)
    for i, box in enumerate(boxes):
        single, _, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
        assert max_diff(batched.masks[i], torch.from_numpy(single)) <= TOLERANCE


def test_many_prompts_in_the_cli_keep_memory_bounded(tmp_path, small):
    """300 prompts on an 1800 x 1200 photo: each prompt's masks are written as they come, so the peak memory
    holds one prompt's logits (8.6 MB) rather than all of them (2.6 GB), measured in a subprocess."""
    from finesam.weights import save_sam

    weights = save_sam(small, tmp_path / "small.safetensors")
    image = tmp_path / "coffee.png"
    photo("coffee").save(image)
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 800, (300, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(50, 400, (300, 2))], axis=1).round().tolist()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"box": box} for box in boxes]))
    script = textwrap.dedent(
        f"""
        import re
        from finesam.cli import main
        def status(key):
            return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) // 1024
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak (VmHWM) to the current size
        before = status("VmRSS")
        args = ["segment", "{image}", "--weights", "{weights}", "--prompts", "{prompts}"]
        try:
            main([*args, "--out", "{tmp_path}/m.png"])
        except SystemExit as e:
            assert not e.code, e.code
        print(status("VmHWM") - before)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert len(list(tmp_path.glob("m_*.png"))) == 300
    growth_mb = int(result.stdout.split()[-1])
    # the model (SMALL: 20 MB), the image and its resized copies (~30 MB), one prompt's logits at 1024 and at
    # the original size (4 + 8.6 MB), torch's working memory; holding every prompt's logits would add 2.6 GB
    assert growth_mb < 500, f"peak memory grew by {growth_mb} MB"
