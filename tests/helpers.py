"""Helpers shared by several test modules (no test module imports another): the `finesam` command in this
process and as a subprocess, parity with the official predictors, our model with an HQ adapter from official
weights, HF transformers' models of a configuration, and a training configuration file."""

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finesam.adapters.hq import HQSAMAdapter
from finesam.cli import main
from finesam.fast import apply_fast_paths
from finesam.model import SAMConfig, SegmentAnything
from finesam.model.config import ViTConfig
from finesam.weights.hf import to_hf_state_dict
from finesam.weights.hq import convert_hq_state_dict
from finesam.weights.loading import sam_from_state_dict

from conftest import TOLERANCE, max_diff, photo
from official import HQSamPredictor, SamPredictor

FINESAM = Path(sys.executable).with_name("finesam")
# the installed script, or the module where there is none
FINESAM_COMMAND = [str(FINESAM)] if FINESAM.exists() else [sys.executable, "-m", "finesam.cli"]


def finesam(
    *args: object, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The `finesam` command's `main(ARGS)` in this process, with `env` added, in `cwd`: the exit status, stdout
    and stderr a subprocess would give (an uncaught exception is status 1 with its traceback on stderr, warnings
    are printed), without the 5 s of an interpreter starting and importing torch. What the command sets for
    the whole process (PIL's pixel limit, the random generators, torch's threads) is put back afterwards.
    Tests of the process itself (killed, torchrun, its memory) use `finesam_process`."""
    out, err = io.StringIO(), io.StringIO()
    with _process_state(env, cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*map(str, args)])
            status = 0
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except Exception:  # what the interpreter does with an uncaught exception
            traceback.print_exc()
            status = 1
    return subprocess.CompletedProcess(["finesam", *map(str, args)], status, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _process_state(env: dict[str, str] | None, cwd: Path | None) -> Iterator[None]:
    saved_env, saved_cwd = dict(os.environ), Path.cwd()
    saved_pixels, saved_threads = Image.MAX_IMAGE_PIXELS, torch.get_num_threads()
    saved_rng = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    os.environ.update(env or {})
    if cwd is not None:
        os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()  # the filters of a fresh interpreter, not pytest's; printed on stderr
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            warnings.showwarning = _print_warning
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        Image.MAX_IMAGE_PIXELS = saved_pixels
        torch.set_num_threads(saved_threads)
        torch.random.set_rng_state(saved_rng[0])
        np.random.set_state(saved_rng[1])
        random.setstate(saved_rng[2])


def _print_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: object = None,
) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno))


def finesam_process(
    *args: object, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the `finesam` command (or `python -m finesam.cli` without the script) with `env` added, in `cwd`."""
    return subprocess.run(
        [*FINESAM_COMMAND, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def torch_free_command(*args: object) -> list[str]:
    """`finesam ARGS` in a fresh interpreter where `import torch` fails; it also fails (status 1) if torch got
    imported by the time the command returns."""
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now fails
from finesam.cli import main
main({[str(a) for a in args]!r})
loaded = [name for name in sys.modules if (name == "torch" or name.startswith("torch.")) and sys.modules[name]]
assert not loaded, loaded
"""
    return [sys.executable, "-c", script]


def without_torch(*args: object) -> subprocess.CompletedProcess[str]:
    """`torch_free_command(ARGS)` run to its end."""
    return subprocess.run(torch_free_command(*args), capture_output=True, text=True, timeout=300)


# datasets for `finesam everything DIR` and `finesam segment --manifest` (torch and --onnx)
DATASET_PHOTOS = {"astronaut.png": "astronaut_crop", "rocket.jpg": "rocket", "sub/chelsea.jpg": "chelsea"}


def make_dataset(folder: Path, names: dict[str, str] = DATASET_PHOTOS, broken: bool = True) -> Path:
    """Real photos at 400 x 267 (and 267 x 400), under sub-folders too; a truncated JPEG, a hidden image and a
    text file that a run must leave out or report."""
    for i, (name, source) in enumerate(names.items()):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image = photo(source).resize((400, 267), Image.Resampling.BILINEAR)
        (image.transpose(Image.Transpose.ROTATE_90) if i % 3 == 2 else image).save(path, quality=95)
    if broken:
        encoded = io.BytesIO()
        photo("rocket").save(encoded, format="JPEG")
        (folder / "broken.jpg").write_bytes(encoded.getvalue()[: encoded.tell() // 3])
    (folder / ".cache").mkdir(exist_ok=True)
    photo("rocket").save(folder / ".cache" / "hidden.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def manifest_lines(boxes_only: bool = False) -> list[dict]:
    """Boxes with categories; points lists of different lengths (grouped per length); boxes with points."""
    lines: list[dict] = [
        {"image": "astronaut.png", "boxes": [[40, 30, 200, 250], [150, 20, 380, 260], [0, 0, 399, 266]]},
    ]
    lines[0]["category_ids"] = [1, 3, 3]
    if boxes_only:
        return lines
    lines.append(
        {
            "image": "rocket.jpg",
            "points": [[[200, 130]], [[50, 60], [300, 200]], [[380, 20]], [[10, 250], [210, 140]]],
            "labels": [[1], [1, 0], [1], [0, 1]],
        }
    )
    lines.append({"image": "sub/chelsea.jpg", "boxes": [[20, 40, 200, 300], [100, 150, 260, 390]]})
    lines[-1]["points"] = [[[100, 100]], [[180, 200]]]
    return lines


def write_manifest(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def assert_resumed_run_is_whole(killed: Path, whole: Path) -> None:
    """A labelling run killed and resumed left what an uninterrupted run leaves: the same files, byte for byte,
    its PNGs included, and no temporary file."""
    for name in ("annotations.json", "errors.jsonl", "run.json"):
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name
    pngs = sorted(p.relative_to(whole) for p in (whole / "masks").rglob("*.png"))
    assert pngs == sorted(p.relative_to(killed) for p in (killed / "masks").rglob("*.png")) and pngs
    assert all((whole / p).read_bytes() == (killed / p).read_bytes() for p in pngs)
    assert not list(killed.rglob("*.tmp"))


def prompts_for(image: Image.Image) -> dict[str, dict[str, np.ndarray]]:
    """Every prompt kind, as the official `SamPredictor.predict` takes it, placed relative to the image size."""
    w, h = image.size
    points = np.array([[0.5 * w, 0.5 * h], [0.2 * w, 0.7 * h]])
    labels = np.array([1, 0])
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h])
    return {
        "point": {"point_coords": points[:1], "point_labels": labels[:1]},
        "points": {"point_coords": points, "point_labels": labels},
        "box": {"box": box},
        "points+box": {"point_coords": points, "point_labels": labels, "box": box},
    }


def ours(kwargs: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    """The official predictor's prompt arguments as `SegmentAnything.predict` takes them."""
    return {"points": kwargs.get("point_coords"), "labels": kwargs.get("point_labels"), "boxes": kwargs.get("box")}


def assert_same_prediction(official_out, prediction) -> None:
    logits, iou, low_res = official_out
    assert max_diff(prediction.masks[0], torch.from_numpy(logits)) <= TOLERANCE
    assert max_diff(prediction.iou_predictions[0], torch.from_numpy(iou)) <= TOLERANCE
    assert max_diff(prediction.low_res_logits[0], torch.from_numpy(low_res)) <= TOLERANCE


def assert_matches_official_predictor(
    official, model, image: Image.Image, multimasks=(True, False), predictor_class=SamPredictor, **options
) -> None:
    """Embedding, then every prompt kind of `prompts_for`, against the official predictor on the same weights.

    `official` is the official model, or a predictor of it with `image` already set (shared by tests);
    `options` go to the official `predict` only (e.g. `hq_token_only` for HQ-SAM's predictor).
    """
    if isinstance(official, (SamPredictor, HQSamPredictor)):
        predictor = official
    else:
        predictor = predictor_class(official)
        predictor.set_image(np.asarray(image))
    embedding = model.encode_image(image)
    assert max_diff(embedding.embedding, predictor.features) <= TOLERANCE
    for kwargs in prompts_for(image).values():
        for multimask in multimasks:
            expected = predictor.predict(**kwargs, multimask_output=multimask, return_logits=True, **options)
            prediction = model.predict(embedding, **ours(kwargs), multimask_output=multimask, return_logits=True)
            assert prediction.masks.shape[-2:] == (image.height, image.width)
            assert_same_prediction(expected, prediction)  # shapes included


def with_adapter(official, hq_mask_only: bool = False, fast: bool = False) -> tuple[SegmentAnything, HQSAMAdapter]:
    """Our base model and an HQ adapter (not injected) with the weights of an official HQ-SAM model; with
    `fast`, both with the fast paths (`finesam.fast`), as `load_sam` and `load_hq` give them."""
    model = sam_from_state_dict(official.state_dict())
    adapter = HQSAMAdapter(model, hq_mask_only=hq_mask_only)
    adapter.load_state_dict(convert_hq_state_dict(official.state_dict(), adapter))
    if fast:
        assert apply_fast_paths(model, *adapter.placed_adapters) > 0
    return model, adapter


def assert_matches_official_hq_predictor(official, model, adapter, image, hq_only: bool, multimasks=(True, False)):
    adapter.hq_mask_only = hq_only
    assert_matches_official_predictor(
        official, model, image, multimasks, predictor_class=HQSamPredictor, hq_token_only=hq_only
    )


def hf_config(config: SAMConfig, hq: bool, decoder_heads: int = 8) -> Any:
    """The transformers `SamConfig` (`SamHQConfig` with `hq`) of a finesam ViT configuration."""
    from transformers import SamConfig, SamHQConfig  # here: importing HF's SAM takes seconds

    encoder = config.encoder
    assert isinstance(encoder, ViTConfig)
    vision = {
        "hidden_size": encoder.dim,
        "num_hidden_layers": encoder.depth,
        "num_attention_heads": encoder.heads,
        "mlp_dim": int(encoder.dim * encoder.mlp_ratio),
        "window_size": encoder.window_size,
        "global_attn_indexes": list(encoder.global_attention_blocks),
        "image_size": config.image_size,
    }
    prompt = {"image_size": config.image_size, "image_embedding_size": config.embedding_size}
    decoder: dict[str, Any] = {"num_attention_heads": decoder_heads}
    if hq:
        decoder["vit_dim"] = encoder.dim
        return SamHQConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)


def hf_from_official(official: Any, config: SAMConfig, hq: bool = False) -> Any:
    """HF's `SamModel` (`SamHQModel` with `hq`) holding an official model's weights, through finesam's renames."""
    from transformers import SamHQModel, SamModel

    model = (SamHQModel if hq else SamModel)(hf_config(config, hq))
    model.load_state_dict(to_hf_state_dict(official.state_dict()), strict=True)
    return model.eval()


def write_config(path: Path, base: Path, train: Path, out: Path, extra: str = "", **optim: object) -> Path:
    """A training configuration: `base` weights, the `train` dataset, `out` as the run folder; `extra` adds
    sections (`[hq]`, `[lora]`, ...) and `optim` overrides the optimiser settings."""
    options = {"epochs": 2, "batch_size": 4, "lr": 1e-3, **optim}
    path.write_text(
        f"""
[model]
weights = "{base}"
{extra}
[data]
train = "{train}"
flip = false
scale_jitter = false
cache = true
[loss]
num_points = 256
[optim]
{chr(10).join(f"{k} = {v}" for k, v in options.items())}
[run]
out = "{out}"
checkpoint_every = 3
log_every = 1
"""
    )
    return path
