"""EfficientViT-SAM (the `efficientvit` family) against the official code of `efficientsam` 1.0.0 (mit-han-lab's
code, repacked): seeded random weights of the official model, converted by our converter.

- Model level (encoder, its early stage, prompt encoder and decoder on the same embedding): within TOLERANCE
  (1e-4) for three small configurations (L-style at 512, XL-style at 1024, one whose last stage takes the
  official attention's quadratic form), full L0 here, L1, L2, XL0, XL1 behind `slow`.
- Through the official `EfficientViTSamPredictor` on real photos: its input equal bit for bit, the embedding
  within TOLERANCE, masks at the original size, low-resolution logits and IoUs within PREDICTOR_TOLERANCE
  (1e-3), and no confident pixel (|logit| > 0.1) on the other side of the threshold.
- `everything` against `EfficientViTSamAutomaticMaskGenerator`, HQ-SAM's tap and eject, ONNX end to end, the
  fast paths, conversion from a `.pt` file.
"""

import functools
from typing import Any

import numpy as np
import pytest
import torch
import transformers  # noqa: F401  before the reference: its torchvision stand-in confuses transformers' import checks
from PIL import Image

from finesam.adapters.hq import HQSAMAdapter, hq_adapter_for
from finesam.amg import AutomaticMaskGenerator
from finesam.fast import apply_fast_paths, reference_paths, remove_fast_paths
from finesam.fast import efficientvit as fast_efficientvit
from finesam.fast.swap import is_fast
from finesam.model import PRESETS
from finesam.model.efficientvit.config import EfficientViTConfig, input_size_for
from finesam.model.efficientvit.encoder import Upsample
from finesam.model.efficientvit.sam import EfficientViTSAM
from finesam.model.prompts import Prompts
from finesam.onnx.export import export
from finesam.onnx.predictor import OnnxPredictor
from finesam.weights.layouts import layout_for, layout_of
from finesam.weights.loading import convert_checkpoint, load_sam, sam_from_state_dict
from finesam.weights.sam_keys import infer_config

from conftest import PHOTOS, PREDICTOR_PROMPTS, assert_model_unchanged, max_diff, model_snapshot, photo
from official import structured
from official_efficientvit import (
    SMALL_L,
    SMALL_QUADRATIC,
    SMALL_XL,
    EfficientViTSamAutomaticMaskGenerator,
    EfficientViTSamPredictor,
    build_official_efficientvit,
    official_encoder_outputs,
)

TOLERANCE = 1e-4
PREDICTOR_TOLERANCE = 1e-3
MAX_FLIPPED = 64  # pixels of an `everything` mask on the other side of the threshold (logits within 1e-5 of 0)
SMALL = {config.name: config for config in (SMALL_L, SMALL_XL, SMALL_QUADRATIC)}
RELEASES = ["efficientvit_sam_l0", "efficientvit_sam_l1", "efficientvit_sam_l2"]
RELEASES += ["efficientvit_sam_xl0", "efficientvit_sam_xl1"]


@functools.cache
def _pair(name: str) -> tuple[Any, EfficientViTSAM]:
    """The official model (a small configuration, or a release through the model zoo's own builder) and ours,
    converted from its state_dict."""
    if name in SMALL:
        official = build_official_efficientvit(SMALL[name])
    else:
        official = build_official_efficientvit(PRESETS[name], release=name)
    ours = sam_from_state_dict(official.state_dict())
    assert isinstance(ours, EfficientViTSAM)
    return official, ours.eval()


def _pixels(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _model_level(official: Any, ours: EfficientViTSAM) -> None:
    pixels = _pixels(ours.encoder_input_size)
    expected, expected_early = official_encoder_outputs(official, pixels)
    captured: list[Any] = []
    hook = ours.image_encoder.early_embedding_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        embedding = ours.image_encoder(pixels)
    finally:
        hook.remove()
    assert embedding.shape == (1, 256, 64, 64)
    assert max_diff(embedding, expected) <= TOLERANCE
    assert max_diff(captured[0], expected_early) <= TOLERANCE
    assert captured[0].shape == (1, 64, 64, ours.image_encoder.early_embedding_dim)  # HQ-SAM's tap: the 64 grid
    # the decoder on the official embedding, for a box and clicks, in the 1024 frame
    points, labels = torch.tensor([[[500.0, 300.0], [200.0, 700.0]]]), torch.tensor([[1, 0]])
    box = torch.tensor([[120.0, 80.0, 800.0, 900.0]])
    sparse, dense = official.prompt_encoder(points=(points, labels), boxes=box, masks=None)
    masks, iou = official.mask_decoder(
        image_embeddings=expected,
        image_pe=official.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    ours_masks, ours_iou = ours.decode(expected, Prompts(points, labels, box), multimask_output=True)
    assert max_diff(ours_masks, masks) <= TOLERANCE and max_diff(ours_iou, iou) <= TOLERANCE


@pytest.mark.parametrize("name", list(SMALL))
def test_small_configurations_match_at_model_level(name):
    _model_level(*_pair(name))


def test_l0_matches_at_model_level():
    official, ours = _pair("efficientvit_sam_l0")
    assert ours.config == PRESETS["efficientvit_sam_l0"] and ours.config.name == "efficientvit_sam_l0"
    _model_level(official, ours)


@pytest.mark.slow
@pytest.mark.parametrize("name", RELEASES[1:])
def test_every_release_matches_at_model_level(name):
    official, ours = _pair(name)
    assert ours.config == PRESETS[name] and ours.config.name == name  # the shapes and the input-size rule
    _model_level(official, ours)


def test_the_quadratic_attention_is_taken_where_the_official_takes_it():
    config = SMALL_QUADRATIC.encoder
    assert isinstance(config, EfficientViTConfig)
    last = config.input_size // 2 ** len(config.widths)
    assert last * last <= config.head_dim < (2 * last) ** 2  # the last stage quadratic, the one before linear


def test_the_layout_reads_every_configuration_off_the_shapes():
    for config in SMALL.values():
        official = build_official_efficientvit(config)
        assert layout_for(official.state_dict()).family == "efficientvit"
        inferred = infer_config(official.state_dict())
        assert inferred == config, (inferred, config)
    for preset in (PRESETS[name] for name in RELEASES):
        encoder = preset.encoder
        assert isinstance(encoder, EfficientViTConfig)
        assert input_size_for(encoder.neck_stages) == encoder.input_size  # the rule the layout applies
    entries = {c.name: c for c in layout_of("efficientvit").checkpoints}
    assert set(entries) == set(RELEASES) and all(c.preset == c.name for c in entries.values())
    assert all(c.licence == "Apache-2.0" and c.url.endswith(f"{c.name}.pt") for c in entries.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", RELEASES)
def test_every_preset_has_the_official_release_keys_and_shapes(name):
    official = build_official_efficientvit(PRESETS[name], release=name).state_dict()
    ours = build_official_efficientvit(PRESETS[name]).state_dict()  # the official classes built from our preset
    assert list(ours) == list(official) and all(ours[k].shape == official[k].shape for k in official)


def _compare(official: Any, ours: EfficientViTSAM, image: Image.Image, prompt: dict[str, Any], multimask: bool):
    array = np.asarray(image)
    predictor = EfficientViTSamPredictor(official)
    predictor.set_image(array)
    masks, iou, low_res = predictor.predict(**prompt, multimask_output=multimask, return_logits=True)
    pixels, input_size = ours.preprocess(image)
    assert torch.equal(pixels, official.transform(array)[None])  # the official input, bit for bit
    embedding = ours.encode_image(image)
    official_input_size: Any = predictor.input_size
    assert embedding.input_size == tuple(official_input_size) and embedding.original_size == array.shape[:2]
    assert input_size == embedding.input_size
    official_features: Any = predictor.features
    assert max_diff(embedding.embedding, official_features) <= TOLERANCE
    kwargs = {"points": prompt.get("point_coords"), "labels": prompt.get("point_labels"), "boxes": prompt.get("box")}
    result = ours.predict(embedding, **kwargs, multimask_output=multimask, return_logits=True)
    expected = torch.from_numpy(masks)
    assert max_diff(result.masks[0], expected) <= PREDICTOR_TOLERANCE
    assert max_diff(result.low_res_logits[0], torch.from_numpy(low_res)) <= PREDICTOR_TOLERANCE
    assert max_diff(result.iou_predictions[0], torch.from_numpy(iou)) <= PREDICTOR_TOLERANCE
    logits = result.masks[0]
    assert not ((logits > 0.1) & (expected < 0) | (logits < -0.1) & (expected > 0)).any()


# each photo shape (downscaled, upscaled, both orientations, square) with one of the prompts
CASES = [
    ("landscape", "box and clicks", True),
    ("portrait", "click", True),
    ("square", "box", False),
    ("small landscape", "box and clicks", False),
]


@pytest.mark.parametrize("shape, prompt, multimask", CASES)
@torch.no_grad()
def test_predict_matches_the_official_predictor_at_512(shape, prompt, multimask):
    _compare(*_pair("small_l"), PHOTOS[shape](), PREDICTOR_PROMPTS[prompt], multimask)


@torch.no_grad()
def test_an_image_of_the_encoders_size_is_not_resized_and_matches():
    image = photo("astronaut").resize((512, 384), Image.Resampling.BILINEAR)  # the longest side is 512
    _compare(*_pair("small_l"), image, PREDICTOR_PROMPTS["box and clicks"], multimask=True)


@torch.no_grad()
def test_predict_matches_the_official_predictor_at_1024():
    _compare(*_pair("small_xl"), PHOTOS["portrait"](), PREDICTOR_PROMPTS["box and clicks"], multimask=True)


@torch.no_grad()
def test_l0_matches_the_official_predictor():
    _compare(
        *_pair("efficientvit_sam_l0"), PHOTOS["small landscape"](), PREDICTOR_PROMPTS["box and clicks"], multimask=False
    )


def test_everything_matches_the_official_generator():
    """Random weights give predicted IoUs around -0.4 to 0.1 and logits within a few tenths of 0: every mask is
    kept but near-duplicates (NMS 0.9), 16 points (the official decoder is slow on the CPU). The masks are equal
    but for the pixels whose logits sit within float noise of 0 (MAX_FLIPPED of 106800)."""
    official = structured(build_official_efficientvit(SMALL_L, seed=2))
    ours = sam_from_state_dict(official.state_dict())
    image = np.asarray(photo("astronaut_crop").resize((400, 267), Image.Resampling.BILINEAR))
    settings: dict[str, Any] = dict(
        points_per_side=4, pred_iou_thresh=-1.0, stability_score_thresh=0.0, box_nms_thresh=0.9
    )
    with torch.no_grad():
        expected = EfficientViTSamAutomaticMaskGenerator(official, **settings).generate(image)
    actual = AutomaticMaskGenerator(ours, **settings).generate(image)
    assert len(actual) == len(expected) >= 5
    assert len({record["area"] for record in actual}) > 3  # not all alike
    records: list[Any] = actual  # binary masks (the default output mode)
    for reference, record in zip(expected, records, strict=True):
        assert set(record) == set(reference)
        assert record["bbox"] == reference["bbox"] and record["crop_box"] == reference["crop_box"]
        assert np.allclose(record["point_coords"], reference["point_coords"], rtol=0, atol=1e-9)
        assert abs(record["predicted_iou"] - reference["predicted_iou"]) <= PREDICTOR_TOLERANCE
        assert abs(record["stability_score"] - reference["stability_score"]) <= PREDICTOR_TOLERANCE
        assert int((record["segmentation"] != reference["segmentation"]).sum()) <= MAX_FLIPPED
        assert record["area"] == int(record["segmentation"].sum())


@torch.no_grad()
def test_hq_sam_taps_the_stage_at_the_embedding_grid_and_ejects_exactly():
    official, ours = _pair("small_l")
    pixels = _pixels(512)
    _, early = official_encoder_outputs(official, pixels)
    box = Prompts(boxes=torch.tensor([[100.0, 150.0, 700.0, 900.0]]))
    before = ours.decode(ours.encode(pixels), box, multimask_output=True)
    snapshot = model_snapshot(ours)
    adapter = hq_adapter_for(ours)
    assert isinstance(adapter, HQSAMAdapter)
    adapter.inject()
    try:
        embedding = ours.encode(pixels)
        assert max_diff(ours.image_features()["early_embedding"], early) <= TOLERANCE
        masks, _ = ours.decode(embedding, box, multimask_output=True)
        assert masks.shape == (1, 1, 256, 256)  # the best SAM mask plus the HQ mask (official HQ-SAM rule)
    finally:
        adapter.eject()
    assert_model_unchanged(ours, snapshot)
    again = ours.decode(ours.encode(pixels), box, multimask_output=True)
    assert all(torch.equal(a, b) for a, b in zip(again, before, strict=True))


@torch.no_grad()
def test_the_fast_paths_equal_the_reference():
    _, ours = _pair("small_xl")
    pixels = _pixels(1024)
    reference = ours.encode(pixels)
    apply_fast_paths(ours)
    try:
        fast = ours.encode(pixels)
    finally:
        remove_fast_paths(ours)
    assert max_diff(fast, reference) <= TOLERANCE
    assert torch.equal(ours.encode(pixels), reference)


@pytest.mark.parametrize("name", ["small_l", "small_quadratic"])
@torch.no_grad()
def test_each_fast_layer_equals_its_reference(name):
    """Every fast layer of the encoder (fused convolutions, residual blocks, linear attention; the quadratic
    form falls back) against the same layer with its reference class, on the map it sees in the encoder:
    within TOLERANCE (1e-4) in float32."""
    _, ours = _pair(name)
    pixels = _pixels(ours.encoder_input_size)
    inputs: dict[torch.nn.Module, torch.Tensor] = {}
    classes = (
        fast_efficientvit.ConvLayer,
        fast_efficientvit.LocalBlock,
        fast_efficientvit.ContextModule,
        fast_efficientvit.Upsample,
    )
    apply_fast_paths(ours)
    try:
        layers = [m for m in ours.image_encoder.modules() if isinstance(m, classes)]
        hooks = [m.register_forward_pre_hook(lambda m, i: inputs.setdefault(m, i[0])) for m in layers]
        ours.image_encoder(pixels)
        for hook in hooks:
            hook.remove()
        assert {type(m) for m in inputs} == set(classes)  # the layers inside a block run through the block
        fast = {m: m(x) for m, x in inputs.items()}
    finally:
        remove_fast_paths(ours)
    assert not any(is_fast(m) or "_memory" in vars(m) for m in ours.modules())  # the swap undone
    for layer, x in inputs.items():
        reference = layer(x)
        assert max_diff(fast[layer], reference) <= TOLERANCE, type(layer).__name__


@pytest.mark.parametrize("height, width", [(16, 16), (32, 32), (7, 12), (64, 64)])
@torch.no_grad()
def test_the_fast_resampling_equals_the_bicubic_one(height, width):
    """The neck's bicubic resampling as two products by the separable weights: within TOLERANCE (1e-4) of
    torch's bicubic kernel in float32 (values of a few units), channels-last; the same size is left as it is."""
    upsample = Upsample(64)
    x = 3 * torch.randn(2, 24, height, width, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    reference = upsample(x)
    apply_fast_paths(upsample)
    assert is_fast(upsample)
    fast = upsample(x)
    assert max_diff(fast, reference) <= TOLERANCE and fast.is_contiguous(memory_format=torch.channels_last)
    assert height != 64 or fast is x


@torch.no_grad()
def test_the_fast_paths_in_bfloat16_are_as_close_as_the_reference_in_bfloat16():
    """bfloat16 (`set_encoder_dtype`): the fast encoder's embedding no further from the float32 one than the
    reference's bfloat16 embedding is, up to a quarter more (both round every layer's output)."""
    official, _ = _pair("small_l")
    ours = sam_from_state_dict(official.state_dict()).eval()
    pixels = _pixels(512)
    expected = ours.encode(pixels)
    ours.set_encoder_dtype(torch.bfloat16)
    reference = ours.encode(pixels)
    apply_fast_paths(ours)
    fast = ours.encode(pixels)
    assert fast.dtype == reference.dtype == expected.dtype
    assert max_diff(fast, expected) <= 1.25 * max_diff(reference, expected) + 1e-3


@torch.no_grad()
def test_the_fast_paths_fold_the_current_weights():
    """The folded weights are remembered, and folded again when a weight changes in place."""
    official, _ = _pair("small_l")
    ours = sam_from_state_dict(official.state_dict()).eval()
    pixels = _pixels(512)
    apply_fast_paths(ours)
    before = ours.encode(pixels)
    for norm in (m for m in ours.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        norm.running_var.mul_(2.0)
    after = ours.encode(pixels)
    with reference_paths(ours):
        expected = ours.encode(pixels)
    assert max_diff(after, before) > 1e-2 and max_diff(after, expected) <= TOLERANCE


@torch.no_grad()
def test_onnx_export_and_predictor_match_the_torch_model(tmp_path):
    _, ours = _pair("small_l")
    description = export(ours, tmp_path).description
    assert description["preprocessing"]["encoder_input_size"] == 512
    assert description["preprocessing"]["image_size"] == 1024
    assert description["encoder_inputs"]["image"]["shape"] == [1, 3, 512, 512]
    image = PHOTOS["portrait"]()
    predictor = OnnxPredictor(tmp_path)
    prompt = PREDICTOR_PROMPTS["box and clicks"]
    kwargs = {"points": prompt["point_coords"], "labels": prompt["point_labels"], "boxes": prompt["box"]}
    onnx = predictor.predict(image, **kwargs, return_logits=True)
    torch_result = ours.predict(image, **kwargs, return_logits=True)
    assert max_diff(torch.from_numpy(onnx.masks), torch_result.masks) <= PREDICTOR_TOLERANCE
    assert max_diff(torch.from_numpy(onnx.iou_predictions), torch_result.iou_predictions) <= PREDICTOR_TOLERANCE


@torch.no_grad()
def test_official_files_convert_and_load(tmp_path):
    official, ours = _pair("small_quadratic")
    checkpoint = tmp_path / "efficientvit_sam_small.pt"
    torch.save(official.state_dict(), checkpoint)
    report = convert_checkpoint(checkpoint, tmp_path / "out")
    for path in (checkpoint, report.written[0]):
        loaded = load_sam(path, fast=False)
        assert isinstance(loaded, EfficientViTSAM) and loaded.config == SMALL_QUADRATIC
        assert torch.equal(loaded.encode(_pixels(128)), ours.encode(_pixels(128)))
