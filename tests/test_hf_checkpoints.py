"""Hugging Face checkpoints: what transformers' `SamModel` / `SamHQModel` write with `save_pretrained`, read by
finesam (`load_sam`, `load_hq`, `finesam convert`, `finesam segment`) and proven by round trips against HF's own
outputs; for SAM-HQ, the three implementations on the same weights and where HF's differs from the official one.

Tolerance: max abs difference <= TOLERANCE (1e-4) in fp32, as for the official parity tests.
"""

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import SamHQConfig, SamHQModel, SamModel

from finesam.adapters.hq import HQSAMAdapter
from finesam.model import SegmentAnything
from finesam.model.config import ViTConfig
from finesam.model.families.slimsam import SlimSAMConfig
from finesam.model.prompts import Prompts
from finesam.weights import CheckpointError, convert_checkpoint, holds_hq, load_hq, load_sam
from finesam.weights.hf import (
    HF_SHARED_POSITIONAL,
    from_hf_key,
    is_hf_checkpoint,
    read_hf_checkpoint,
    to_hf_key,
    to_hf_state_dict,
)
from finesam.weights.hq import convert_hq_state_dict, is_hq_key
from finesam.weights.sam_keys import convert_state_dict, infer_config

from conftest import SMALL, TOLERANCE, max_diff, photo
from helpers import finesam, hf_config, hf_from_official
from official import HQSamPredictor, build_official

GRID = SMALL.embedding_size
HEADS = 4  # not the default 8: the decoder's head count must come from config.json


@contextlib.contextmanager
def official_epsilon(hf: Any) -> Iterator[None]:
    """HF's model with the official epsilon (torch's default 1e-5, as finesam) in the LayerNorms of the decoder's
    two-way blocks, where HF uses `mask_decoder_config.layer_norm_eps` (1e-6): the one difference of HF's SamModel
    from the official SAM (about 1e-4 on logits of random weights)."""
    norms = [getattr(block, f"layer_norm{i}") for block in hf.mask_decoder.transformer.layers for i in range(1, 5)]
    assert all(norm.eps == 1e-6 for norm in norms)
    for norm in norms:
        norm.eps = 1e-5
    try:
        yield
    finally:
        for norm in norms:
            norm.eps = 1e-6


def pixels(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(seed))


def scaled(tensor: torch.Tensor) -> float:
    """TOLERANCE relative to the largest absolute value of `tensor` (and never below TOLERANCE)."""
    return TOLERANCE * max(1.0, tensor.abs().max().item())


BOX = torch.tensor([[30.0, 40.0, 200.0, 220.0]])
POINTS, LABELS = torch.tensor([[[120.0, 100.0], [60.0, 190.0], [200.0, 30.0]]]), torch.tensor([[1, 0, 1]])
PROMPTS = {"box": Prompts(boxes=BOX), "points": Prompts(points=POINTS, labels=LABELS)}


def hf_decode(hf: Any, embedding: torch.Tensor, kind: str, multimask: bool, **options: Any) -> tuple[Any, Any]:
    """HF's low-resolution mask logits (1, masks, 64, 64) and IoU (1, masks) for one prompt of `PROMPTS`."""
    prompt = (
        {"input_boxes": BOX[None]} if kind == "box" else {"input_points": POINTS[None], "input_labels": LABELS[None]}
    )
    out = hf(image_embeddings=embedding, **prompt, multimask_output=multimask, **options)
    return out.pred_masks[0], out.iou_scores[0]


@pytest.fixture(scope="module")
def hf_sam_folder(tmp_path_factory) -> Path:
    """A random `SamModel`, saved with `save_pretrained`: every tensor gets noise (so that a misplaced one shows),
    matrices of the order of 1 / sqrt(fan-in) (HF's initialisation alone leaves the decoder's attention nearly
    uniform, where a wrong head count would hardly show)."""
    torch.manual_seed(3)
    model = SamModel(hf_config(SMALL, hq=False, decoder_heads=HEADS))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            noise = torch.randn(tensor.shape, generator=generator)
            tensor.add_(0.1 * noise if tensor.dim() <= 1 else noise / tensor[0].numel() ** 0.5)
    folder = tmp_path_factory.mktemp("hf") / "sam-small"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_sam(hf_sam_folder) -> Any:
    """HF's own model read back from the folder: what the checkpoint means to transformers."""
    return SamModel.from_pretrained(hf_sam_folder).eval()


def test_renames_give_hf_layout_and_back():
    """The rule table turns every official key into the key HF's own models have (no more, no fewer, same
    shapes), and back."""
    for hq in (False, True):
        official = build_official(SMALL, hq=hq).state_dict()
        hf = (SamHQModel if hq else SamModel)(hf_config(SMALL, hq)).state_dict()
        renamed = to_hf_state_dict(official)
        assert renamed.keys() == hf.keys()
        assert all(renamed[k].shape == hf[k].shape for k in hf)
        assert all(from_hf_key(to_hf_key(k) or "") == k for k in official)
    assert from_hf_key("vision_encoder.layers.3.layer_norm2.bias") == "image_encoder.blocks.3.norm2.bias"
    assert (
        from_hf_key("mask_decoder.iou_prediction_head.layers.0.weight")
        == "mask_decoder.iou_prediction_head.layers.1.weight"
    )
    assert from_hf_key("vision_decoder.foo") is None


# the vision configurations of the Hub's copies, as HF's conversion scripts set them
HUB_VISION = {
    "sam-vit-base": {},
    "sam-vit-large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
    },
    "sam-vit-huge": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
    },
    "SlimSAM-uniform-50": {
        "hidden_size": 384,
        "mlp_dim": 1536,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "SlimSAM-uniform-77": {
        "hidden_size": 168,
        "mlp_dim": 696,
        "num_attention_heads": 12,
        "global_attn_indexes": [2, 5, 8, 11],
    },
}


@pytest.mark.parametrize("name", list(HUB_VISION))
def test_hub_layouts_map_onto_finesam(name):
    """Every tensor of the full-size Hub checkpoints (SAM-HQ: the same plus its HQ part) finds its place, by
    shape, in the finesam model whose configuration the renamed tensors give (on `meta`: nothing is computed)."""
    vision = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
    vision |= HUB_VISION[name]  # the MLP width, where not given, is HF's default: 4 x hidden_size
    with torch.device("meta"):
        hf = SamHQModel(SamHQConfig(vision_config=vision, mask_decoder_config={"vit_dim": vision["hidden_size"]}))
    mlp_dim = hf.config.vision_config.mlp_dim
    tensors = hf.state_dict()
    names = {k: from_hf_key(k) for k in tensors if k != HF_SHARED_POSITIONAL}
    assert [k for k, name in names.items() if name is None] == []
    official = {name: tensors[k] for k, name in names.items() if name is not None}
    model = SegmentAnything(infer_config(official), device="meta")
    encoder = model.config.encoder
    assert isinstance(encoder, ViTConfig | SlimSAMConfig)
    assert encoder.family == ("slimsam" if name.startswith("SlimSAM") else "vit")
    assert (encoder.dim, encoder.depth, encoder.heads, encoder.mlp_dim) == (
        *(vision[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")),
        mlp_dim,
    )
    assert convert_state_dict(official, model, ignore=is_hq_key).keys() == model.state_dict().keys()
    adapter = HQSAMAdapter(model)
    assert convert_hq_state_dict(official, adapter).keys() == adapter.state_dict().keys()


@torch.no_grad()
@pytest.mark.parametrize("what", ["folder", "model.safetensors", "sharded"])
def test_sam_model_round_trip(hf_sam_folder, hf_sam, tmp_path, what):
    """finesam reading HF's files computes what HF computes: the image embedding, then low-resolution mask logits
    and IoU for a box and for points, single- and multimask (HF with the official LayerNorm epsilon; with its own,
    the logits move by a little more than the tolerance)."""
    if what == "sharded":
        path = tmp_path / "sam-small"
        hf_sam.save_pretrained(path, max_shard_size="300KB")
        assert len(list(path.glob("model-*.safetensors"))) > 3 and not (path / "model.safetensors").exists()
    else:
        path = hf_sam_folder if what == "folder" else hf_sam_folder / "model.safetensors"
    assert is_hf_checkpoint(path) and not holds_hq(path)
    model = load_sam(path)
    assert model.config.decoder.heads == HEADS
    assert model.config.image_size == SMALL.image_size and model.config.encoder == SMALL.encoder
    x = pixels(0)
    embedding = hf_sam.get_image_embeddings(x)
    assert embedding.std() > 0.1
    assert max_diff(model.encode(x), embedding) <= TOLERANCE
    for kind, prompt in PROMPTS.items():
        for multimask in (False, True):
            masks, iou = model.decode(embedding, prompt, multimask_output=multimask)
            with official_epsilon(hf_sam):
                hf_masks, hf_iou = hf_decode(hf_sam, embedding, kind, multimask)
            assert masks.shape == (1, 3 if multimask else 1, 4 * GRID, 4 * GRID)
            assert max_diff(masks, hf_masks) <= TOLERANCE
            assert max_diff(iou, hf_iou) <= TOLERANCE
            assert 0 < max_diff(masks, hf_decode(hf_sam, embedding, kind, multimask)[0]) <= 10 * scaled(hf_masks)


def test_wrong_head_count_would_show(hf_sam_folder, hf_sam):
    """The check above can fail: the same weights with the default 8 decoder heads give other masks."""
    from finesam.weights.loading import sam_from_state_dict

    wrong = sam_from_state_dict(read_hf_checkpoint(hf_sam_folder).state_dict, decoder_heads=8)
    with torch.no_grad():
        embedding = hf_sam.get_image_embeddings(pixels(0))
        masks, _ = wrong.decode(embedding, PROMPTS["box"])
        with official_epsilon(hf_sam):
            assert max_diff(masks, hf_decode(hf_sam, embedding, "box", False)[0]) > 100 * TOLERANCE


def test_convert_command_writes_the_same_weights(hf_sam_folder, tmp_path):
    result = finesam("convert", hf_sam_folder, "--out", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "sam-small.safetensors")]
    converted, direct = load_sam(tmp_path / "sam-small.safetensors").state_dict(), load_sam(hf_sam_folder).state_dict()
    assert converted.keys() == direct.keys() and all(torch.equal(converted[k], direct[k]) for k in direct)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam-small.safetensors"]


def copy_checkpoint(folder: Path, target: Path, edit=None, config=None) -> Path:
    """A copy of an HF checkpoint folder with its tensors edited (a function of the dict) or its config replaced."""
    target.mkdir()
    tensors = load_file(folder / "model.safetensors")
    save_file(edit(tensors) if edit else tensors, target / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((folder / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(text | (config or {})))
    return target


def test_both_positional_matrices_as_older_transformers_wrote_them(hf_sam_folder, tmp_path):
    """Files written by transformers 4 hold HF's positional matrix twice: equal, one is dropped and reported;
    different, the file is refused."""
    shared = "shared_image_embedding.positional_embedding"
    prompt = "prompt_encoder.shared_embedding.positional_embedding"

    def both(tensors: dict[str, torch.Tensor], factor: float = 1.0) -> dict[str, torch.Tensor]:
        return tensors | {prompt: tensors[shared] * factor}

    folder = copy_checkpoint(hf_sam_folder, tmp_path / "both", edit=both)
    report = convert_checkpoint(folder, tmp_path / "out")
    assert report.dropped == [shared]
    assert f"dropped 1 unused keys ({shared})" in report.summary()
    expected = load_sam(hf_sam_folder).state_dict()
    loaded = load_sam(report.written[0]).state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    differing = copy_checkpoint(hf_sam_folder, tmp_path / "differing", edit=lambda t: both(t, 1.5))
    with pytest.raises(CheckpointError, match=f"{shared} differs from {prompt}"):
        load_sam(differing)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t | {"vision_encoder.layers.0.mlp.lin1.weight": torch.zeros(3, 3)},
            r"blocks\.0\.mlp\.lin1\.weight \(HF: vision_encoder\.layers\.0\.mlp\.lin1\.weight\) \(3, 3\)",
        ),
        (
            lambda t: {k: v for k, v in t.items() if k != "mask_decoder.iou_token.weight"},
            r"missing keys: mask_decoder\.iou_token\.weight",
        ),
        (lambda t: t | {"text_encoder.weight": torch.zeros(1)}, r"keys outside HF's SAM layout: text_encoder\.weight"),
        (lambda t: t | {"mask_decoder.extra.weight": torch.zeros(1)}, r"unexpected keys: mask_decoder\.extra\.weight"),
    ],
    ids=["mis-shaped", "missing", "foreign", "unexpected"],
)
def test_bad_tensors_are_named(hf_sam_folder, tmp_path, edit, message):
    with pytest.raises(CheckpointError, match=message):
        load_sam(copy_checkpoint(hf_sam_folder, tmp_path / "edited", edit=edit))


def test_other_checkpoints_are_refused_with_a_reason(hf_sam_folder, tmp_path):
    sam3 = copy_checkpoint(hf_sam_folder, tmp_path / "sam3", config={"model_type": "sam3"})
    with pytest.raises(
        CheckpointError, match=r"model_type 'sam3'; finesam reads .* 'sam' \(SamModel\), 'sam_hq' .* or 'sam2'"
    ):
        load_sam(sam3)
    with pytest.raises(CheckpointError, match="model_type 'sam3'"):
        convert_checkpoint(sam3 / "model.safetensors", tmp_path / "out")
    gelu = copy_checkpoint(
        hf_sam_folder, tmp_path / "gelu", config={"mask_decoder_config": {"hidden_act": "gelu", "iou_head_depth": 4}}
    )
    with pytest.raises(CheckpointError, match=r"hidden_act = 'gelu' \(SAM: 'relu'\), .*iou_head_depth = 4"):
        load_sam(gelu)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((hf_sam_folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"bare: is a folder, not a weights file; .*has no config\.json"):
        load_sam(bare)
    with pytest.raises(CheckpointError, match="not a finesam SAM file"):  # a lone file: not taken for an HF one
        load_sam(bare / "model.safetensors")
    (bare / "config.json").write_text((hf_sam_folder / "config.json").read_text())
    (bare / "model.safetensors").unlink()
    (bare / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no model.safetensors .*pytorch_model.bin: finesam does not unpickle"):
        load_sam(bare)


def test_shards_must_be_files_of_the_folder(hf_sam, tmp_path):
    path = tmp_path / "sharded"
    hf_sam.save_pretrained(path, max_shard_size="300KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert (
        read_hf_checkpoint(path / "model.safetensors.index.json").state_dict.keys()
        == read_hf_checkpoint(path).state_dict.keys()
    )
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"shard names that are not files of .*: \.\./elsewhere"):
        load_sam(path)


# SAM-HQ: the official model, HF's SamHQModel and finesam on the same random weights


@pytest.fixture(scope="module")
def official_hq():
    return build_official(SMALL, seed=1, hq=True)


@pytest.fixture(scope="module")
def hf_hq_folder(official_hq, tmp_path_factory) -> Path:
    """HF's SamHQModel holding the official model's weights (through the renames), saved by `save_pretrained`."""
    model = hf_from_official(official_hq, SMALL, hq=True)
    folder = tmp_path_factory.mktemp("hf") / "sam-hq-small"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_hq(hf_hq_folder) -> Any:
    return SamHQModel.from_pretrained(hf_hq_folder).eval()


class InputImageTransposed(torch.nn.Module):
    """The official two-way transformer, returning the image it received (rows and columns swapped) instead of
    the image it computed: HF's SamHQModel rule."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, src: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_out, _ = self.transformer(src, pos, tokens)
        return tokens_out, src.transpose(2, 3).flatten(2).permute(0, 2, 1)


# transformers 4.54 and later (seen in 4.54.1, 4.55.4, 4.57.3, 5.25.0) make SAM-HQ's masks from the image given to
# the two-way transformer; 4.52.0 and 4.53.3 from the image it returns, as the official code does
HF_MASKS_FROM_TRANSFORMER_INPUT = Version(transformers.__version__) >= Version("4.54")


def official_hq_decode(official, embedding, interm, kind: str, multimask: bool, hq_only: bool, hf_rules: bool = False):
    """The official decoder's output; with `hf_rules`, computed by HF's rules instead (see docs/converting.md):
    the masks are made from the image embedding the two-way transformer received (image + dense prompt), with its
    rows and columns swapped (transformers >= 4.54), and multimask returns the three SAM masks sorted by predicted
    IoU, each plus the HQ mask (or the HQ mask alone with `hq_only`), with the three IoU sorted."""
    decoder = official.mask_decoder
    points = None if kind == "box" else (POINTS, LABELS)
    sparse, dense = official.prompt_encoder(points=points, boxes=BOX if kind == "box" else None, masks=None)
    pe = official.prompt_encoder.get_dense_pe()
    if not hf_rules:
        return decoder(embedding, pe, sparse, dense, multimask, hq_only, interm)
    transformer = decoder.transformer
    hq_features = decoder.embedding_encoder(embedding) + decoder.compress_vit_feat(interm[0].permute(0, 3, 1, 2))
    if HF_MASKS_FROM_TRANSFORMER_INPUT:
        decoder.transformer = InputImageTransposed(transformer)
    try:
        masks, iou = decoder.predict_masks(embedding, pe, sparse, dense, hq_features)
    finally:
        decoder.transformer = transformer
    hq_mask = masks[:, -1:]
    if not multimask:
        return (hq_mask if hq_only else masks[:, :1] + hq_mask), iou[:, :1]
    iou, order = iou[:, 1:].sort(dim=1, descending=True)  # the IoU head has no output for the HQ token
    sam_masks = masks[:, 1:-1][:, order[0]]
    return (hq_mask if hq_only else sam_masks + hq_mask), iou


@torch.no_grad()
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_sam_hq_three_ways(official_hq, hf_hq_folder, hf_hq, kind):
    """finesam reading HF's SAM-HQ files equals the official segment_anything_hq on every output. HF's
    SamHQModel agrees on the encoder, the fused early layer and the IoU, but returns other masks: they equal the
    official decoder under HF's two rules (see `official_hq_decode`); from transformers 4.54 on, even its first
    mask differs from the official one by far more than the tolerance."""
    assert holds_hq(hf_hq_folder)
    model = load_sam(hf_hq_folder)
    adapter = load_hq(model, hf_hq_folder).inject()
    x = pixels(1)
    embedding, interm = official_hq.image_encoder(x)
    hf_embedding, hf_interm = hf_hq.get_image_embeddings(x)
    assert max_diff(model.encode(x), embedding) <= TOLERANCE and max_diff(hf_embedding, embedding) <= TOLERANCE
    early = model.image_features()["early_embedding"]  # the first global block's output, in all three
    assert max_diff(early, interm[0]) <= TOLERANCE and max_diff(hf_interm[0], interm[0]) <= TOLERANCE
    for multimask in (False, True):
        for hq_only in (False, True):
            adapter.hq_mask_only = hq_only
            expected = official_hq_decode(official_hq, embedding, interm, kind, multimask, hq_only)
            ours = model.decode(embedding, PROMPTS[kind], multimask_output=multimask)
            with official_epsilon(hf_hq):
                hf = hf_decode(hf_hq, embedding, kind, multimask, hq_token_only=hq_only, intermediate_embeddings=interm)
            by_hf_rules = official_hq_decode(official_hq, embedding, interm, kind, multimask, hq_only, hf_rules=True)
            for actual, wanted in zip(ours, expected, strict=True):
                assert max_diff(actual, wanted) <= TOLERANCE  # finesam = official
            for actual, wanted in zip(hf, by_hf_rules, strict=True):
                assert max_diff(actual, wanted) <= TOLERANCE  # HF = official under HF's rules
            # the official output is in HF's first (best) place; from 4.54 on, its mask is made differently
            assert hf[0].shape[1] == (3 if multimask and not hq_only else 1) and hf[1].shape[1] == (
                3 if multimask else 1
            )
            assert max_diff(hf[1][:, :1], expected[1]) <= TOLERANCE
            first_mask_difference = max_diff(hf[0][:, :1], expected[0])
            if HF_MASKS_FROM_TRANSFORMER_INPUT:
                assert first_mask_difference > 0.1 * expected[0].abs().max().item()
            else:
                assert first_mask_difference <= TOLERANCE


def test_segment_command_with_an_hf_sam_hq_folder(official_hq, hf_hq_folder, tmp_path):
    """`finesam segment --weights FOLDER` uses the HQ part of a SamHQModel folder, as it does for the official
    HQ-SAM .pth, and writes the official predictor's logits."""
    image = tmp_path / "rocket.png"
    photo("rocket").save(image)
    box = [60, 50, 500, 450]
    predictor = HQSamPredictor(official_hq)
    predictor.set_image(np.asarray(Image.open(image).convert("RGB")))
    expected, iou, _ = predictor.predict(box=np.array(box), multimask_output=False, return_logits=True)
    result = finesam(
        "segment",
        image,
        "--weights",
        hf_hq_folder,
        "--box",
        ",".join(map(str, box)),
        "--out",
        tmp_path / "m.png",
        "--logits",
        tmp_path / "m.npy",
    )
    assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "m.npy") - expected[0]).max() <= TOLERANCE
    assert f"predicted IoU {iou[0]:.4f}" in result.stdout


def test_hq_part_errors_name_the_hf_keys(hf_hq_folder, hf_sam_folder, tmp_path):
    model = load_sam(hf_hq_folder)
    edited = copy_checkpoint(
        hf_hq_folder, tmp_path / "no-hq-token", edit=lambda t: {k: v for k, v in t.items() if "hq_token" not in k}
    )
    with pytest.raises(CheckpointError, match=r"mask_decoder\.hf_token\.weight \(HF: mask_decoder\.hq_token\.weight\)"):
        load_hq(model, edited)
    with pytest.raises(CheckpointError, match="has no HQ-SAM weights"):
        load_hq(load_sam(hf_sam_folder), hf_sam_folder)
