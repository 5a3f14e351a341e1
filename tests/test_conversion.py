"""Conversion of official checkpoints: hyper-parameters, round trips for every size, and the error paths."""

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finesam.model import PRESETS, SAM_VIT_B, SegmentAnything
from finesam.model.image_encoder import TransformerBlock
from finesam.model.prompts import Prompts
from finesam.weights import CheckpointError, atomic_write, convert_checkpoint, load_sam, save_sam
from finesam.weights.io import load_official_state_dict, read_safetensors
from finesam.weights.loading import sam_from_state_dict
from finesam.weights.sam_keys import convert_state_dict, infer_config

from conftest import SMALL, TOLERANCE, max_diff
from official import random_official


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_presets_are_the_official_hyper_parameters(name):
    with torch.device("meta"):
        official = random_official.__globals__["OFFICIAL_BUILDERS"][name]()
    assert infer_config(official.state_dict()) == PRESETS[name]
    assert len(official.state_dict()) == {"vit_b": 314, "vit_l": 482, "vit_h": 594}[name]


@pytest.mark.parametrize(
    "name",
    ["vit_b", pytest.param("vit_l", marks=pytest.mark.slow), pytest.param("vit_h", marks=pytest.mark.slow)],
)
@torch.no_grad()
def test_round_trip_for_each_size(name):
    """Every official tensor lands where the official model uses it: blocks and decoder agree numerically."""
    official = random_official(name, seed=7)
    model = sam_from_state_dict(official.state_dict())
    assert model.config == PRESETS[name]
    blocks = [block for block, _ in model.image_encoder.walk(TransformerBlock)]
    assert [i for i, b in enumerate(blocks) if b.is_global] == list(PRESETS[name].encoder.global_attention_blocks)
    tokens = torch.randn(1, 64, 64, model.config.encoder.dim, generator=torch.Generator().manual_seed(1))
    for i in (0, PRESETS[name].encoder.global_attention_blocks[0]):  # a windowed and a global block
        assert max_diff(blocks[i](tokens), official.image_encoder.blocks[i](tokens)) <= TOLERANCE
    neck_in = torch.randn(1, 64, 64, model.config.encoder.dim, generator=torch.Generator().manual_seed(2))
    assert (
        max_diff(model.image_encoder.layer("Neck")(neck_in), official.image_encoder.neck(neck_in.permute(0, 3, 1, 2)))
        <= TOLERANCE
    )
    embedding = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(3))
    box = torch.tensor([[100.0, 200.0, 700.0, 900.0]])
    sparse, dense = official.prompt_encoder(points=None, boxes=box, masks=None)
    expected = official.mask_decoder(embedding, official.prompt_encoder.get_dense_pe(), sparse, dense, True)
    for actual, wanted in zip(
        model.decode(embedding, Prompts(boxes=box), multimask_output=True), expected, strict=True
    ):
        assert max_diff(actual, wanted) <= TOLERANCE


def test_file_round_trip_keeps_every_tensor(tmp_path, official_small):
    checkpoint = tmp_path / "tiny_sam.pth"
    torch.save(official_small.state_dict(), checkpoint)
    written = convert_checkpoint(checkpoint, tmp_path / "out").written
    assert written == [tmp_path / "out" / "tiny_sam.safetensors"]
    loaded = load_sam(written[0])
    direct = sam_from_state_dict(official_small.state_dict())
    assert loaded.config == SMALL
    assert loaded.state_dict().keys() == direct.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in direct.state_dict().items())
    from_pth = load_sam(checkpoint)  # the library also reads the official file directly
    assert all(torch.equal(from_pth.state_dict()[k], v) for k, v in direct.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny_sam.safetensors"]  # no temporary left


def test_legacy_pickle_format_is_read(tmp_path, official_small):
    checkpoint = tmp_path / "legacy.pth"
    torch.save(official_small.state_dict(), checkpoint, _use_new_zipfile_serialization=False)
    assert load_official_state_dict(checkpoint).keys() == official_small.state_dict().keys()


def test_truncated_file_is_reported(tmp_path, official_small):
    checkpoint = tmp_path / "sam.pth"
    torch.save(official_small.state_dict(), checkpoint)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_sam(checkpoint)


def test_missing_file_and_garbage_are_reported(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_sam(tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_sam(garbage)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_would_run_code_is_refused(tmp_path, zip_format):
    marker = tmp_path / "code-ran"
    checkpoint = tmp_path / "evil.pth"
    if zip_format:
        torch.save({"image_encoder.pos_embed": _Payload(marker)}, checkpoint)
    else:
        checkpoint.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_sam(checkpoint)
    assert not marker.exists()


def _edited(state_dict, drop=(), add=None, replace=None):
    edited = {k: v for k, v in state_dict.items() if k not in drop}
    edited.update(add or {})
    edited.update(replace or {})
    return edited


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"drop": ["mask_decoder.iou_token.weight"]}, r"missing keys: mask_decoder\.iou_token\.weight"),
        ({"add": {"mask_decoder.extra.weight": torch.zeros(3)}}, r"unexpected keys: mask_decoder\.extra\.weight"),
        (
            {"replace": {"image_encoder.blocks.0.attn.proj.weight": torch.zeros(64, 63)}},
            r"mis-shaped keys: image_encoder\.blocks\.0\.attn\.proj\.weight \(64, 63\) -> expected \(64, 64\)",
        ),
        (
            {"replace": {"prompt_encoder.point_embeddings.2.weight": torch.zeros(1, 255)}},
            r"mis-shaped keys: prompt_encoder\.not_a_point_embed\.weight",
        ),
        ({"drop": ["image_encoder.patch_embed.proj.weight"]}, r"not a SAM checkpoint: key 'image_encoder\.patch_embed"),
    ],
)
def test_layout_errors_name_the_keys(official_small, edit, message):
    with pytest.raises(CheckpointError, match=message):
        sam_from_state_dict(_edited(official_small.state_dict(), **edit))


def test_every_problem_is_listed_at_once(official_small):
    state_dict = _edited(
        official_small.state_dict(),
        drop=["mask_decoder.mask_tokens.weight", "prompt_encoder.no_mask_embed.weight"],
        add={"foo": torch.zeros(1)},
    )
    model = SegmentAnything(SMALL, device="meta")
    with pytest.raises(CheckpointError) as error:
        convert_state_dict(state_dict, model)
    for key in ("mask_decoder.mask_tokens.weight", "prompt_encoder.no_mask_embed.weight", "foo"):
        assert key in str(error.value)


def test_safetensors_without_finesam_metadata_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a finesam SAM file"):
        load_sam(path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "weights.safetensors"

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"  # the previous file is untouched


def test_vit_b_preset_class_matches_config():
    from finesam import SegmentAnythingB

    assert SegmentAnythingB(device="meta").config == SAM_VIT_B


def test_written_files_are_plain_safetensors_with_aligned_tensors(small, tmp_path):
    """Memory-mapped weights are used where they lie: each tensor whose size allows it starts at a 64-byte
    boundary (CPU kernels round differently on unaligned operands), and safetensors' own reader agrees."""
    path = save_sam(small, tmp_path / "small.safetensors")
    tensors, _ = read_safetensors(path)
    expected = small.state_dict()
    theirs = load_file(path)
    assert theirs.keys() == expected.keys() == tensors.keys()
    assert all(torch.equal(theirs[k], expected[k]) and torch.equal(tensors[k], expected[k]) for k in expected)
    sized = [k for k, v in tensors.items() if v.nbytes % 64 == 0]
    assert len(sized) > len(tensors) // 2
    assert [k for k in sized if tensors[k].data_ptr() % 64] == []
