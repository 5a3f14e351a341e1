"""Messages that misled (issue 34, section 6): each case gets one line that says what is wrong and what is
expected, through the real command (or the API the README documents), never a dump of torch or refiners."""

from pathlib import Path

import pytest
from PIL import Image

from finesam.adapters.hq import HQSAMAdapter
from finesam.adapters.lora import SAMLoraAdapter
from finesam.model import SegmentAnything
from finesam.training.config import RunConfig
from finesam.weights import save_hq, save_lora, save_sam

from conftest import photo
from helpers import finesam


@pytest.fixture(scope="module")
def files(tmp_path_factory, small) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("messages")
    data = folder / "data"
    for name in ("im", "gt"):
        (data / name).mkdir(parents=True)
    photo("rocket").resize((80, 60)).save(data / "im" / "a.png")
    Image.new("L", (80, 60), 255).save(data / "gt" / "a.png")
    photo("rocket").resize((160, 107)).save(folder / "rocket.png")
    return {
        "folder": folder,
        "data": data,
        "image": folder / "rocket.png",
        "base": save_sam(small, folder / "small.safetensors"),
        "hq": save_hq(HQSAMAdapter(small), folder / "small.hq.safetensors"),
        "lora": save_lora(SAMLoraAdapter(small, name="tune", rank=2), folder / "tune.lora.safetensors"),
    }


def one_line(result, *words: str) -> str:
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and len(line) < 400, line
    assert all(w in line for w in words), line
    return line


def test_a_folder_as_weights_is_called_a_folder(files, tmp_path):
    empty, with_files = tmp_path / "checkpoints", tmp_path / "run"
    empty.mkdir()
    with_files.mkdir()
    (with_files / "model.safetensors").write_bytes(files["base"].read_bytes())  # no config.json: not HF's
    for folder in (empty, with_files):
        for option in ("--weights", "--hq"):
            weights = ["--weights", files["base"], "--hq", folder] if option == "--hq" else ["--weights", folder]
            result = finesam("segment", files["image"], *weights, "--box", "1,1,50,50", "--out", tmp_path / "m.png")
            line = one_line(result, f"{folder}: is a folder, not a weights file", "official .pth", "no config.json")
            assert "no such file" not in line


def test_converting_a_converted_file_says_it_needs_no_conversion(files, tmp_path):
    for kind, name in (("base", "SAM"), ("hq", "HQ-SAM"), ("lora", "LoRA")):
        result = finesam("convert", files[kind], "--out", tmp_path)
        line = one_line(result, str(files[kind]), f"already a finesam {name} file; it needs no conversion")
        assert "missing" not in line and "key" not in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("mps", "--device mps is not usable here: this machine has no such device (available: cpu"),
        ("cuda:7", "--device cuda:7 is not usable here: this machine has no such device (available: cpu"),
        ("xpu", "--device xpu is not usable here: this machine has no such device (available: cpu"),
        ("gpu", "--device gpu is not usable here: not a device name torch knows"),
    ],
)
def test_an_unavailable_device_is_one_short_line(files, tmp_path, device, message):
    result = finesam("segment", files["image"], "--weights", files["base"], "--box", "1,1,50,50", "--device", device,
                     "--out", tmp_path / "m.png")  # fmt: skip
    assert len(one_line(result, message)) < 200
    with pytest.raises(ValueError, match=f"device = '{device}' is ") as error:
        RunConfig(out=tmp_path, device=device)
    assert len(str(error.value)) < 150 and "dispatch" not in str(error.value)


def test_eval_says_which_option_a_configuration_needs(files, tmp_path):
    for configs, words in (
        ("base,hq", ["--configs hq: 'hq' needs --hq HQ.safetensors", "parts of this run: base;"]),
        ("hq+variant", ["'hq' needs --hq", "'variant' needs --variant MODULE:CLASS"]),
        ("base,tune,other", ["--configs other: unknown part 'other'", "parts of this run: base, tune;"]),
    ):
        lora = ["--lora", files["lora"]] if "tune" in configs else []
        result = finesam("eval", files["data"], "--weights", files["base"], *lora, "--configs", configs,
                         "--out", tmp_path / "e")  # fmt: skip
        assert "(available: base, )" not in one_line(result, *words)
    result = finesam("eval", files["data"], "--weights", files["base"], "--hq", files["hq"], "--configs", "base,hq",
                     "--out", tmp_path / "e")  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_an_embedding_made_before_inject_is_a_short_value_error(small: SegmentAnything):
    """The README's promise: predicting with HQ injected on an embedding encoded without it raises a
    `ValueError` that says to encode again, not refiners' 2,000-character `ChainError`; and it is raised before
    the chain runs, so the model is left as it was."""
    image = photo("rocket").resize((160, 107))
    before = small.encode_image(image)
    adapter = HQSAMAdapter(small)
    adapter.inject()
    try:
        for call in (
            lambda: small.predict(before, boxes=[10, 10, 100, 80]),
            lambda: small.predict(before, points=[[50, 40]], multimask_output=True),
            lambda: small.decode_prompts(before, boxes=[10, 10, 100, 80]),
        ):
            with pytest.raises(ValueError, match="encode the image again with the adapter injected") as error:
                call()
            assert type(error.value) is ValueError and len(str(error.value)) < 300
            assert "early_embedding" in str(error.value) and "Chain" not in str(error.value)
        after = small.encode_image(image)
        assert small.predict(after, boxes=[10, 10, 100, 80]).masks.shape[-2:] == (107, 160)
    finally:
        adapter.eject()
    assert small.predict(before, boxes=[10, 10, 100, 80]).masks.shape[-2:] == (107, 160)  # SAM needs none
