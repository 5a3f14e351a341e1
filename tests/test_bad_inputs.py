"""Bad files and values are refused quickly, before any work, with a message that names what is wrong: fake
checkpoints, crafted safetensors headers, corrupt images and decompression bombs, 0/1 masks, unsafe names,
wrong-typed configs; fuzzed prompts files and safetensors headers raise only the documented errors."""

import contextlib
import io
import json
import resource
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file

from finesam.adapters.hq import HQSAMAdapter
from finesam.adapters.lora import SAMLoraAdapter
from finesam.cli import main
from finesam.data.pairs import check_masks, list_pairs, load_pair, read_mask
from finesam.data.synthetic import write_dataset
from finesam.evaluation import adapter_configuration, evaluate
from finesam.inputs import open_image
from finesam.training.config import parse_config
from finesam.weights import CheckpointError, load_sam, save_hq, save_lora, save_sam
from finesam.weights.io import write_safetensors

from conftest import photo
from helpers import finesam, write_config

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 375042383\n".format("ab" * 32)
HTML_PAGE = "<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"


@pytest.fixture(scope="module")
def weights(tmp_path_factory, small) -> Path:
    return save_sam(small, tmp_path_factory.mktemp("weights") / "small.safetensors")


@pytest.fixture(scope="module")
def pth_bytes(official_small) -> bytes:
    buffer = io.BytesIO()
    torch.save(official_small.state_dict(), buffer)
    return buffer.getvalue()


def refused_quickly(path: Path, message: str | None) -> None:
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message) as error:
        load_sam(path)
    assert time.perf_counter() - start < 1.0, "a bad file must be refused before any work"
    assert "weights_only=False" not in str(error.value)  # never invite the unsafe workaround


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (HTML_PAGE.encode(), "not a checkpoint: it is an HTML page"),
        (LFS_POINTER.encode(), "not a checkpoint: it is a Git LFS pointer"),
        (np.random.default_rng(0).bytes(5000), "random bytes"),
        (b"", "the file is empty"),
    ],
    ids=["html", "lfs", "random", "empty"],
)
def test_non_checkpoints_say_what_they_are(tmp_path, content, message):
    for suffix in (".pth", ".safetensors"):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(content)
        refused_quickly(path, message)


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_never_give_another_exception(tmp_path, seed):
    rng = np.random.default_rng(seed)
    content = rng.bytes(int(rng.integers(1, 4000)))
    if seed % 2:  # a zip signature in front: the zip reader is exercised too
        content = b"PK\x03\x04" + content
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    refused_quickly(path, None)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_or_padded_checkpoints(tmp_path, pth_bytes, weights, keep):
    path = tmp_path / "model.pth"
    path.write_bytes(pth_bytes[: int(len(pth_bytes) * keep)])
    refused_quickly(path, "truncated or corrupt PyTorch checkpoint")
    data = weights.read_bytes()
    cut = tmp_path / "model.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    refused_quickly(cut, "truncated or padded safetensors file")
    cut.write_bytes(data + b"\0" * 64)
    refused_quickly(cut, "truncated or padded safetensors file")


def crafted(path: Path, source: Path, config=None, tensors=None) -> Path:
    """A copy of the finesam file `source` with its config metadata and/or tensors replaced."""
    with open(source, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    metadata = dict(header["__metadata__"])
    if config is not None:
        metadata["finesam.config"] = json.dumps(config)
    loaded = load_file(source) if tensors is None else tensors
    return write_safetensors(loaded, path, metadata)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"encoder": {"family": "tiny_vit", "depths": [2, 2, 60000, 2]}}, r"depths .* out of range"),
        ({"encoder": {"family": "vit"}, "image_size": "big"}, "image_size must be an integer"),
        ({"encoder": {"family": "vit", "dim": 1e9}}, "dim must be an integer"),
        ({"encoder": {"family": "vit", "depth": 100000}}, "depth 100000 is out of range"),
        ({"encoder": {"family": "vit", "global_attention_blocks": 3}}, "must be a list"),
        ({"encoder": 7}, "the encoder configuration is a JSON object"),
        ({"encoder": {"family": "swin"}}, "unknown encoder family"),
        ([1, 2], "a configuration is a JSON object"),
    ],
)
def test_crafted_config_metadata_is_refused_before_building(tmp_path, weights, edit, message):
    path = crafted(tmp_path / "crafted.safetensors", weights, config=edit)
    refused_quickly(path, "bad 'finesam.config' metadata: .*" + message)


def test_a_huge_declared_tensor_is_refused_from_the_header(tmp_path, weights):
    """A header that declares a 40 GB tensor in a small file, and a consistent file whose tensor has the wrong
    shape (of another, bigger model): refused from the header, no tensor mapped."""
    path = tmp_path / "huge.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [10_000_000_000]
    header[key]["data_offsets"] = [0, 40_000_000_000]
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])
    refused_quickly(path, "truncated or padded safetensors file")
    tensors = load_file(weights)
    tensors[key] = torch.zeros(3, 5, 7)
    refused_quickly(crafted(tmp_path / "shape.safetensors", weights, tensors=tensors), "mis-shaped")


HEADER_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edit=st.dictionaries(
        st.sampled_from(["encoder", "decoder", "image_size", "name", "family", "dim", "depths"]), HEADER_VALUES
    ),
    family=st.sampled_from(["vit", "tiny_vit", None]),
)
def test_fuzzed_config_metadata_works_or_raises_checkpoint_error(tmp_path, weights, edit, family):
    config = dict(edit)
    if family is not None and isinstance(config.get("encoder"), dict):
        config["encoder"] = {"family": family, **config["encoder"]}
    path = crafted(tmp_path / "fuzzed.safetensors", weights, config=config)
    with contextlib.suppress(CheckpointError):  # or it works
        load_sam(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=12), HEADER_VALUES, max_size=4), tail=st.binary(max_size=64))
def test_fuzzed_safetensors_headers_raise_checkpoint_error(tmp_path, header, tail):
    encoded = json.dumps(header).encode()
    path = tmp_path / "fuzzed.safetensors"
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + tail)
    with pytest.raises(CheckpointError):
        load_sam(path)


def png_declaring(width: int, height: int) -> bytes:
    """A small PNG whose header declares width x height pixels (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad_images")
    good = io.BytesIO()
    photo("rocket").save(good, format="JPEG")
    files = {
        "truncated.jpg": good.getvalue()[: len(good.getvalue()) // 3],
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + np.random.default_rng(1).bytes(3000),
        "text.jpg": b"this is not an image\n",
        "bomb.png": png_declaring(50_000, 50_000),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return {name.split(".")[0]: folder / name for name in files}


MESSAGES = {
    "truncated": "not a readable image",
    "corrupt": "not a readable image",
    "text": "not a readable image",
    "bomb": "over the pixel limit",
}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_bad_images_raise_value_error_in_the_api(bad_images, small, kind):
    with pytest.raises(ValueError, match=MESSAGES[kind]):
        open_image(bad_images[kind])
    lazy = Image.open(bad_images[kind]) if kind == "truncated" else None
    if lazy is not None:  # opened by the caller, decoded by us: still a ValueError
        with pytest.raises(ValueError, match="not a readable image"):
            small.predict(lazy, boxes=[10, 10, 100, 100])


def test_the_pixel_limit_is_configurable(tmp_path, bad_images, weights):
    image = tmp_path / "photo.png"
    photo("rocket").save(image)  # 800 x 534 = 427200 pixels
    args = ["segment", image, "--weights", weights, "--box", "10,10,100,100", "--out", tmp_path / "m.png"]
    refused = finesam(*args, "--max-pixels", "300000")
    assert refused.returncode == 2 and "800 x 534 = 427200 pixels, over the pixel limit of 300000" in refused.stderr
    assert finesam(*args, "--max-pixels", "500000").returncode == 0


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_bad_images_are_one_line_in_every_command(tmp_path, bad_images, weights, kind):
    image = bad_images[kind]
    data = tmp_path / "data"
    for folder in ("im", "gt"):
        (data / folder).mkdir(parents=True)
    (data / "im" / f"a{image.suffix}").write_bytes(image.read_bytes())
    Image.new("L", (10, 10), 255).save(data / "gt" / "a.png")
    commands = [
        ("segment", image, "--weights", weights, "--box", "1,1,5,5", "--out", tmp_path / "m.png"),
        ("everything", image, "--weights", weights, "--out", tmp_path / "everything"),
        ("eval", data, "--weights", weights, "--out", tmp_path / "eval"),
    ]
    # every command for two kinds of fault; the others through segment alone (each run costs a start-up)
    for command in commands if kind in ("truncated", "bomb") else commands[:1]:
        result = finesam(*command)
        assert result.returncode == 2, (command[0], result.stderr)
        assert MESSAGES[kind] in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "m.png").exists() and not (tmp_path / "everything").exists()


def test_zero_one_masks_read_like_their_0_255_twins(tmp_path):
    rng = np.random.default_rng(0)
    values = (rng.random((40, 60)) > 0.5).astype(np.uint8)
    Image.fromarray(values).save(tmp_path / "01.png")
    Image.fromarray(values * 255).save(tmp_path / "0255.png")
    Image.fromarray(values.astype(bool)).save(tmp_path / "bits.png")
    Image.fromarray(np.where(values, 200, 20).astype(np.uint8)).save(tmp_path / "grey.png")
    expected = values.astype(bool)
    for name in ("01.png", "0255.png", "bits.png", "grey.png"):
        np.testing.assert_array_equal(read_mask(tmp_path / name), expected, err_msg=name)
    Image.new("RGB", (60, 40)).save(tmp_path / "im.png")
    _, target = load_pair(tmp_path / "im.png", tmp_path / "01.png")
    assert target.dtype == torch.float32 and torch.equal(target.bool(), torch.from_numpy(expected))


def test_empty_masks_are_named(tmp_path, weights):
    data = tmp_path / "data"
    for folder in ("im", "gt"):
        (data / folder).mkdir(parents=True)
    for name in ("a", "b"):
        photo("rocket").resize((80, 60)).save(data / "im" / f"{name}.png")
    Image.new("L", (80, 60), 1).save(data / "gt" / "a.png")  # a 0/1 mask: all foreground
    Image.new("L", (80, 60), 0).save(data / "gt" / "b.png")
    result = finesam("eval", data, "--weights", weights, "--out", tmp_path / "eval")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{data / 'gt' / 'b.png'}: empty ground-truth mask" in result.stderr


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "a+b", "a/b", "..", ".hidden", "", "x" * 65, "a b"])
def test_unsafe_adapter_names_are_refused(small, name):
    with pytest.raises(ValueError, match="is not a valid name"):
        SAMLoraAdapter(small, name=name)
    config = {"model": {"weights": "w"}, "data": {"train": "d"}, "lora": {"name": name}}
    with pytest.raises(ValueError, match=r"\[lora\].*is not a valid name"):
        parse_config(config)


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("run", {"log_every": 0}, r"\[run\] log_every = 0: must be at least 1"),
        ("run", {"checkpoint_every": -5}, r"\[run\] checkpoint_every = -5: must be at least 1"),
        ("optim", {"epochs": "ten"}, r"\[optim\] epochs = 'ten': expected an integer"),
        ("optim", {"epochs": 2.5}, r"\[optim\] epochs = 2.5: expected an integer"),
        ("optim", {"lr": "fast"}, r"\[optim\] lr = 'fast': expected a number"),
        ("optim", {"batch_size": True}, r"\[optim\] batch_size = True: expected an integer"),
        ("lora", {"rank": 0}, r"\[lora\] rank = 0: must be in 1..4096"),
        ("data", {"train": "d", "scale_jitter": [0.1]}, r"scale_jitter = \[0.1\]: expected a list of 2 numbers"),
        ("hq", {"hq_mask_only": "yes"}, r"\[hq\] hq_mask_only = 'yes': expected true or false"),
        ("run", {"device": "cuda:7"}, r"device = 'cuda:7' is not usable here"),
        ("run", {"device": "meta"}, r"device = 'meta' holds no data"),
        ("run", {"device": "toaster"}, r"device = 'toaster' is not usable here"),
    ],
)
def test_training_config_fields_are_checked_at_parse_time(section, values, message):
    config = {"model": {"weights": "w"}, "data": {"train": "d"}, "hq": {}, section: values}
    with pytest.raises(ValueError, match=message):
        parse_config(config)


def test_shipped_gpu_config_on_this_machine_fails_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.fail("this test expects a machine without CUDA (as CI is)")
    result = finesam("train", "--config", Path(__file__).parents[1] / "configs" / "hq_sam.toml")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "[run]: device = 'cuda' is not usable here" in result.stderr


PROMPT_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-50, 900) | st.floats(-50, 900) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=16,
)
PROMPT_KEYS = st.sampled_from(["box", "boxes", "points", "labels", "multimask", "extra"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.dictionaries(PROMPT_KEYS, PROMPT_VALUES, max_size=4), max_size=3) | PROMPT_VALUES)
def test_fuzzed_prompts_files_work_or_exit_2(tmp_path, weights, prompts):
    """Any JSON document as a prompts file: masks are written (exit 0) or one usage error (exit 2)."""
    image = tmp_path / "small.png"
    if not image.exists():
        photo("rocket").resize((200, 133)).save(image)
    prompt_file = tmp_path / "prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    args = ["segment", str(image), "--prompts", str(prompt_file), "--weights", str(weights), "--out"]
    with pytest.raises(SystemExit) as exit_status:
        main([*args, str(tmp_path / "mask.png")])
        raise SystemExit(0)
    assert exit_status.value.code in (0, 2)


def test_prompt_file_values_are_typed(tmp_path, weights):
    image = tmp_path / "photo.png"
    photo("rocket").save(image)
    for prompt, message in [
        ({"box": [10, 10, 100, 100], "multimask": "false"}, '"multimask" must be true or false'),
        ({"points": [[10, 10]], "labels": [True]}, '"labels" must be 1 (foreground) or 0 (background)'),
    ]:
        (tmp_path / "p.json").write_text(json.dumps([prompt]))
        result = finesam("segment", image, "--prompts", tmp_path / "p.json", "--weights", weights, "--out", "m.png")
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_negative_coordinates_and_lossy_masks(tmp_path, weights):
    image = tmp_path / "photo.png"
    photo("rocket").save(image)
    base = ["segment", image, "--weights", weights]
    outside = finesam(*base, "--point", "-1,5", "--out", tmp_path / "m.png")  # parsed, then refused as outside
    assert outside.returncode == 2 and "outside" in outside.stderr and "expected one argument" not in outside.stderr
    lossy = finesam(*base, "--box", "10,10,100,100", "--out", tmp_path / "mask.jpg")
    assert lossy.returncode == 2 and "lossless formats only" in lossy.stderr
    assert not (tmp_path / "mask.jpg").exists()


def test_eval_limit_and_colliding_names(tmp_path, weights, small):
    data = tmp_path / "data"
    for folder in ("im", "gt"):
        (data / folder).mkdir(parents=True)
    photo("rocket").resize((80, 60)).save(data / "im" / "a.png")
    Image.new("L", (80, 60), 255).save(data / "gt" / "a.png")
    for limit in ("0", "-1"):
        result = finesam("eval", data, "--weights", weights, "--out", tmp_path / "e", "--limit", limit)
        assert result.returncode == 2 and "--limit" in result.stderr
    named_hq = save_lora(SAMLoraAdapter(small, name="hq", rank=2), tmp_path / "hq.lora.safetensors")
    hq = tmp_path / "small.hq.safetensors"
    save_hq(HQSAMAdapter(small), hq)
    result = finesam("eval", data, "--weights", weights, "--hq", hq, "--lora", named_hq, "--out", tmp_path / "e")
    assert result.returncode == 2 and "is named 'hq', which already names" in result.stderr
    only = finesam("eval", data, "--weights", weights, "--hq-only", "--out", tmp_path / "e")
    assert only.returncode == 2 and "--hq-only needs HQ-SAM weights" in only.stderr


def test_zero_one_datasets_evaluate_like_their_twins_and_empty_datasets_are_refused(tmp_path, small):
    rng = np.random.default_rng(3)
    roots = {name: tmp_path / name for name in ("01", "0255", "classes")}
    for index in range(3):
        image = photo("rocket").resize((120, 80))
        mask = np.zeros((80, 120), np.uint8)
        top, left = rng.integers(5, 40), rng.integers(5, 60)
        mask[top : top + 30, left : left + 50] = 1
        for name, values in (("01", mask), ("0255", mask * 255), ("classes", mask * 2)):
            for folder in ("im", "gt"):
                (roots[name] / folder).mkdir(parents=True, exist_ok=True)
            image.save(roots[name] / "im" / f"{index}.png")
            Image.fromarray(values).save(roots[name] / "gt" / f"{index}.png")
    base = [adapter_configuration("base", [])]
    assert evaluate(small, base, roots["01"]) == evaluate(small, base, roots["0255"])
    check_masks(list_pairs(roots["01"]))
    with pytest.raises(ValueError, match=r"the first 3 masks .* are all empty"):
        check_masks(list_pairs(roots["classes"]))  # class index 2: neither a 0/1 nor a 0/255 mask


def grey_png(path: Path, side: int) -> Path:
    """A black side x side greyscale PNG, written row block by row block (a few MB for a huge image)."""
    compressor, rows = zlib.compressobj(1), b"\0" * (side + 1) * 100  # each row: filter byte 0, then pixels

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)))
        for _ in range(side // 100):
            f.write(chunk(b"IDAT", compressor.compress(rows)))
        f.write(chunk(b"IDAT", compressor.flush()) + chunk(b"IEND", b""))
    return path


def test_out_of_memory_is_one_line(tmp_path, weights):
    """A 40000 x 40000 image (pixel limit raised) in a process limited to 4 GB of address space: its RGB copy
    (4.8 GB) cannot be allocated, and the user reads one line, not a traceback."""
    image = grey_png(tmp_path / "huge.png", 40_000)
    command = [sys.executable, "-m", "finesam.cli", "segment", str(image), "--weights", str(weights)]
    command += ["--box", "10,10,900,900", "--out", str(tmp_path / "m.png"), "--max-pixels", str(2 * 10**9)]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: out of memory" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]


def test_resume_from_a_truncated_checkpoint_and_meta_device(tmp_path, weights):
    data = write_dataset(tmp_path / "data", 4, seed=0, size=(64, 64))
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a checkpoint cut short by a crash
    config = write_config(tmp_path / "c.toml", weights, data, out, extra="[hq]\n", epochs=1)
    result = finesam("train", "--config", config, "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "checkpoint.pt: a truncated or corrupt PyTorch checkpoint" in result.stderr
    assert "start again without --resume" in result.stderr
    image = tmp_path / "photo.png"
    photo("rocket").save(image)
    meta = finesam("segment", image, "--weights", weights, "--box", "1,1,9,9", "--out", "m.png", "--device", "meta")
    assert meta.returncode == 2 and "--device meta holds no data" in meta.stderr
