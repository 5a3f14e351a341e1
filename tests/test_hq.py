"""HQ-SAM as an adapter: parity with `segment_anything_hq` 0.3, exact eject, weights, training safety.

Tolerance: max abs difference <= TOLERANCE (1e-4) in fp32 on the early ViT embedding, the HQ features, mask
logits and IoU predictions. "Bit-identical" checks use `torch.equal`.
"""

import dataclasses

import pytest
import safetensors.torch as safetensors_torch
import torch
from refiners.fluxion.layers.chain import ChainError
from safetensors import safe_open

from finesam.adapters.hq import HQSAMAdapter
from finesam.adapters.hq.layers import CONTEXT, HQFeatureFusion, HQMaskFeatures, HQMaskPrediction, HQTokenMLP
from finesam.fast import apply_fast_paths, has_fast_paths
from finesam.fast.hq import HQMaskPrediction as FastHQMaskPrediction
from finesam.model import PRESETS, SegmentAnything
from finesam.model.prompts import Prompts
from finesam.weights import CheckpointError, convert_checkpoint, holds_hq, load_hq, load_sam, save_hq, save_sam
from finesam.weights.hq import convert_hq_state_dict, is_hq_key
from finesam.weights.loading import sam_from_state_dict

from conftest import PHOTOS, SMALL, TOLERANCE, inject_after_the_model_moved, inject_moved_adapter, max_diff
from helpers import assert_matches_official_hq_predictor, with_adapter
from official import build_official, random_official

GRID, MASK = SMALL.embedding_size, SMALL.mask_input_size


@pytest.fixture(scope="module")
def official_hq():
    return build_official(SMALL, seed=1, hq=True)


@pytest.fixture(params=["reference", "fast"])
def hq(request, official_hq) -> tuple[SegmentAnything, HQSAMAdapter]:
    """The HQ parity tests run on the reference chains and on the fast paths."""
    model, adapter = with_adapter(official_hq, fast=request.param == "fast")
    return model, adapter.inject()


def image_tensor(seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(seed))


def prompt_kinds(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    points = torch.rand(1, 3, 2, generator=g) * SMALL.image_size
    labels = torch.tensor([[1, 0, 1]])
    boxes = (torch.rand(3, 2, 2, generator=g) * SMALL.image_size).sort(dim=1).values.reshape(3, 4)
    return {
        "points": {"points": points, "labels": labels},
        "box": {"boxes": boxes[:1]},
        "points+box": {"points": points, "labels": labels, "boxes": boxes[:1]},
        "batch of boxes": {"boxes": boxes},
        "box+mask": {"boxes": boxes[:1], "mask_input": torch.randn(1, 1, MASK, MASK, generator=g) * 5},
    }


def official_decode(official, embedding, interm, prompt, multimask: bool, hq_only: bool):
    points = None if "points" not in prompt else (prompt["points"], prompt["labels"])
    sparse, dense = official.prompt_encoder(points=points, boxes=prompt.get("boxes"), masks=prompt.get("mask_input"))
    return official.mask_decoder(
        image_embeddings=embedding,
        image_pe=official.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        hq_token_only=hq_only,
        interm_embeddings=interm,
    )


def hq_head(adapter: HQSAMAdapter) -> HQMaskPrediction:
    heads = {
        id(m): m for placed in adapter.placed_adapters for m in placed.modules() if isinstance(m, HQMaskPrediction)
    }
    assert len(heads) == 1
    return next(iter(heads.values()))


def injected_head(official_hq, upscaled: torch.Tensor, hq_features: torch.Tensor):
    """The HQ head of an adapter injected in a model whose `hq_sam` context holds `upscaled` and `hq_features`
    (what the decoder writes there before the head runs)."""
    model, adapter = with_adapter(official_hq)
    adapter.inject()
    model.set_context(CONTEXT, {"upscaled_embedding": upscaled, "hq_features": hq_features})
    return adapter, hq_head(adapter)


@pytest.mark.parametrize("hq_batch", [1, 3])
def test_hq_mask_prediction_is_the_official_formula_with_gradients(official_hq, hq_batch):
    """The reference head: w . (mask_features(u) + f), the official formula, in values and gradients (training
    goes through it), for a batch of prompts on one image or on three."""
    g = torch.Generator().manual_seed(0)
    channels, size, dim = SMALL.decoder.prompt_dim // 8, 4 * GRID, SMALL.decoder.prompt_dim
    tokens = torch.randn(3, 7, dim, generator=g, requires_grad=True)
    upscaled = torch.randn(3, channels, size, size, generator=g)
    hq_features = torch.randn(hq_batch, channels, size, size, generator=g)
    _, prediction = injected_head(official_hq, upscaled, hq_features)
    features, token_mlp = prediction.ensure_find(HQMaskFeatures), prediction.ensure_find(HQTokenMLP)
    parameters = [tokens, *features.parameters(), *token_mlp.parameters()]

    def outputs_and_gradients(logits: torch.Tensor) -> list[torch.Tensor]:
        loss = (logits * torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)).sum()
        return [logits, *torch.autograd.grad(loss, parameters)]

    hq_token = 1 + SMALL.decoder.num_mask_tokens  # after the IoU and mask tokens
    weights = token_mlp(tokens[:, hq_token : hq_token + 1])
    expected = outputs_and_gradients(
        (weights @ (features(upscaled) + hq_features).flatten(2)).reshape(3, 1, size, size)
    )
    actual = outputs_and_gradients(prediction(tokens, upscaled))
    assert actual[0].shape == (3, 1, size, size)
    for a, e in zip(actual, expected, strict=True):
        assert max_diff(a, e) <= 1e-5 * max(1.0, e.abs().max().item())


@pytest.mark.parametrize("hq_batch", [1, 3])
@pytest.mark.parametrize("band_rows", [64, 24, 1])
def test_folded_hq_mask_product_equals_the_reference_head(official_hq, hq_batch, band_rows):
    """The fast head (`finesam.fast.hq`): the dot product folded into the last convolution, computed in bands of
    rows, gives the reference head's values at inference: in one band (64 rows here), uneven bands and bands of
    one row; with gradients it is the reference head."""
    g = torch.Generator().manual_seed(0)
    channels, size = SMALL.decoder.prompt_dim // 8, 4 * GRID
    tokens = torch.randn(3, 7, SMALL.decoder.prompt_dim, generator=g)
    upscaled = torch.randn(3, channels, size, size, generator=g)
    hq_features = torch.randn(hq_batch, channels, size, size, generator=g)
    adapter, top = injected_head(official_hq, upscaled, hq_features)
    prediction = top
    with torch.no_grad():
        expected = top(tokens, upscaled)
    with_gradients = top(tokens, upscaled)
    assert apply_fast_paths(*adapter.placed_adapters) >= 1 and type(prediction) is FastHQMaskPrediction
    prediction.band_rows = band_rows
    with torch.no_grad():
        actual = top(tokens, upscaled)
    assert max_diff(actual, expected) <= 1e-5 * max(1.0, expected.abs().max().item())
    assert not torch.equal(actual, expected)  # the folded product ran (another rounding)
    again = top(tokens, upscaled)  # with gradients: the reference formula (its GELU may round differently)
    assert again.requires_grad and max_diff(again, with_gradients) <= 1e-6


@torch.no_grad()
def test_early_embedding_and_hq_features_match(official_hq, hq):
    model, _ = hq
    pixels = image_tensor(0, batch=2)
    embedding, interm = official_hq.image_encoder(pixels)
    ours = model.encode(pixels)
    assert max_diff(ours, embedding) <= TOLERANCE
    assert max_diff(model.image_features()["early_embedding"], interm[0]) <= TOLERANCE
    decoder = official_hq.mask_decoder
    expected = decoder.embedding_encoder(embedding) + decoder.compress_vit_feat(interm[0].permute(0, 3, 1, 2))
    assert expected.std() > 0.1
    assert max_diff(model.ensure_find(HQFeatureFusion)(ours), expected) <= TOLERANCE


@pytest.mark.parametrize("kind", list(prompt_kinds(0)))
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("hq_only", [True, False])
@torch.no_grad()
def test_decoder_matches_official_hq(official_hq, hq, kind, multimask, hq_only):
    model, adapter = hq
    adapter.hq_mask_only = hq_only
    pixels = image_tensor(1)
    embedding, interm = official_hq.image_encoder(pixels)
    prompt = prompt_kinds(2)[kind]
    expected_masks, expected_iou = official_decode(official_hq, embedding, interm, prompt, multimask, hq_only)
    masks, iou = model.decode(model.encode(pixels), Prompts(**prompt), multimask_output=multimask)
    assert masks.shape == expected_masks.shape == (len(masks), 1, MASK, MASK)
    assert expected_masks.abs().max() > 0.5
    assert max_diff(masks, expected_masks) <= TOLERANCE
    assert max_diff(iou, expected_iou) <= TOLERANCE


@pytest.mark.parametrize("name", ["landscape", "portrait"])
@pytest.mark.parametrize("hq_only", [True, False])
def test_predict_matches_official_hq_predictor(official_hq, hq, name, hq_only):
    model, adapter = hq
    assert_matches_official_hq_predictor(official_hq, model, adapter, PHOTOS[name](), hq_only)


def test_full_size_vit_b_hq_matches_official(official_vit_b_hq_square):
    official, predictor = official_vit_b_hq_square
    model, adapter = with_adapter(official, fast=True)  # as load_sam and load_hq give it
    adapter.inject()
    assert_matches_official_hq_predictor(predictor, model, adapter, PHOTOS["square"](), False, multimasks=(True,))


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
@torch.no_grad()
def test_hq_weights_for_each_size(name):
    """HQ keys of every official size convert, and the fusion and decoder agree with the official ones."""
    official = random_official(name, seed=3, hq=True)
    model, adapter = with_adapter(official)
    assert model.config == PRESETS[name]
    adapter.inject()
    g = torch.Generator().manual_seed(4)
    embedding = torch.randn(1, 256, 64, 64, generator=g)
    early = torch.randn(1, 64, 64, model.config.encoder.dim, generator=g)
    model.use_context("image")["early_embedding"] = early
    features = model.ensure_find(HQFeatureFusion)(embedding)
    decoder = official.mask_decoder
    expected = decoder.embedding_encoder(embedding) + decoder.compress_vit_feat(early.permute(0, 3, 1, 2))
    assert max_diff(features, expected) <= TOLERANCE
    box = {"boxes": torch.tensor([[100.0, 200.0, 700.0, 900.0]])}
    expected_masks, expected_iou = official_decode(official, embedding, [early], box, True, False)
    masks, iou = model.decode(
        embedding, Prompts(**box), multimask_output=True, image_features={"early_embedding": early}
    )
    assert max_diff(masks, expected_masks) <= TOLERANCE
    assert max_diff(iou, expected_iou) <= TOLERANCE


def snapshot(model: SegmentAnything, image) -> tuple[str, dict[str, torch.Tensor], list[torch.Tensor]]:
    embedding = model.encode_image(image)
    w, h = image.size
    outputs = [
        model.predict(embedding, boxes=[0.1 * w, 0.1 * h, 0.7 * w, 0.9 * h], return_logits=True).masks,
        model.predict(embedding, points=[[0.4 * w, 0.3 * h]], multimask_output=True, return_logits=True).masks,
    ]
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}, outputs


def assert_same_snapshot(a, b) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    assert all(torch.equal(a[1][k], b[1][k]) for k in a[1])
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2], strict=True))


def test_eject_restores_the_base_exactly(official_hq):
    model, adapter = with_adapter(official_hq)
    image = PHOTOS["small landscape"]()
    before = snapshot(model, image)
    for _ in range(3):
        adapter.inject()
        with_hq = snapshot(model, image)
        assert with_hq[0] != before[0]
        assert not torch.equal(with_hq[2][0], before[2][0][:, :1])
        adapter.eject()
        assert_same_snapshot(snapshot(model, image), before)
    assert set(model.provider.contexts) == {"image", "sam", "mask_decoder"}
    assert model.provider.contexts["image"] == {}


def test_training_the_adapter_leaves_the_base_untouched(official_hq):
    model, adapter = with_adapter(official_hq)
    image = PHOTOS["portrait"]()
    before = snapshot(model, image)
    model.requires_grad_(False)
    adapter.inject()
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter.parameters()} and len(trainable) == 25
    hq_before = {k: v.clone() for k, v in adapter.state_dict().items()}
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    pixels = image_tensor(7)
    with torch.no_grad():
        embedding = model.encode(pixels)
    features = model.image_features()
    masks, _ = model.decode(
        embedding, Prompts(boxes=torch.tensor([[20.0, 30.0, 200.0, 180.0]])), image_features=features
    )
    masks.sigmoid().mean().backward()
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters() if p.requires_grad)
    optimizer.step()
    assert any(not torch.equal(hq_before[k], v) for k, v in adapter.state_dict().items())
    adapter.eject()
    with torch.no_grad():
        assert_same_snapshot(snapshot(model, image), before)


def test_two_adapters_on_two_models_do_not_share_state(official_hq):
    other = build_official(SMALL, seed=2, hq=True)
    model_a, adapter_a = with_adapter(official_hq)
    model_b, adapter_b = with_adapter(other)
    adapter_a.inject()
    adapter_b.inject()
    adapter_b.hq_mask_only = True
    assert not adapter_a.hq_mask_only
    assert not {id(p) for p in adapter_a.parameters()} & {id(p) for p in adapter_b.parameters()}
    image = PHOTOS["square"]()
    assert_matches_official_hq_predictor(official_hq, model_a, adapter_a, image, False, multimasks=(False,))
    assert_matches_official_hq_predictor(other, model_b, adapter_b, image, True, multimasks=(False,))


def test_switching_hq_mask_only_while_injected(official_hq, hq):
    model, adapter = hq
    pixels = image_tensor(3)
    embedding, interm = official_hq.image_encoder(pixels)
    prompt = prompt_kinds(4)["box"]
    ours_embedding = model.encode(pixels)
    for hq_only in (True, False, True):
        adapter.hq_mask_only = hq_only
        expected, _ = official_decode(official_hq, embedding, interm, prompt, False, hq_only)
        assert max_diff(model.decode(ours_embedding, Prompts(**prompt))[0], expected) <= TOLERANCE


def test_cached_embeddings_across_inject_and_eject(official_hq):
    model, adapter = with_adapter(official_hq)
    image = PHOTOS["landscape"]()
    plain = model.encode_image(image)
    adapter.inject()
    with pytest.raises(Exception, match="encoded without the adapter that computes it"):
        model.predict(plain, boxes=[100, 100, 900, 900])
    with_hq = model.encode_image(image)
    assert "early_embedding" in with_hq.features
    hq_masks = model.predict(with_hq, boxes=[100, 100, 900, 900]).masks
    assert torch.equal(model.predict(image, boxes=[100, 100, 900, 900]).masks, hq_masks)
    adapter.eject()
    # an embedding made with HQ is still valid for the base model: the extra features are simply unused
    assert torch.equal(
        model.predict(with_hq, boxes=[100, 100, 900, 900]).masks, model.predict(plain, boxes=[100, 100, 900, 900]).masks
    )


def test_adapter_weights_file_round_trip(tmp_path, official_hq, hq):
    model, adapter = hq
    path = save_hq(adapter, tmp_path / "small.hq.safetensors")
    assert path.stat().st_size < 2 * sum(p.numel() * 4 for p in adapter.parameters())  # only the adapter's weights
    fresh_model = sam_from_state_dict(official_hq.state_dict())
    if has_fast_paths(model):
        apply_fast_paths(fresh_model)  # load_hq follows its model
    fresh = load_hq(fresh_model, path).inject()
    assert fresh.state_dict().keys() == adapter.state_dict().keys()
    image = PHOTOS["square"]()
    assert torch.equal(
        fresh_model.predict(image, boxes=[10, 10, 500, 600], return_logits=True).masks,
        model.predict(image, boxes=[10, 10, 500, 600], return_logits=True).masks,
    )


def test_adapter_files_of_finesam_0_1_load_under_todays_names(tmp_path, official_hq, hq):
    """Files written when the early-feature stack was named `CompressViTFeatures` load, to the same weights."""
    model, adapter = hq
    path = save_hq(adapter, tmp_path / "now.hq.safetensors")
    tensors, metadata = safetensors_torch.load_file(path), safe_open(path, "pt").metadata()
    old = {k.replace("CompressEarlyFeatures.", "CompressViTFeatures."): v for k, v in tensors.items()}
    assert old.keys() != tensors.keys()
    safetensors_torch.save_file(old, tmp_path / "old.hq.safetensors", metadata)
    adapter.eject()
    loaded = load_hq(model, tmp_path / "old.hq.safetensors")
    state = loaded.state_dict()
    assert state.keys() == tensors.keys() and all(torch.equal(state[k], tensors[k]) for k in tensors)


def test_adapter_weights_errors(tmp_path, official_hq, hq):
    model, adapter = hq
    path = save_hq(adapter, tmp_path / "small.hq.safetensors")
    wider = SegmentAnything(dataclasses.replace(SMALL, encoder=dataclasses.replace(SMALL.encoder, dim=128)))
    with pytest.raises(
        CheckpointError, match=r"early embedding width 128.*CompressEarlyFeatures\.ConvTranspose2d_1\.weight \(64"
    ):
        load_hq(wider, path)
    with pytest.raises(ValueError, match="already has an HQ-SAM adapter injected"):
        load_hq(model, path)
    adapter.eject()
    with pytest.raises(CheckpointError, match="not a finesam HQ-SAM file"):
        load_hq(model, save_sam(model, tmp_path / "base.safetensors"))
    plain_sam = tmp_path / "plain.pth"
    torch.save({k: v for k, v in official_hq.state_dict().items() if not is_hq_key(k)}, plain_sam)
    with pytest.raises(CheckpointError, match="has no HQ-SAM weights"):
        load_hq(model, plain_sam)


def test_convert_official_hq_checkpoint(tmp_path, official_hq):
    state_dict = official_hq.state_dict()
    hq_checkpoint, sam_checkpoint = tmp_path / "sam_hq_small.pth", tmp_path / "sam_small.pth"
    torch.save(state_dict, hq_checkpoint)
    torch.save({k: v for k, v in state_dict.items() if not is_hq_key(k)}, sam_checkpoint)
    alone = convert_checkpoint(hq_checkpoint, tmp_path / "alone")
    assert alone.written == [
        tmp_path / "alone" / "sam_hq_small.safetensors",
        tmp_path / "alone" / "sam_hq_small.hq.safetensors",
    ]
    assert alone.same_base_as == [] and "matches no SAM file" in alone.summary()
    out = tmp_path / "out"
    convert_checkpoint(sam_checkpoint, out)
    report = convert_checkpoint(hq_checkpoint, out)
    assert report.same_base_as == [out / "sam_small.safetensors"]
    assert "only" in report.summary() and "sam_hq_small.hq.safetensors" in report.summary()
    assert holds_hq(hq_checkpoint) and not holds_hq(sam_checkpoint)
    adapter = load_hq(load_sam(hq_checkpoint), hq_checkpoint)
    assert adapter is not None and not adapter.injected
    converted = load_hq(sam_from_state_dict(state_dict), report.written[1])
    assert all(torch.equal(converted.state_dict()[k], v) for k, v in adapter.state_dict().items())


def test_adapter_cannot_be_injected_twice_or_called(official_hq):
    model, adapter = with_adapter(official_hq)
    second = HQSAMAdapter(model)
    adapter.inject()
    with pytest.raises(RuntimeError, match="already injected"):
        adapter.inject()
    with pytest.raises(ValueError, match="already has an HQ-SAM adapter injected"):
        second.inject()
    with pytest.raises(TypeError, match="not called directly"):
        adapter(torch.zeros(1))
    adapter.eject()
    with pytest.raises(RuntimeError, match="not injected"):
        adapter.eject()


def test_adapter_built_before_the_model_moved_says_how_to_fix_it(official_hq):
    model, adapter = with_adapter(official_hq)
    pixels, prompt = image_tensor(0).bfloat16(), prompt_kinds(0)["box"]
    inject_after_the_model_moved(
        model,
        adapter,
        r"float32 on meta but the mask decoder they join is torch.float32 on cpu",
        r"float32 on cpu but the mask decoder they join is torch.bfloat16 on cpu: move the",
    )
    # torch words the dtype mismatch per kernel: "Input type (c10::BFloat16) and bias type (float) should be the
    # same" (convolution), "expected scalar type BFloat16 but found Float" (transposed convolution, which the HQ
    # fusion meets first)
    with pytest.raises(ChainError, match=r"BFloat16.*(should be the same|but found Float)"):
        model.decode(model.encode(pixels), Prompts(**prompt))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.decode(model.encode(pixels), Prompts(**prompt))[0].isfinite().all()
    inject_moved_adapter(adapter)
    logits, iou = model.decode(model.encode(pixels), Prompts(**prompt))
    assert logits.dtype == torch.bfloat16 and logits.isfinite().all() and iou.isfinite().all()


def test_hq_features_are_computed_once_per_image_and_reused(official_hq):
    model, adapter = with_adapter(official_hq)
    adapter.inject()
    calls: list[int] = []
    model.ensure_find(HQFeatureFusion).register_forward_hook(lambda *_: calls.append(1))
    image_a, image_b = PHOTOS["landscape"](), PHOTOS["square"]()
    a, b = model.encode_image(image_a), model.encode_image(image_b)
    first = model.predict(a, boxes=[100, 100, 900, 900], return_logits=True)
    assert len(calls) == 1 and "hq_features" in a.features
    again = model.predict(a, boxes=[100, 100, 900, 900], return_logits=True)
    more = model.predict(a, points=[[500, 400]], multimask_output=True, return_logits=True)
    assert len(calls) == 1  # reused for every later prompt of image a
    uncached = model.encode_image(image_a)
    assert torch.equal(again.masks, first.masks)
    assert torch.equal(
        model.predict(uncached, points=[[500, 400]], multimask_output=True, return_logits=True).masks, more.masks
    )
    calls.clear()
    fresh_b = model.predict(b, boxes=[10, 10, 500, 500], return_logits=True)  # another image: its own features
    assert len(calls) == 1
    assert torch.equal(
        fresh_b.masks, model.predict(model.encode_image(image_b), boxes=[10, 10, 500, 500], return_logits=True).masks
    )


def test_hq_feature_cache_follows_the_weights(official_hq):
    model, adapter = with_adapter(official_hq)
    adapter.inject()
    image = PHOTOS["portrait"]()
    embedding = model.encode_image(image)
    before = model.predict(embedding, boxes=[50, 50, 400, 600], return_logits=True).masks
    fusion = model.ensure_find(HQFeatureFusion)
    with torch.no_grad():
        for p in fusion.parameters():
            p.mul_(1.5)  # in place, as an optimizer step
    after = model.predict(embedding, boxes=[50, 50, 400, 600], return_logits=True).masks
    assert not torch.equal(after, before)
    assert torch.equal(
        after, model.predict(model.encode_image(image), boxes=[50, 50, 400, 600], return_logits=True).masks
    )
    adapter.eject()
    other = HQSAMAdapter(model)  # same base, other HQ weights
    other.load_state_dict(convert_hq_state_dict(build_official(SMALL, seed=9, hq=True).state_dict(), other))
    other.inject()
    # an embedding cached with one adapter never feeds its features to another
    assert torch.equal(
        model.predict(embedding, boxes=[50, 50, 400, 600], return_logits=True).masks,
        model.predict(model.encode_image(image), boxes=[50, 50, 400, 600], return_logits=True).masks,
    )
