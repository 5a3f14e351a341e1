"""HQ-SAM 2 as an adapter of SAM 2.1 against the official sam-hq2 outputs (stored as data, `tests/data/hq_sam2/`,
see its README): the base is SAM 2.1 tiny rebuilt from the PyPI `sam2` package under `torch.manual_seed(0)`
(checksum asserted), the HQ tensors go through our converter from an official-format state dict.

Tolerances: low-resolution logits and IoU within 1e-4 (max abs), original-size logits (every 5th row and column)
within 1e-3 through `predict`, no confident pixel (|logit| > 0.1) on the other side of the threshold.
"Bit-identical" checks use `torch.equal`.
"""

import copy
import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks
import yaml
from PIL import Image
from safetensors.torch import load_file
from skimage import data as skimage_data

from finesam.adapters.hq import HQSAM2Adapter, HQSAMAdapter, hq_adapter_for, hq_mask_only_set_to
from finesam.adapters.hq.layers import HQMaskPrediction
from finesam.adapters.lora import TARGETS, SAMLoraAdapter, base_linears
from finesam.fast import apply_fast_paths, remove_fast_paths
from finesam.fast.hq import HQMaskPrediction as FastHQMaskPrediction
from finesam.model.prompts import Prompts
from finesam.model.sam import ImageEmbedding, SegmentAnything, build_sam
from finesam.model.sam2.sam2 import SegmentAnything2
from finesam.weights import CheckpointError, convert_checkpoint, holds_hq, load_hq, load_sam, save_hq
from finesam.weights.download import CHECKPOINTS
from finesam.weights.hq import hq_from_state_dict, is_hq_key
from finesam.weights.loading import sam_from_state_dict

from conftest import SMALL, max_diff
from helpers import finesam
from official_sam2 import CONFIG_FILES, CONFIGS, instantiate

DATA = Path(__file__).parent / "data" / "hq_sam2"
BASE_SHA256 = "1380109b4aac6ce42c264c32251b4d2dc907b61aefd59a8322bac2fd2790b0a1"  # the fixture README's
LOW_RES_TOLERANCE = 1e-4
IOU_TOLERANCE = 1e-4
FULL_SIZE_TOLERANCE = 1e-3
IMAGES = {"astronaut": skimage_data.astronaut, "coffee": skimage_data.coffee}


def fixture_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The fixture's checksum: every tensor, sorted by key, as contiguous little-endian float32 bytes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(tensors[key].detach().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def official_state_dict() -> dict[str, torch.Tensor]:
    """The official HQ-SAM 2 state dict of the fixture: SAM 2.1 tiny built from the package's YAML under seed 0
    (no perturbation, no predictor postprocessing arguments), plus the 13 HQ tensors."""
    torch.manual_seed(0)
    config = yaml.safe_load((CONFIGS / CONFIG_FILES["sam2.1_hiera_tiny"]).read_text())["model"]
    base = instantiate(config).state_dict()
    assert len(base) == 471 and fixture_sha256(base) == BASE_SHA256
    hq = load_file(DATA / "hq_tensors.safetensors")
    assert len(hq) == 13 and all(is_hq_key(k) for k in hq) and not any(is_hq_key(k) for k in base)
    return {**base, **hq}


@functools.cache
def models() -> dict[bool, tuple[SegmentAnything2, HQSAM2Adapter]]:
    """By `dynamic_multimask`: our model (the fixture's main cases have it off, the official image predictor's
    build on) and its HQ-SAM 2 adapter with the converted weights, not injected."""
    dynamic = sam_from_state_dict(official_state_dict())
    assert isinstance(dynamic, SegmentAnything2) and dynamic.config.decoder.dynamic_multimask  # type: ignore[attr-defined]
    decoder = dataclasses.replace(dynamic.config.decoder, dynamic_multimask=False)  # type: ignore[type-var]
    static = build_sam(dataclasses.replace(dynamic.config, decoder=decoder))
    assert isinstance(static, SegmentAnything2)
    static.load_state_dict(dynamic.state_dict())
    out = {}
    for flag, model in ((True, dynamic), (False, static.eval())):
        adapter = hq_from_state_dict(model, official_state_dict())
        assert isinstance(adapter, HQSAM2Adapter)
        out[flag] = (model, adapter)
    return out


@functools.cache
def embedding(image: str) -> ImageEmbedding:
    """Encoded once (both models share the encoder; HQ-SAM 2 reads no extra image feature)."""
    with torch.no_grad():
        return models()[False][0].encode_image(IMAGES[image]())


@functools.cache
def stored() -> tuple[Any, dict[str, dict[str, Any]]]:
    data = np.load(DATA / "outputs.npz")
    meta = json.loads(str(data["meta_json"]))
    return data, {case["case"]: case for case in meta["cases"]} | {"_dynamic": meta["dynamic_variant"]}


def prompt_of(case: dict[str, Any]) -> dict[str, Any]:
    return {"boxes": case.get("box"), "points": case.get("point_coords"), "labels": case.get("point_labels")}


@torch.no_grad()
def predict(model: SegmentAnything2, case: dict[str, Any], multimask: bool | None = None):
    multimask_output = bool(case["multimask_output"] if multimask is None else multimask)
    return model.predict(
        embedding(case["image"]), **prompt_of(case), multimask_output=multimask_output, return_logits=True
    )


def assert_same_logits(ours: torch.Tensor, expected: np.ndarray, tolerance: float) -> None:
    reference = torch.from_numpy(expected)
    assert max_diff(ours, reference) <= tolerance
    assert not ((ours > 0.1) & (reference < 0) | (ours < -0.1) & (reference > 0)).any()


CASES = [f"{image}_P{p}_{mode}" for image in IMAGES for p in (1, 2, 3) for mode in ("single", "multi", "hqonly")]


@pytest.mark.parametrize("name", CASES)
def test_predict_matches_official_hq_sam2(name):
    data, cases = stored()
    case = cases[name]
    model, adapter = models()[False]
    adapter.inject()
    try:
        adapter.hq_mask_only = case["hq_token_only"]
        result = predict(model, case)
    finally:
        adapter.hq_mask_only = False
        adapter.eject()
    channels = 3 if case["multimask_output"] else 1
    assert result.masks.shape == (1, channels, *case["image_hw"])
    assert max_diff(result.iou_predictions[0], torch.from_numpy(data[f"{name}_iou"])) <= IOU_TOLERANCE
    if f"{name}_low_res_logits" in data:
        assert_same_logits(result.low_res_logits[0], data[f"{name}_low_res_logits"], LOW_RES_TOLERANCE)
    if f"{name}_mask_logits_s5" in data:
        assert_same_logits(result.masks[0, :, ::5, ::5], data[f"{name}_mask_logits_s5"], FULL_SIZE_TOLERANCE)


@pytest.mark.parametrize(
    "prompt", ["astronaut_P1", "astronaut_P2", "astronaut_P3", "coffee_P1", "coffee_P2", "coffee_P3"]
)
def test_dynamic_multimask_variant_matches_official(prompt):
    """The official image predictor's build (stability fallback on): the fallback is decided on the SAM logits
    before the HQ mask is added; it fired for every stored prompt, choosing multimask output 0."""
    data, cases = stored()
    model, adapter = models()[True]
    adapter.inject()
    try:
        for mode, hq_only in (("single", False), ("hqonly", True)):
            name = f"{prompt}_{mode}"
            assert cases["_dynamic"][name]["fallback"] and cases["_dynamic"][name]["selected_multimask_index"] == 0
            adapter.hq_mask_only = hq_only
            result = predict(model, cases[name])
            assert max_diff(result.iou_predictions[0], torch.from_numpy(data[f"{name}_dyn_iou"])) <= IOU_TOLERANCE
            # single: the first multimask output (SAM mask 1 + HQ); hqonly: the HQ mask alone either way
            same_as = f"{prompt}_multi" if mode == "single" else name
            if f"{same_as}_low_res_logits" in data:
                assert_same_logits(result.low_res_logits[0], data[f"{same_as}_low_res_logits"][:1], LOW_RES_TOLERANCE)
            if f"{same_as}_mask_logits_s5" in data:
                expected = data[f"{same_as}_mask_logits_s5"][:1]
                assert_same_logits(result.masks[0, :, ::5, ::5], expected, FULL_SIZE_TOLERANCE)
    finally:
        adapter.hq_mask_only = False
        adapter.eject()


def test_the_hq_token_changes_sam_s_own_masks():
    """The HQ token takes part in the two-way attention: with HQ injected, SAM's token-0 mask (single minus the
    HQ mask alone) equals the official one and differs from the base model's."""
    data, cases = stored()
    model, adapter = models()[False]
    case = cases["astronaut_P3_single"]
    base = predict(model, case).low_res_logits
    adapter.inject()
    try:
        single = predict(model, case).low_res_logits
        with hq_mask_only_set_to(model, True):
            hq_alone = predict(model, case).low_res_logits
    finally:
        adapter.eject()
    sam_part = single - hq_alone
    expected = data["astronaut_P3_single_low_res_logits"] - data["astronaut_P3_hqonly_low_res_logits"]
    assert max_diff(sam_part[0], torch.from_numpy(expected)) <= 2 * LOW_RES_TOLERANCE
    assert max_diff(sam_part, base) > 0.01


@torch.no_grad()
def test_multimask_output_adds_the_hq_mask_to_each_sam_mask_and_hq_mask_only_gives_one():
    model, adapter = models()[False]
    case = stored()[1]["coffee_P3_multi"]
    adapter.inject()
    try:
        multi = predict(model, case)
        adapter.hq_mask_only = True
        hq_alone = predict(model, case)
        # one mask, one IoU: the best of the three the official code returns with it (unpaired)
        assert hq_alone.masks.shape[1] == 1 and hq_alone.iou_predictions.shape[1] == 1
        assert torch.equal(hq_alone.iou_predictions, multi.iou_predictions.amax(dim=1, keepdim=True))
        with hq_mask_only_set_to(model, False):
            assert torch.equal(predict(model, case).low_res_logits, multi.low_res_logits)
        assert adapter.hq_mask_only
    finally:
        adapter.hq_mask_only = False
        adapter.eject()
    sam_masks = multi.low_res_logits - hq_alone.low_res_logits  # each SAM mask + the same HQ mask
    assert sam_masks.shape == (1, 3, 256, 256) and not torch.allclose(sam_masks[0, 0], sam_masks[0, 1])


def snapshot(model: SegmentAnything2) -> tuple[str, dict[str, torch.Tensor], list[torch.Tensor]]:
    cases = stored()[1]
    outputs = [predict(model, cases[name]).masks for name in ("astronaut_P3_single", "coffee_P2_multi")]
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}, outputs


def assert_same_snapshot(a, b) -> None:
    assert a[0] == b[0]
    assert list(a[1]) == list(b[1]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))


def test_eject_restores_the_base_exactly():
    model, adapter = models()[True]
    contexts = {name: dict(values) for name, values in model.provider.contexts.items()}
    before = snapshot(model)
    for _ in range(3):
        adapter.inject()
        with_hq = snapshot(model)
        assert with_hq[0] != before[0] and with_hq[1].keys() != before[1].keys()
        assert not torch.equal(with_hq[2][0], before[2][0])
        adapter.eject()
        assert_same_snapshot(snapshot(model), before)
    assert set(model.provider.contexts) == set(contexts)


def test_adapter_is_picked_by_the_model_and_refuses_the_other_generation():
    sam2, _ = models()[False]
    sam1 = SegmentAnything(SMALL)
    assert type(hq_adapter_for(sam2)) is HQSAM2Adapter and type(hq_adapter_for(sam1)) is HQSAMAdapter
    with pytest.raises(
        ValueError, match="HQ-SAM 2 adapts SAM 2's mask decoder; this SegmentAnything has a MaskDecoder"
    ):
        HQSAM2Adapter(sam1)
    adapter = HQSAM2Adapter(sam2)
    assert len(adapter.state_dict()) == 13 and sum(p.numel() for p in adapter.parameters()) == 177_152
    adapter.inject()
    try:
        with pytest.raises(ValueError, match="already has an HQ-SAM adapter injected"):
            HQSAM2Adapter(sam2)
        with pytest.raises(RuntimeError, match="already injected"):
            adapter.inject()
    finally:
        adapter.eject()
    with pytest.raises(RuntimeError, match="not injected"):
        adapter.eject()


def decode_outputs(model: SegmentAnything2) -> tuple[torch.Tensor, ...]:
    image = embedding("astronaut")
    prompts = Prompts(
        boxes=torch.tensor([[300.0, 40.0, 720.0, 840.0]]),
        points=torch.tensor([[[520.0, 400.0]]]),
        labels=torch.tensor([[1]]),
    )
    with torch.no_grad():
        masks, iou = model.decode(image.embedding, prompts, multimask_output=True, image_features=image.features)
    return masks, iou


def merged(model: SegmentAnything2, lora: SAMLoraAdapter) -> SegmentAnything2:
    """A copy of the base with the LoRA folded into the weights it adapts."""
    copy_ = copy.deepcopy(model)
    layers = {linear.path: linear.layer for linear in base_linears(copy_)}
    with torch.no_grad():
        for path, down_up in zip(lora.paths, lora.loras, strict=True):
            layers[path].weight += lora.scale * down_up.up.weight @ down_up.down.weight
    return copy_


@functools.cache
def lora_and_reference() -> tuple[SAMLoraAdapter, tuple[torch.Tensor, ...]]:
    """A LoRA on every decoder linear (non-zero), and the HQ-SAM 2 outputs of a copy with the LoRA merged in."""
    model, _ = models()[False]
    lora = SAMLoraAdapter(model, rank=4, include=TARGETS["decoder_all"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for down_up in lora.loras:
            down_up.up.weight.copy_(torch.randn(down_up.up.weight.shape, generator=g) * 0.05)
    reference_model = merged(model, lora)
    hq_from_state_dict(reference_model, official_state_dict()).inject()
    return lora, decode_outputs(reference_model)


@pytest.mark.parametrize("order", ["hq then lora", "lora then hq"])
def test_stacks_with_lora_in_either_order_and_ejects_exactly(order):
    model, hq = models()[False]
    base_text, base_out = repr(model), decode_outputs(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lora, reference = lora_and_reference()
    first, second = (hq, lora) if order == "hq then lora" else (lora, hq)
    first.inject()
    second.inject()
    try:
        for ours, expected in zip(decode_outputs(model), reference, strict=True):
            assert max_diff(ours, expected) <= 1e-4
        assert not torch.equal(reference[0], base_out[0])
    finally:
        second.eject()
        first.eject()
    assert repr(model) == base_text
    state = model.state_dict()
    assert list(state) == list(base_state) and all(torch.equal(state[k], base_state[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(decode_outputs(model), base_out, strict=True))


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> Path:
    """An official-format HQ-SAM 2 checkpoint (`{"model": state_dict}`, the SAM 2.1 keys plus the 13)."""
    path = tmp_path_factory.mktemp("hq2") / "sam2.1_hq_hiera_tiny.pt"
    torch.save({"model": official_state_dict()}, path)
    return path


def test_convert_and_load_the_official_checkpoint(tmp_path, official_file):
    report = convert_checkpoint(official_file, tmp_path)
    assert report.written == [
        tmp_path / "sam2.1_hq_hiera_tiny.safetensors",
        tmp_path / "sam2.1_hq_hiera_tiny.hq.safetensors",
    ]
    assert holds_hq(official_file) and not holds_hq(report.written[0])
    base = load_sam(report.written[0], fast=False)
    reference = models()[True][1].state_dict()
    for source in (report.written[1], official_file):
        adapter = load_hq(base, source)
        assert type(adapter) is HQSAM2Adapter and not adapter.injected
        state = adapter.state_dict()
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    again = save_hq(adapter, tmp_path / "again.hq.safetensors")
    assert load_hq(base, again).state_dict().keys() == reference.keys()
    with pytest.raises(CheckpointError, match="has no HQ-SAM weights"):
        torch.save({"model": {k: v for k, v in official_state_dict().items() if not is_hq_key(k)}}, tmp_path / "p.pt")
        load_hq(base, tmp_path / "p.pt")


def test_the_catalogue_lists_the_official_file():
    entry = CHECKPOINTS["sam2.1_hq_hiera_large"]
    assert entry.filename == "sam2.1_hq_hiera_large.pt" and entry.size is None and entry.sha256 is None
    assert entry.hub_repo == "lkeab/hq-sam" and entry.preset == "sam2.1_hiera_large"
    assert entry.url == "https://huggingface.co/lkeab/hq-sam/resolve/main/sam2.1_hq_hiera_large.pt"


def test_segment_with_the_official_file_as_weights(tmp_path, official_file):
    """`--weights` an official HQ-SAM 2 file brings its HQ part: the mask is HQ-SAM 2's (the official image
    predictor's build: dynamic multimask on)."""
    image_path = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(image_path)
    box = stored()[1]["astronaut_P1_single"]["box"]
    result = finesam(
        "segment",
        image_path,
        "--weights",
        official_file,
        "--box",
        ",".join(map(str, box)),
        "--out",
        tmp_path / "mask.png",
        "--logits",
        tmp_path / "logits.npy",
    )
    assert result.returncode == 0, result.stderr
    model, adapter = models()[True]
    adapter.inject()
    try:
        expected = predict(model, stored()[1]["astronaut_P1_single"]).masks[0, 0]
    finally:
        adapter.eject()
    logits = torch.from_numpy(np.load(tmp_path / "logits.npy"))
    assert_same_logits(logits, expected.numpy(), FULL_SIZE_TOLERANCE)
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert np.array_equal(mask > 0, logits.numpy() > 0)


@torch.no_grad()
def test_the_fast_hq_head_equals_the_reference_without_fused_features():
    """HQ-SAM 2's head is HQ-SAM's without the fused term (`HQMaskPrediction(fused=False)`): its fast version (the
    product folded into the last convolution, in bands of rows) gives the reference's logits."""
    model, adapter = models()[False]
    kwargs = {"boxes": np.array([150.0, 20.0, 360.0, 420.0]), "multimask_output": True}
    adapter.inject()
    try:
        reference = model.predict(embedding("astronaut"), **kwargs).low_res_logits
        assert apply_fast_paths(*adapter.placed_adapters) >= 1
        head = next(m for p in adapter.placed_adapters for m in p.modules() if isinstance(m, HQMaskPrediction))
        assert type(head) is FastHQMaskPrediction and not head.fused
        fast = model.predict(embedding("astronaut"), **kwargs).low_res_logits
        remove_fast_paths(*adapter.placed_adapters)
    finally:
        adapter.eject()
    assert max_diff(fast, reference) <= 1e-5 * max(1.0, reference.abs().max().item())
    assert not torch.equal(fast, reference)  # the folded product ran (another rounding)
