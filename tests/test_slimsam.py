"""SlimSAM (`-uniform` releases): the pruned ViT-B through the family registry, equal to the official
`segment_anything` model built with SlimSAM's widths and to HF transformers' `SamModel` on the same random
weights; the original whole-model pickles are refused with the files to use instead."""

import dataclasses
import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from finesam.amg import AutomaticMaskGenerator
from finesam.model import PRESETS, SegmentAnything
from finesam.model.config import describe
from finesam.model.families.slimsam import SAM_SLIMSAM_50, SAM_SLIMSAM_77, SlimSAMConfig
from finesam.model.prompts import Prompts
from finesam.weights import CheckpointError, convert_checkpoint, load_sam
from finesam.weights.download import CHECKPOINTS, download
from finesam.weights.loading import sam_from_state_dict
from finesam.weights.sam_keys import infer_config

from conftest import PHOTOS, TOLERANCE, max_diff
from helpers import assert_matches_official_predictor
from official import SamPredictor, build_official, segment_anything

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


# HF transformers in a process of its own: importing it changes process-wide state that other tests rely on
# (huggingface_hub's endpoint, read once on import), and it must come before the official packages' stand-ins.
# It loads the official weights under HF's names (finesam.weights.hf's renames) into a `SamModel` with SlimSAM-77's
# `SamVisionConfig` at the test's input size, and saves its image embedding, masks and IoUs for a box.
HF_SCRIPT = """
import sys
import torch
import transformers  # before finesam: nothing stands in for torchvision here
from finesam.weights.hf import to_hf_state_dict
from transformers import SamConfig, SamModel

state_dict, pixels, box, out = torch.load(sys.argv[1]), torch.load(sys.argv[2]), torch.load(sys.argv[3]), sys.argv[4]
vision = dict(hidden_size=168, mlp_dim=696, num_hidden_layers=12, num_attention_heads=12, window_size=14,
              global_attn_indexes=[2, 5, 8, 11], image_size=256)
config = SamConfig(vision_config=vision, prompt_encoder_config=dict(image_size=256, image_embedding_size=16))
model = SamModel._from_config(config, attn_implementation="sdpa").eval()
missing, unexpected = model.load_state_dict(to_hf_state_dict(state_dict), strict=False)
assert not missing and not unexpected, (missing, unexpected)
with torch.no_grad():
    embedding = model.get_image_embeddings(pixels)
    output = model(image_embeddings=embedding, input_boxes=box[None], multimask_output=True)
torch.save((embedding, output.pred_masks[:, 0], output.iou_scores[:, 0]), out)
"""


# SlimSAM-77's encoder widths and blocks at a 256 input (16 x 16 tokens: padded 14 x 14 windows), so that the
# official attention stays fast; the widths are what SlimSAM changes, the input size is the ViT's own business
SLIM_77_256 = dataclasses.replace(SAM_SLIMSAM_77, image_size=256)


@pytest.fixture(scope="module")
def official_77():
    return build_official(SLIM_77_256, seed=3)


@pytest.fixture(scope="module")
def model_77(official_77) -> SegmentAnything:
    return sam_from_state_dict(official_77.state_dict())


def test_presets_are_slimsams_widths():
    # SlimSAM's `build_sam_vit_p50` / `_p77`: ViT-B's depth, heads, windows and global blocks, pruned widths
    for preset, dim, mlp_dim in ((SAM_SLIMSAM_50, 384, 1536), (SAM_SLIMSAM_77, 168, 696)):
        assert PRESETS[preset.name] == preset
        encoder = preset.encoder
        assert (encoder.dim, encoder.mlp_dim, encoder.depth, encoder.heads) == (dim, mlp_dim, 12, 12)
        assert (encoder.global_attention_blocks, encoder.window_size, encoder.patch_size) == ((2, 5, 8, 11), 14, 16)
        assert preset.image_size == 1024 and preset.decoder == PRESETS["vit_b"].decoder
    with pytest.raises(ValueError, match="mlp_dim must be an integer"):
        SlimSAMConfig(mlp_dim=4.142857)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not divisible by heads"):
        SlimSAMConfig(dim=170)


def test_the_mlp_width_is_exact(model_77, official_77):
    linears = [m for m in model_77.image_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert {m.out_features for m in linears if m.in_features == 168} == {3 * 168, 168, 696}
    assert official_77.image_encoder.blocks[0].mlp.lin1.out_features == 696


@pytest.mark.parametrize("preset", [SAM_SLIMSAM_50, SAM_SLIMSAM_77], ids=lambda p: p.name)
def test_the_release_is_read_off_its_checkpoint(official_77, preset):
    """The official encoder of each release (built on meta: shapes only) with SAM's decoder keys. SlimSAM-50 keeps
    ViT's 4x MLP (384 / 1536) and is still recognised as the release it is."""
    encoder = preset.encoder
    with torch.device("meta"):
        official_encoder = segment_anything.modeling.ImageEncoderViT(
            embed_dim=encoder.dim,
            mlp_ratio=encoder.mlp_dim / encoder.dim,
            num_heads=12,
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=(2, 5, 8, 11),
        )
    assert official_encoder.blocks[0].mlp.lin1.out_features == encoder.mlp_dim
    state_dict = {k: v for k, v in official_77.state_dict().items() if not k.startswith("image_encoder.")}
    state_dict |= {f"image_encoder.{k}": v for k, v in official_encoder.state_dict().items()}
    config = infer_config(state_dict)
    assert config == preset and type(config.encoder) is SlimSAMConfig
    assert describe(config) == f"SAM {preset.name} (SlimSAM ViT {encoder.dim}x12, MLP {encoder.mlp_dim}, input 1024)"


@torch.no_grad()
def test_slimsam_77_matches_the_official_model(official_77, model_77):
    """The image embedding and the predictions of every prompt kind, at the tolerance of every parity test."""
    assert model_77.config == SLIM_77_256
    assert_matches_official_predictor(
        official_77,
        model_77,
        PHOTOS["small landscape"](),
        multimasks=(True,),
        predictor_class=SamPredictor,
    )


@torch.no_grad()
def test_the_automatic_mask_generator_runs_on_slimsam(official_77, model_77):
    """Every mask of a 4 x 4 grid kept (no filter), with the official generator's scores."""
    settings = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "box_nms_thresh": 1.0}
    image = np.asarray(PHOTOS["small landscape"]())
    expected = segment_anything.SamAutomaticMaskGenerator(official_77, **settings).generate(image)
    actual = AutomaticMaskGenerator(model_77, **settings).generate(image)
    assert len(actual) == len(expected) > 0
    scores = sorted(r["predicted_iou"] for r in actual), sorted(r["predicted_iou"] for r in expected)
    assert max(abs(a - b) for a, b in zip(*scores, strict=True)) <= TOLERANCE


@torch.no_grad()
def test_slimsam_77_matches_hf_transformers(official_77, model_77, tmp_path):
    """HF's `SamModel` with SlimSAM-77's `SamVisionConfig` and the same weights: same image embedding, same
    masks and IoUs for a box."""
    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    box = torch.tensor([[20.0, 30.0, 180.0, 220.0]])
    files = [tmp_path / name for name in ("weights.pt", "pixels.pt", "box.pt", "hf.pt")]
    for value, path in zip((official_77.state_dict(), pixels, box), files, strict=False):
        torch.save(value, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", HF_SCRIPT, *map(str, files)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    embedding, masks, iou = torch.load(files[3])
    assert max_diff(model_77.encode(pixels), embedding) <= TOLERANCE
    ours = model_77.decode(embedding, Prompts(boxes=box), multimask_output=True)
    assert max_diff(ours[0], masks) <= TOLERANCE and max_diff(ours[1], iou) <= TOLERANCE


def test_the_file_round_trip(tmp_path, official_77, model_77):
    checkpoint = tmp_path / "SlimSAM-77-uniform.pth"
    torch.save(official_77.state_dict(), checkpoint)
    report = convert_checkpoint(checkpoint, tmp_path / "out")
    loaded = load_sam(report.written[0])
    assert loaded.config == SLIM_77_256 and type(loaded.config.encoder) is SlimSAMConfig
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model_77.state_dict().items())


def test_the_catalogue_downloads_the_uniform_files_by_name(tmp_path, official_77, monkeypatch):
    """No size or SHA-256 is published: the file is checked whole and taken; its name is the release's even though
    the URL (a Google Drive link) does not end with it, so a mirror serves it under that name."""
    for name, file, preset in (
        ("slimsam_50_uniform", "SlimSAM-50-uniform.pth", "vit_p50"),
        ("slimsam_77_uniform", "SlimSAM-77-uniform.pth", "vit_p77"),
    ):
        checkpoint = CHECKPOINTS[name]
        assert (checkpoint.filename, checkpoint.preset, checkpoint.size, checkpoint.sha256) == (
            file,
            preset,
            None,
            None,
        )
    served = tmp_path / "served"
    served.mkdir()
    torch.save(official_77.state_dict(), served / "SlimSAM-77-uniform.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *_: None  # type: ignore[attr-defined]
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        monkeypatch.setenv("FINESAM_MIRROR", f"http://127.0.0.1:{server.server_address[1]}/")
        try:
            path = download(CHECKPOINTS["slimsam_77_uniform"], tmp_path / "cache")
        finally:
            server.shutdown()
    assert path == tmp_path / "cache" / "SlimSAM-77-uniform.pth"
    assert load_sam(path).config == SLIM_77_256


@pytest.mark.parametrize("name", ["SlimSAM-77.pth", "SlimSAM-50.pth"])
def test_the_original_whole_model_pickles_are_refused_naming_the_uniform_files(tmp_path, name):
    # the original releases pickle a whole model of SlimSAM's `segment_anything` fork: any class of that package
    # stands for one here (its MLP block), the first object the unpickler meets
    checkpoint = tmp_path / name
    torch.save(segment_anything.modeling.common.MLPBlock(8, 16), checkpoint)
    for read in (load_sam, lambda path: convert_checkpoint(path, tmp_path / "out")):
        with pytest.raises(CheckpointError) as error:
            read(checkpoint)
        message = str(error.value)
        assert "SlimSAM-50-uniform.pth" in message and "SlimSAM-77-uniform.pth" in message
        assert "segment_anything.modeling.common.MLPBlock" in message and name in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
