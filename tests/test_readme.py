"""Every command line of the README's "Command line" block, run as written (optional parts with and without)
in a folder laid out as the README assumes, on random weights: the front door keeps working."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import SMALL, photo
from helpers import finesam, hf_from_official, write_config
from official import build_official
from official_sam2 import build_official_sam2
from video_clips import moving_crops, write_video

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[list[str]]:
    """The block's commands, continuation lines joined and comments dropped; a line with `[optional]` parts
    gives two commands: without them, and with each (its first alternative where it says `a|b`)."""
    block = README.read_text().split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        bare = re.sub(r"\s*\[[^\]]*\]", "", line)
        commands.append(shlex.split(bare))
        if "[" in line:
            full = re.sub(r"\[([^\]]*)\]", lambda m: re.sub(r"(\S+)\|\S+", r"\1", m.group(1)), line)
            commands.append(shlex.split(full))
    return commands


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, official_small) -> Path:
    """The files the README's lines name: official checkpoints (random weights of a small SAM and HQ-SAM) and
    the SAM as Hugging Face writes it, a photo, a prompts file, and a small training configuration at
    `configs/hq_sam.toml`."""
    root = tmp_path_factory.mktemp("readme")
    torch.save(official_small.state_dict(), root / "sam_vit_b_01ec64.pth")
    hf_from_official(official_small, SMALL).save_pretrained(root / "sam-vit-base")
    torch.save(build_official(SMALL, seed=0, hq=True).state_dict(), root / "sam_hq_vit_b.pth")
    torch.save({"model": build_official_sam2("sam2.1_hiera_tiny").state_dict()}, root / "sam2.1_hiera_tiny.pt")
    photo("rocket").resize((1800, 1200)).save(root / "truck.jpg")  # the size of the README's truck.jpg
    (root / "photos").mkdir()
    photo("rocket").resize((600, 400)).save(root / "photos" / "rocket.jpg")
    photo("chelsea").resize((400, 267)).save(root / "photos" / "chelsea.png")
    boxes = {"image": "photos/rocket.jpg", "boxes": [[10, 20, 300, 200], [0, 0, 600, 400]]}
    (root / "boxes.jsonl").write_text(json.dumps(boxes) + "\n")
    (root / "prompts.json").write_text('[{"box": [75, 275, 500, 400]}, {"points": [[300, 200]], "multimask": true}]')
    write_video(root / "clip.mp4", moving_crops(3, 160, 112))
    (root / "track.jsonl").write_text(json.dumps({"frame": 0, "object": 1, "box": [20, 10, 90, 80]}) + "\n")
    (root / "configs").mkdir()
    write_config(
        root / "configs" / "hq_sam.toml",
        base=Path("../weights/sam_vit_b_01ec64.safetensors"),
        train=Path("../data/train"),
        out=Path("../runs/hq"),
        extra="[hq]\n",
        epochs=1,
    )
    return root


def test_the_readme_has_the_commands_this_test_knows():
    names = [command[1] for command in readme_commands()]
    assert {
        "models",
        "download",
        "convert",
        "segment",
        "everything",
        "export",
        "demo",
        "synth",
        "train",
        "eval",
        "track",
    } <= set(names)


def test_every_readme_command_line_runs(workspace):
    values = {
        "W": "weights/sam_vit_b_01ec64.safetensors",
        "HQ": "weights/sam_hq_vit_b.hq.safetensors",
        "truck.jpg": str(workspace / "truck.jpg"),
    }
    env = {
        "FINESAM_CHECKPOINT": str(workspace / "sam_hq_vit_b.pth"),
        "FINESAM_HOME": str(workspace / "cache"),
        "FINESAM_MIRROR": "http://127.0.0.1:9/",
    }
    ran = []
    for command in readme_commands():
        assert command[0] == "finesam"
        args = [values.get(a, a) for a in command[1:]]
        if args[0] == "eval":  # a validation set beside the training set
            assert finesam("synth", workspace / "data/val", "--count", "2", env=env, cwd=workspace).returncode == 0
        if args[0] == "synth":
            args += ["--count", "4"]  # the README's 64 would only take longer
        if args[0] == "everything":
            args += ["--points-per-side", "4"]  # 32 x 32 points (x 5 crops) take minutes on 2 cores
            if args[1] == "photos/":  # the same labels/ with other outputs: refused unless started again
                args += ["--overwrite"]
        result = finesam(*args, env=env, cwd=workspace)
        if args[0] == "download":  # nothing listens on the mirror: a clear error, nothing left behind
            assert result.returncode == 2 and "cannot connect" in result.stderr, result.stderr
            continue
        assert result.returncode == 0, f"finesam {' '.join(args)}\n{result.stderr[-2000:]}"
        ran.append(args[0])
    assert (workspace / "truck_mask.png").is_file() and (workspace / "hq_mask.png").is_file()
    assert (workspace / "sam2_mask.png").is_file() and (workspace / "sam2_masks" / "masks.json").is_file()
    assert (workspace / "sam2_onnx" / "model.json").is_file()
    assert (workspace / "truck_masks" / "masks.json").is_file() and (workspace / "out" / "demo_overlay.png").is_file()
    assert (workspace / "runs" / "hq" / "hq.safetensors").is_file() and (workspace / "eval" / "eval.md").is_file()
    assert (workspace / "onnx" / "model.json").is_file()
    assert len(list((workspace / "clip_masks").glob("*.png"))) == 3 and (workspace / "clip_overlay.mp4").is_file()
    for labels in ("labels/annotations.json", "labels/run.json", "box_labels/annotations.json"):
        assert (workspace / labels).is_file(), labels
    assert set(ran) == {
        "models", "convert", "segment", "everything", "export", "demo", "synth", "train", "eval", "track"
    }  # fmt: skip
