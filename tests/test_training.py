"""Fine-tuning: what trains, that it learns, exact resume after a kill, torchrun == one process, the cache.

Runs on the small model of conftest (random official weights) and the synthetic thin-structure dataset.
Tolerances: resume is bit-exact (`torch.equal`); a 2-process gloo run equals a 1-process run with the same
global batch within 1e-5 max abs on every adapter weight (gradients are averaged in another order).
"""

import csv
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finesam.adapters.hq import HQSAMAdapter
from finesam.data.pairs import load_pair
from finesam.data.sampling import sample_generator
from finesam.evaluation import adapter_configuration, evaluate
from finesam.evaluation.metrics import boundary_iou, mask_iou
from finesam.inputs import PIXEL_MEAN, PIXEL_STD
from finesam.model.processing import preprocess_image
from finesam.training.config import load_config, parse_config
from finesam.training.data import TrainingSet, to_input_frame
from finesam.training.trainer import Trainer
from finesam.weights import load_sam, save_hq, save_sam
from finesam.weights.io import read_safetensors

from conftest import SMALL
from helpers import finesam, write_config
from hq_training import base_and_hq_scores, hq_trainer, run_hq_training, synthetic_split

SIZE = 96  # synthetic images: small and quick to draw


@pytest.fixture(scope="module")
def base(tmp_path_factory, small) -> Path:
    return save_sam(small, tmp_path_factory.mktemp("base") / "base.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return synthetic_split(tmp_path_factory.mktemp("synthetic"), SIZE)


def test_config_errors(tmp_path, base, data):
    config = write_config(tmp_path / "ok.toml", base, data[0], tmp_path / "run", "[hq]")
    assert load_config(config).optim.batch_size == 4
    bad = {
        "nothing to train": {"model": {"weights": "w"}, "data": {"train": "d"}},
        "unknown keys \\['learning_rate'\\]": {
            "model": {"weights": "w"},
            "data": {"train": "d"},
            "hq": {},
            "optim": {"learning_rate": 1},
        },
        "cache = true needs": {"model": {"weights": "w"}, "data": {"train": "d", "cache": True}, "hq": {}},
        "unknown sections": {"model": {"weights": "w"}, "data": {"train": "d"}, "hq": {}, "extra": {}},
        "kinds: unknown": {"model": {"weights": "w"}, "data": {"train": "d"}, "hq": {}, "prompts": {"kinds": ["x"]}},
    }
    for message, content in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_config(content)


def test_samples_are_deterministic_and_match_inference_preprocessing(base, data, tmp_path):
    config = load_config(write_config(tmp_path / "c.toml", base, data[0], tmp_path / "run", "[hq]"))
    pairs = sorted((p, data[0] / "gt" / p.name) for p in (data[0] / "im").iterdir())
    dataset = TrainingSet(pairs, config.data, config.prompts, SMALL.image_size, SMALL.mask_input_size, seed=0)
    a, b = dataset.sample(3, epoch=1), dataset.sample(3, epoch=1)
    assert torch.equal(a.pixels, b.pixels) and torch.equal(a.target, b.target)
    kinds = {next(k for k in ("boxes", "points", "mask_input") if getattr(a.prompt, k) is not None)}
    for index in range(len(pairs)):
        sample = dataset.sample(index, epoch=0)
        kinds.add(next(k for k in ("boxes", "points", "mask_input") if getattr(sample.prompt, k) is not None))
        image, mask = load_pair(*pairs[index])
        expected, (height, width) = preprocess_image(image, SMALL.image_size)
        assert torch.equal(sample.pixels, expected[0])  # no augmentation: exactly what the predictor feeds
        prompt = sample.prompt
        if prompt.points is not None:  # foreground points, inside the object (the mask resized like the image)
            resized = torch.nn.functional.interpolate(mask[None, None], (height, width), mode="bilinear")[0, 0]
            for x, y in prompt.points[0].long().tolist():
                assert resized[y, x] > 0.5
        if prompt.boxes is not None:
            assert (prompt.boxes >= 0).all() and (prompt.boxes <= SMALL.image_size).all()
            assert (prompt.boxes[0, 2:] >= prompt.boxes[0, :2]).all()
    assert kinds == {"boxes", "points", "mask_input"}


def test_only_adapter_weights_train_and_the_base_is_untouched(base, data, tmp_path):
    extra = "[hq]\n[lora]\nrank = 4\ntargets = ['decoder', 'encoder_attention']"
    config = load_config(write_config(tmp_path / "c.toml", base, data[0], tmp_path / "run", extra, epochs=1))
    trainer = Trainer(config, progress=False)
    assert trainer.encoder_trains and trainer.cache is None  # LoRA in the encoder: no cached embeddings
    base_state = {k: v.clone() for k, v in load_sam(base).state_dict().items()}
    hq, lora = trainer.adapters["hq"], trainer.adapters["lora"]
    before = {k: v.clone() for k, v in [*hq.state_dict().items(), *lora.state_dict().items()]}
    trainable = {id(p) for p in trainer.optimizer.param_groups[0]["params"]}
    assert trainable == {id(p) for p in [*hq.parameters(), *lora.parameters()]}
    trainer.run()
    assert all(p.grad is None for p in trainer.model.parameters() if id(p) not in trainable)
    after = {k: v for k, v in [*hq.state_dict().items(), *lora.state_dict().items()]}
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every adapter weight trained
    for adapter in (lora, hq):
        adapter.eject()
    state = trainer.model.state_dict()  # the base after training: bit-identical
    assert list(state) == list(base_state) and all(torch.equal(state[k], base_state[k]) for k in state)


def test_training_hq_lowers_the_loss_and_beats_the_base(base, data, tmp_path):
    trainer = hq_trainer(base, data[0], tmp_path, epochs=12)
    written = run_hq_training(trainer, base, steps=48, window=8, frozen_base=False)

    before, after = base_and_hq_scores(base, written["hq"], data[1])
    assert after[0] > before[0] + 0.1 and after[1] > before[1] + 0.1, (before, after)
    for name in ("metrics.csv", "metrics.json", "loss.png", "checkpoint.pt"):
        assert (tmp_path / "run" / name).is_file()
    assert Image.open(tmp_path / "run" / "loss.png").size == (640, 360)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(out / "hq.safetensors")[0]


def test_resume_after_kill_gives_the_same_weights(base, data, tmp_path):
    uninterrupted = write_config(tmp_path / "a.toml", base, data[0], tmp_path / "a", "[hq]", epochs=2, batch_size=2)
    result = finesam("train", "--config", uninterrupted, "--quiet")
    assert result.returncode == 0, result.stderr

    killed = write_config(tmp_path / "b.toml", base, data[0], tmp_path / "b", "[hq]", epochs=2, batch_size=2)
    command = [str(Path(sys.executable).with_name("finesam")), "train", "--config", str(killed), "--quiet"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "b" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    step = torch.load(checkpoint, weights_only=True)["step"]
    assert 0 < step < 16
    assert not (tmp_path / "b" / "hq.safetensors").exists()

    again = finesam("train", "--config", killed, "--quiet")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    resumed = finesam("train", "--config", killed, "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = load_metrics(tmp_path / "a")
    rows_b = load_metrics(tmp_path / "b")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == list(range(1, 17))


def load_metrics(out: Path) -> list[dict[str, float]]:
    return json.loads((out / "metrics.json").read_text())


def test_torchrun_two_processes_equal_one(base, data, tmp_path):
    one = write_config(tmp_path / "one.toml", base, data[0], tmp_path / "one", "[hq]", epochs=1, batch_size=4)
    two = write_config(tmp_path / "two.toml", base, data[0], tmp_path / "two", "[hq]", epochs=1, batch_size=4)
    result = finesam("train", "--config", one, "--quiet")
    assert result.returncode == 0, result.stderr
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "finesam.cli", "train", "--config", str(two), "--quiet"]
    distributed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    # head and tail: the first failing rank's traceback comes before torchrun's summary
    assert distributed.returncode == 0, distributed.stderr[:3000] + "\n...\n" + distributed.stderr[-3000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - HQSAMAdapter(load_sam(base)).state_dict()[k]).abs().max().item() for k in a) > 1e-3


def test_embedding_cache_hits_and_invalidates(base, data, tmp_path):
    config = load_config(write_config(tmp_path / "c.toml", base, data[0], tmp_path / "run", "[hq]", epochs=1))
    trainer = Trainer(config, progress=False)
    trainer.run()
    assert trainer.cache is not None and (trainer.cache.misses, trainer.cache.hits) == (16, 0)
    samples = [trainer.data.sample(i, 1) for i in range(4)]
    cached, features = trainer._encode(samples)
    assert trainer.cache.hits == 4 and "early_embedding" in features[0]
    fresh = trainer.model.encode(torch.stack([s.pixels for s in samples]))
    assert torch.equal(cached, fresh)
    # a changed image is a miss, not a stale embedding
    image = data[0] / "im" / "000000.png"
    saved = image.read_bytes()
    try:
        Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
        assert trainer.cache.get(image) is None
    finally:
        image.write_bytes(saved)
    # other encoder weights: another key
    other = dataclasses.replace(config, run=dataclasses.replace(config.run, out=tmp_path / "other"))
    changed = Trainer(other, progress=False)
    with torch.no_grad():
        next(changed.model.image_encoder.parameters()).add_(1.0)
    assert changed._cache().encoder_key != trainer.cache.encoder_key


def test_eval_matches_metrics_by_hand_and_writes_a_table(base, data, tmp_path, small):
    model = load_sam(base)
    (result,) = evaluate(model, [adapter_configuration("base", [])], data[1], limit=3)
    ious, bious = [], []
    for index in range(3):
        image, mask = load_pair(data[1] / "im" / f"{index:06d}.png", data[1] / "gt" / f"{index:06d}.png")
        ys, xs = torch.nonzero(mask, as_tuple=True)
        box = [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()]
        predicted = model.predict(image, boxes=box).masks[0, 0]
        ious.append(mask_iou(predicted, mask > 0.5).item())
        bious.append(boundary_iou(predicted, mask > 0.5).item())
    assert result.count == 3
    assert result.miou == pytest.approx(np.mean(ious), abs=1e-6)
    assert result.mbiou == pytest.approx(np.mean(bious), abs=1e-6)
    names = [f"im/{index:06d}.png" for index in range(3)]
    assert [name for name, _, _ in result.per_sample] == names
    assert [iou for _, iou, _ in result.per_sample] == pytest.approx(ious, abs=1e-6)
    assert [biou for _, _, biou in result.per_sample] == pytest.approx(bious, abs=1e-6)

    hq_file = tmp_path / "hq.safetensors"
    save_hq(HQSAMAdapter(model), hq_file)
    out = finesam("eval", data[1], "--weights", base, "--hq", hq_file, "--limit", "3", "--out", tmp_path / "e")
    assert out.returncode == 0, out.stderr
    table = (tmp_path / "e" / "eval.md").read_text()
    assert "| base |" in table and "| hq |" in table
    assert f"{np.mean(ious):.4f}" in table.splitlines()[2]
    rows = list(csv.reader((tmp_path / "e" / "per_image.csv").read_text().splitlines()))
    assert rows[0] == ["image", "base IoU", "base BIoU", "hq IoU", "hq BIoU"]
    assert [row[0] for row in rows[1:]] == names
    assert [float(row[1]) for row in rows[1:]] == pytest.approx(ious, abs=1e-5)
    assert [float(row[2]) for row in rows[1:]] == pytest.approx(bious, abs=1e-5)
    bad = finesam("eval", data[1], "--weights", base, "--configs", "base,lora", "--out", tmp_path / "f")
    assert bad.returncode == 2 and "unknown part" in bad.stderr


def test_augmentation_keeps_image_and_mask_aligned(data):
    """Flips and large-scale jitter move image and mask together: the synthetic objects are painted bright
    (max channel >= 136) on a darker background (<= 119), so the jittered mask must still cover bright pixels."""
    config = dataclasses.replace(
        parse_config({"model": {"weights": "w"}, "data": {"train": "d"}, "hq": {}}).data, scale_jitter=(0.5, 2.0)
    )
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    flipped = set()
    for index in range(8):
        image, mask = load_pair(data[0] / "im" / f"{index:06d}.png", data[0] / "gt" / f"{index:06d}.png")
        g = sample_generator(0, 0, index)
        pixels, frame_mask = to_input_frame(image, mask, SMALL.image_size, config, g)
        brightness = (pixels * std + mean).max(dim=0).values
        inside, outside = brightness[frame_mask > 0.9], brightness[frame_mask < 0.1]
        if inside.numel() == 0:  # the object was cropped away
            continue
        assert inside.mean() - outside.mean() > 30, index
        flipped.add(bool(torch.rand((), generator=sample_generator(0, 0, index)) < 0.5))  # the first draw
    assert flipped == {True, False}  # both cases were checked


def test_new_adapter_weights_come_from_the_seed_and_the_global_rng_is_left_alone(base, data, tmp_path):
    extra = "[hq]\n[lora]\nrank = 4\ntargets = ['decoder']"
    config = load_config(write_config(tmp_path / "c.toml", base, data[0], tmp_path / "run", extra, epochs=1))
    weights = []
    for caller_seed in (1, 2):  # whatever the caller drew before, the same adapters
        torch.manual_seed(caller_seed)
        state = torch.get_rng_state()
        trainer = Trainer(config, progress=False)
        assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream goes on unchanged
        weights.append({f"{n}.{k}": v for n, a in trainer.adapters.items() for k, v in a.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
