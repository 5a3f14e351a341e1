"""Every registered encoder family through the same checks, and `finesam models` listing them.

A family is tested by registering it and saying here how to make an official-format checkpoint of it
(`OFFICIAL`): built from the official package with a seed where one exists, small enough for CI. The checks:
each preset builds (on meta); official weights convert, load and give the official encoder's outputs, its
HQ-SAM tap included; every LoRA preset adapts layers of it and ejects bit-exactly; the encoder traces to
ONNX; it runs in bf16.
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import onnxruntime
import pytest
import torch
from torch import Tensor

from finesam.adapters.hq import HQAdapter, HQSAMAdapter, hq_adapter_class, hq_adapter_for
from finesam.adapters.lora import TARGETS, SAMLoraAdapter
from finesam.model import PRESETS, SAMConfig, SegmentAnything
from finesam.model.config import TinyViTConfig, describe
from finesam.model.families.slimsam import SlimSAMConfig
from finesam.model.mask_decoder import MaskDecoder
from finesam.model.prompts import Prompts
from finesam.model.registry import EncoderFamily, families, family_of, register_family
from finesam.model.sam import build_sam
from finesam.weights.layouts import layout_for, layout_of
from finesam.weights.loading import sam_from_state_dict

import edge_sam_reference
import official_efficient_sam
from conftest import SMALL, TOLERANCE, assert_model_unchanged, max_diff, model_snapshot
from edge_sam_reference import tempered_state_dict
from helpers import finesam
from official import OFFICIAL_BUILDERS, build_official, narrow_official_tiny_vit
from official_efficientvit import SMALL_L as SMALL_EFFICIENTVIT
from official_efficientvit import build_official_efficientvit, official_encoder_outputs
from official_sam2 import build_official_sam2

# an official checkpoint, the official encoder as a function of the pixels (-> embedding, HQ-SAM's early
# embedding), and the input size
Official = tuple[dict[str, Tensor], Callable[[Tensor], tuple[Tensor, Tensor]], int]


def _sam_package(config: SAMConfig) -> Official:
    """A ViT-shaped family from the official HQ-SAM package (its encoder also returns the early embedding)."""
    official = build_official(config, seed=0, hq=True)
    encoder = official.image_encoder
    return official.state_dict(), lambda x: (lambda y: (y[0], y[1][0]))(encoder(x)), config.image_size


def _tiny_vit() -> Official:
    """A narrow official TinyViT (`official.narrow_official_tiny_vit`: it only runs at 1024); the decoder keys are
    SAM's."""
    encoder = narrow_official_tiny_vit(0)
    decoder = build_official(SMALL, seed=0).state_dict()
    state_dict = {k: v for k, v in decoder.items() if not k.startswith("image_encoder.")}
    state_dict |= {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    return state_dict, lambda x: (lambda y: (y[0], y[1][0]))(encoder(x)), 1024


# how to make an official-format checkpoint of each family; a registered family without one fails the tests
def _sam2() -> Official:
    """SAM 2.1 Hiera-T from Meta's sam2 package (a released size: the layout reads its configuration from the
    shapes), at 1024; its early embedding is stage 1's output (channels-last, 4x the embedding grid)."""
    official = build_official_sam2("sam2.1_hiera_tiny")

    def encode(pixels: Tensor) -> tuple[Tensor, Tensor]:
        out = official.image_encoder(pixels)
        embedding = out["vision_features"] + official.no_mem_embed.reshape(1, -1, 1, 1)
        return embedding, official.image_encoder.trunk(pixels)[0].permute(0, 2, 3, 1)

    return official.state_dict(), encode, 1024


def _edge_sam() -> Official:
    """EdgeSAM (RepViT-m1, its only architecture) in the official key layout from the fixture's recipe
    (tests/data/edge_sam/keys.json), with tempered residual branches; there is no official package, so the
    encoder is the functional reference written from the fixture's description (tests/edge_sam_reference.py),
    itself checked against the official outputs in tests/test_edge_sam.py."""
    state_dict = tempered_state_dict()
    return state_dict, lambda x: edge_sam_reference.reference_encoder(state_dict, x), 1024


def _efficient_sam() -> Official:
    """EfficientSAM in the official layout with the weights of its fixture's recipe (there is no installable
    package): a narrow ViT (64 wide, 3 blocks, 64-channel decoder) at 1024; the official encoder is the functional
    one `tests/test_efficient_sam.py` holds equal to the stored official embedding."""
    state_dict = official_efficient_sam.official_shaped(dim=64, depth=3, prompt_dim=64)
    return state_dict, official_efficient_sam.reference_encoder(state_dict, heads=1), 1024


def _efficientvit() -> Official:
    """A narrow EfficientViT-SAM of the L structure (efficientsam's code) at its 512 input; its early embedding is
    stage 2's output, at the 64 x 64 embedding grid of the 1024 prompt frame."""
    official = build_official_efficientvit(SMALL_EFFICIENTVIT)
    return official.state_dict(), lambda x: official_encoder_outputs(official, x), 512


OFFICIAL: dict[str, Callable[[], Official]] = {
    "vit": lambda: _sam_package(SMALL),
    "tiny_vit": _tiny_vit,
    "slimsam": lambda: _sam_package(
        SAMConfig(
            SlimSAMConfig(dim=48, mlp_dim=100, depth=4, heads=4, global_attention_blocks=(1, 3), window_size=6),
            image_size=256,
        )
    ),
    "hiera": _sam2,
    "edge_sam": _edge_sam,
    "efficient_sam": _efficient_sam,
    "efficientvit": _efficientvit,
}


def _hq_adapter_class(family: EncoderFamily) -> type[HQAdapter]:
    return hq_adapter_class(build_sam(family.presets[0], device="meta"))


# families whose early embedding HQ-SAM (1) fuses: those whose HQ adapter is HQSAMAdapter or a decoder variant's
# subclass of it, whichever model class brings the decoder (SAM 2's HQ adapter is another one)
HQ_TAP = {name for name, family in families().items() if issubclass(_hq_adapter_class(family), HQSAMAdapter)}

FAMILIES = list(families())


@functools.cache
def _official(name: str) -> Official:
    if name not in OFFICIAL:
        raise AssertionError(f"family {name!r} is registered: say in OFFICIAL how to make its official checkpoint")
    return OFFICIAL[name]()


def _model(name: str) -> SegmentAnything:
    return sam_from_state_dict(_official(name)[0])


def _pixels(size: int, seed: int = 0) -> Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _pixels_and_box(name: str) -> tuple[Tensor, Prompts]:
    """Encoder input pixels at the family's official input size, and a box inside them."""
    pixels = _pixels(_official(name)[2])
    size = pixels.shape[-1]
    return pixels, Prompts(boxes=torch.tensor([[0.1 * size, 0.2 * size, 0.7 * size, 0.9 * size]]))


def test_every_family_has_an_official_checkpoint_maker_and_a_layout():
    assert set(OFFICIAL) == set(families())
    for name, family in families().items():
        layout = layout_of(name)
        assert {c.preset for c in layout.checkpoints} <= {p.name for p in family.presets}
    assert list(PRESETS) == [p.name for f in families().values() for p in f.presets]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_preset_builds(name):
    family = families()[name]
    assert family.presets
    for preset in family.presets:
        model = build_sam(preset, device="meta")
        assert isinstance(model, family.model or SegmentAnything)
        assert isinstance(model.image_encoder, family.encoder) and family_of(preset.encoder) is family
        assert sum(p.numel() for p in model.image_encoder.parameters()) > 0
        assert SAMConfig.from_dict(preset.to_dict()) == preset and PRESETS[preset.name] is preset
        assert describe(preset).startswith(f"SAM {preset.name} (")


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_official_weights_convert_load_and_match(name):
    state_dict, official, size = _official(name)
    assert layout_for(state_dict).family == name
    model = _model(name)
    assert family_of(model.config.encoder).name == name
    encoder = model.image_encoder
    captured: list[Any] = []
    hook = encoder.early_embedding_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        embedding = encoder(_pixels(size))
    finally:
        hook.remove()
    expected, expected_early = official(_pixels(size))
    grid = model.config.embedding_size  # the encoder's input may be smaller than the prompt frame (EfficientViT)
    assert embedding.shape == (1, model.config.decoder.prompt_dim, grid, grid)
    assert max_diff(embedding, expected) <= TOLERANCE
    (early,) = captured
    assert early.shape[-1] == encoder.early_embedding_dim == model.config.encoder.early_embedding_dim
    assert max_diff(early, expected_early) <= TOLERANCE
    if name not in HQ_TAP:
        return
    # HQ-SAM's tap: channels-last at the embedding grid
    assert early.shape == (1, grid, grid, encoder.early_embedding_dim)
    # and HQ-SAM's adapter finds that tap by itself and keeps it with the embedding
    adapter = hq_adapter_for(model)
    assert isinstance(adapter, HQSAMAdapter)
    adapter.inject()
    try:
        assert max_diff(model.encode(_pixels(size)), expected) <= TOLERANCE
        assert max_diff(model.image_features()["early_embedding"], expected_early) <= TOLERANCE
    finally:
        adapter.eject()


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_every_lora_preset_adapts_the_family_and_ejects_exactly(name):
    model = _model(name)
    pixels, box = _pixels_and_box(name)
    embedding = model.encode(pixels)
    # an encoder preset changes the embedding, a decoder preset the masks of a fixed embedding
    stages: dict[bool, Callable[[], tuple[Tensor, ...]]] = {
        True: lambda: (model.encode(pixels),),
        False: lambda: model.decode(embedding, box, multimask_output=True),
    }
    before = {on_encoder: run() for on_encoder, run in stages.items()}
    snapshot = model_snapshot(model)
    encoder = type(model.image_encoder).__name__
    selected = {}
    for target, include in TARGETS.items():
        adapter = SAMLoraAdapter(model, name=target, rank=2, include=include)
        selected[target] = set(adapter.paths)
        assert adapter.paths, f"LoRA preset {target!r} adapts no layer of the {name} family"
        on_encoder = target.startswith("encoder")
        # the encoder presets adapt the family's own layers, and nothing outside the encoder
        assert all(path.startswith(f"{encoder}.") for path in adapter.paths) == on_encoder
        for lora in adapter.loras:
            torch.nn.init.normal_(lora.up.weight, std=0.5)  # a trained LoRA: the outputs change
        adapter.inject()
        changed = stages[on_encoder]()
        assert any(not torch.equal(a, b) for a, b in zip(changed, before[on_encoder], strict=True))
        adapter.eject()
        assert_model_unchanged(model, snapshot)
        assert all(torch.equal(a, b) for a, b in zip(stages[on_encoder](), before[on_encoder], strict=True))
    assert selected["encoder_attention"] < selected["encoder"]
    assert selected["decoder"] < selected["decoder_all"]


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_every_family_takes_its_hq_adapter_and_ejects_exactly(name):
    # the generic path: `hq_adapter_for` picks the generation by the model's mask decoder, the adapter finds the
    # family's tap by itself; trained HQ weights change the mask, and ejecting gives the base back bit for bit
    model = _model(name)
    pixels, box = _pixels_and_box(name)

    embedding = model.encode(pixels)
    before, snapshot = model.decode(embedding, box), model_snapshot(model)
    adapter = hq_adapter_for(model)
    assert isinstance(adapter, _hq_adapter_class(families()[name]))
    generator = torch.Generator().manual_seed(0)
    for parameter in adapter.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)  # trained weights
    adapter.inject()
    try:
        hq_masks, hq_iou = model.decode(model.encode(pixels), box)  # HQ-SAM 1 fuses an early map: encoded again
        assert hq_masks.shape == before[0].shape and hq_iou.shape == before[1].shape
        assert not torch.equal(hq_masks, before[0])
    finally:
        adapter.eject()
    assert_model_unchanged(model, snapshot)
    assert all(torch.equal(a, b) for a, b in zip(model.decode(embedding, box), before, strict=True))


@torch.no_grad()
def test_a_family_decoder_that_subclasses_sams_takes_hq_sam():
    # a future family's model whose decoder subclasses SAM's (for its own rules) gets HQ-SAM by the decoder's
    # ancestry, with nothing registered for it
    class OwnDecoder(MaskDecoder):
        pass

    class OwnModel(SegmentAnything):
        decoder_class = OwnDecoder

    model = OwnModel(SMALL).eval()
    assert hq_adapter_class(model) is HQSAMAdapter
    pixels, box = _pixels(SMALL.image_size), Prompts(boxes=torch.tensor([[20.0, 30.0, 200.0, 220.0]]))
    before = model.decode(model.encode(pixels), box)
    adapter = hq_adapter_for(model)
    for parameter in adapter.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    adapter.inject()
    assert not torch.equal(model.decode(model.encode(pixels), box)[0], before[0])
    adapter.eject()
    assert all(torch.equal(a, b) for a, b in zip(model.decode(model.encode(pixels), box), before, strict=True))


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_the_encoder_traces_to_onnx(name, tmp_path):
    model = _model(name)
    pixels = _pixels(_official(name)[2])
    path = tmp_path / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on sizes it records as constants
        torch.onnx.export(model.image_encoder, (pixels,), str(path), opset_version=17, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})
    assert max_diff(torch.from_numpy(np.asarray(output)), model.image_encoder(pixels)) <= 10 * TOLERANCE


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16:UserWarning")
@torch.no_grad()
def test_the_encoder_runs_in_bf16(name):
    pixels = _pixels(_official(name)[2])
    reference = _model(name).encode(pixels)
    bf16 = _model(name).set_encoder_dtype(torch.bfloat16)
    assert bf16.image_encoder.dtype == torch.bfloat16
    embedding = bf16.encode(pixels)
    assert embedding.dtype == torch.float32  # handed to the decoder in its precision
    cosine = torch.nn.functional.cosine_similarity(embedding.flatten(), reference.flatten(), dim=0)
    assert cosine >= 0.999


def test_registering_checks_the_family():
    vit = families()["vit"]
    with pytest.raises(ValueError, match="'vit' is registered already"):
        register_family(vit)

    @dataclasses.dataclass(frozen=True)
    class Other(TinyViTConfig):
        pass

    other: Any = dataclasses.replace(vit, name="other", config=Other, presets=(PRESETS["vit_tiny"],), lora_targets={})
    with pytest.raises(ValueError) as error:
        register_family(other)
    for problem in ("Other.family must be 'other'", "lora_targets must name", "'vit_tiny' exists already"):
        assert problem in str(error.value)
    assert "other" not in families()


def test_an_unregistered_encoder_config_is_refused_with_a_clear_error():
    @dataclasses.dataclass(frozen=True)
    class Unregistered:
        family: ClassVar[str] = "unregistered"
        patch_size: int = 16

    config = SAMConfig(encoder=Unregistered())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be one of the registered families' \(ViTConfig, TinyViTConfig"):
        SegmentAnything(config, device="meta")
    with pytest.raises(ValueError, match="unknown encoder family 'unregistered' \\(one of vit, tiny_vit"):
        SAMConfig.from_dict(config.to_dict())
    with pytest.raises(ValueError, match="encoder must be an encoder family's config"):
        SAMConfig(encoder=object())  # type: ignore[arg-type]


def _rows(stdout: str) -> dict[str, str]:
    """The output lines of `finesam models` by their first word: a preset name, or a family header with its
    colon (a family and its preset may share a name: `edge_sam`)."""
    return {line.split()[0]: line for line in stdout.splitlines() if line.strip()}


def test_models_lists_every_family_preset_its_parameters_input_size_and_official_files_with_licences():
    result = finesam("models")
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    for family in families().values():
        assert rows[f"{family.name}:"].startswith(f"{family.name}: {family.title}")
        files = layout_of(family.name).checkpoints
        for preset in family.presets:
            row = rows[preset.name]
            # parameters: all, the image encoder's, the prompt encoder's and mask decoder's; the encoder's input size
            model = build_sam(preset, device="meta")
            encoder = sum(p.numel() for p in model.image_encoder.parameters())
            rest = sum(p.numel() for p in model.parameters()) - encoder
            numbers = [f"{encoder + rest:,}", f"{encoder:,}", f"{rest:,}", str(model.encoder_input_size)]
            assert row.split()[1:5] == numbers, row
            assert preset.encoder.describe() in row
            for checkpoint in (c for c in files if c.preset == preset.name):
                assert f"{checkpoint.filename} ({checkpoint.licence})" in row
    # the encoders' inputs of the releases: EfficientViT-SAM's L models encode at 512 (prompts in the 1024 frame)
    assert rows["efficientvit_sam_l0"].split()[4] == "512" and rows["efficientvit_sam_xl0"].split()[4] == "1024"
    assert rows["vit_b"].split()[4] == "1024" and rows["sam2.1_hiera_tiny"].split()[4] == "1024"
    # the official files, as their releases name them, with the licences their publishers state
    assert "sam_vit_b_01ec64.pth (Apache-2.0)" in rows["vit_b"] and "sam_hq_vit_b.pth (Apache-2.0)" in rows["vit_b"]
    assert "mobile_sam.pt (Apache-2.0)" in rows["vit_tiny"] and "sam_hq_vit_tiny.pth" in rows["vit_tiny"]
    assert "SlimSAM-77-uniform.pth (Apache-2.0)" in rows["vit_p77"]
    assert "edge_sam.pth (S-Lab-1.0 (non-commercial))" in rows["edge_sam"]
    assert "edge_sam_3x.pth (S-Lab-1.0 (non-commercial))" in rows["edge_sam_3x"]
    # the parameter counts are the official models': in all, the image encoder's, the prompt encoder's and decoder's
    for name in ("vit_b", "vit_h"):
        with torch.device("meta"):
            official = OFFICIAL_BUILDERS[name]()
        encoder = sum(p.numel() for p in official.image_encoder.parameters())
        rest = sum(p.numel() for m in (official.prompt_encoder, official.mask_decoder) for p in m.parameters())
        assert rows[name].split()[1:4] == [f"{encoder + rest:,}", f"{encoder:,}", f"{rest:,}"]
    # the decoders that pair with an encoder: MobileSAMv2's, and the families whose encoders it takes
    decoder = rows["Prompt_guided_Mask_Decoder.pt"].strip()
    assert decoder.startswith("Prompt_guided_Mask_Decoder.pt (Apache-2.0): MobileSAMv2's prompt-guided decoder")
    assert "pairs with the encoders of vit, tiny_vit, slimsam" in decoder and "hiera" not in decoder
