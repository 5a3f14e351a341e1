"""MobileSAMv2's prompt-guided decoder (`Prompt_guided_Mask_Decoder.pt`) paired with an encoder of a registered
family: converted into one finesam file and loaded, it equals the official SAM 1 modules (`segment_anything`'s
`PromptEncoder` and `MaskDecoder`, which MobileSAMv2's code copies unchanged: its `simple_type` path only skips
repeating an embedding it was given already repeated) loaded with the same tensors, as MobileSAMv2's
`Inference.py` assembles them, on seeded random weights. Tolerance: TOLERANCE (1e-4), fp32, at model level and
through the predictor. Files that are not such a decoder, encoders that do not fit it and the YOLOv8 prompter are
refused with clear errors."""

import functools
import http.server
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from finesam.model.prompts import Prompts
from finesam.weights import CheckpointError, convert_checkpoint, load_sam
from finesam.weights.download import CHECKPOINTS
from finesam.weights.mobilesamv2 import read_prompt_guided_decoder

from conftest import SMALL, TOLERANCE, max_diff, photo
from helpers import assert_matches_official_predictor, finesam
from official import _EncoderOnly as EncoderOnly
from official import build_official, narrow_official_tiny_vit, perturb, segment_anything

DECODER_SEED = 7


def _official_decoder(grid: int, image_size: int, dim: int = 256) -> tuple[Any, Any]:
    """MobileSAMv2's `build_PromptGuidedDecoder` (SAM 1's modules at its sizes) with seeded, perturbed weights."""
    modeling = segment_anything.modeling
    torch.manual_seed(DECODER_SEED)
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size), mask_in_chans=16
    )
    mask_decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8),
        transformer_dim=dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    perturb(prompt_encoder, DECODER_SEED)
    perturb(mask_decoder, DECODER_SEED + 1)
    return prompt_encoder.eval(), mask_decoder.eval()


def _save_decoder(path: Path, prompt_encoder: Any, mask_decoder: Any) -> Path:
    # the official file: a dict of the two state dicts, under the official (mis)spelling
    torch.save({"PromtEncoder": prompt_encoder.state_dict(), "MaskDecoder": mask_decoder.state_dict()}, path)
    return path


def _paired(official: Any, prompt_encoder: Any, mask_decoder: Any) -> Any:
    """The official model as `Inference.py` assembles it: an encoder, then the decoder file's two modules."""
    return segment_anything.modeling.Sam(
        image_encoder=official.image_encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


@functools.cache
def _vit() -> tuple[Any, dict[str, Tensor]]:
    """A small official HQ-SAM ViT: its own decoder and HQ tensors are what the pairing replaces (its encoder
    also returns the early embedding, which the pair does not use)."""
    official = build_official(SMALL, seed=1, hq=True)
    official.image_encoder = EncoderOnly(official.image_encoder)
    return official, {k.replace(".encoder.", ".", 1): v for k, v in official.state_dict().items()}


@functools.cache
def _tiny_vit() -> tuple[Any, dict[str, Any]]:
    """A narrow official TinyViT (as in test_families: it only runs at 1024), saved as MobileSAMv2's encoder file is
    read (`{'model': TinyViT keys}`, no prefix)."""
    encoder = narrow_official_tiny_vit(2)
    return types.SimpleNamespace(image_encoder=EncoderOnly(encoder)), {"model": encoder.state_dict()}


ENCODERS: dict[str, tuple[Any, int]] = {"vit": (_vit, SMALL.image_size), "tiny_vit": (_tiny_vit, 1024)}


@functools.cache
def _decoder_file(tmp: Path, size: int) -> tuple[Path, Any, Any]:
    prompt_encoder, mask_decoder = _official_decoder(size // 16, size)
    return _save_decoder(tmp / f"Prompt_guided_Mask_Decoder_{size}.pt", prompt_encoder, mask_decoder), *(
        prompt_encoder,
        mask_decoder,
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mobilesamv2")


def _convert(folder: Path, name: str) -> tuple[Any, Any, Path]:
    """(the official pair, our converted and loaded model, the converted file)."""
    make, size = ENCODERS[name]
    official, checkpoint = make()
    encoder_file = folder / f"{name}_encoder.pt"
    torch.save(checkpoint, encoder_file)
    decoder, prompt_encoder, mask_decoder = _decoder_file(folder, size)
    report = convert_checkpoint(encoder_file, folder / "out", decoder=decoder)
    (written,) = report.written
    assert written.name == f"mobilesamv2_{name}_encoder.safetensors"
    return _paired(official, prompt_encoder, mask_decoder), load_sam(written), written


@pytest.mark.parametrize("name", list(ENCODERS))
@torch.no_grad()
def test_the_converted_pair_equals_the_official_modules(folder, name):
    official, model, _ = _convert(folder, name)
    size = ENCODERS[name][1]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    embedding = official.image_encoder(pixels)
    assert max_diff(model.encode(pixels), embedding) <= TOLERANCE
    # MobileSAMv2's use: a batch of detector boxes, one mask each (multimask_output=False)
    boxes = torch.tensor([[0.1, 0.2, 0.7, 0.9], [0.3, 0.1, 0.6, 0.5], [0.0, 0.0, 1.0, 1.0]]) * size
    sparse, dense = official.prompt_encoder(points=None, boxes=boxes, masks=None)
    pe = official.prompt_encoder.get_dense_pe()
    for multimask in (False, True):
        masks, iou = official.mask_decoder(embedding, pe, sparse, dense, multimask_output=multimask)
        ours, our_iou = model.decode(embedding, Prompts(boxes=boxes), multimask_output=multimask)
        assert ours.shape == masks.shape and max_diff(ours, masks) <= TOLERANCE
        assert max_diff(our_iou, iou) <= TOLERANCE
    # `predict_masks_simple`: the embedding already repeated per box, paired one to one
    masks, iou = official.mask_decoder(embedding, pe, sparse, dense, multimask_output=False)
    ours, our_iou = model.decode(embedding.expand(3, -1, -1, -1), Prompts(boxes=boxes))
    assert max_diff(ours, masks) <= TOLERANCE and max_diff(our_iou, iou) <= TOLERANCE
    # clicks with a mask input: every input of the prompt encoder is the official one's
    points = torch.tensor([[[0.4, 0.5], [0.8, 0.2]]]) * size
    labels = torch.tensor([[1, 0]])
    mask_input = torch.randn(1, 1, 4 * size // 16, 4 * size // 16, generator=torch.Generator().manual_seed(1))
    sparse, dense = official.prompt_encoder(points=(points, labels), boxes=None, masks=mask_input)
    masks, iou = official.mask_decoder(embedding, pe, sparse, dense, multimask_output=True)
    prompts = Prompts(points=points, labels=labels, mask_input=mask_input)
    ours, our_iou = model.decode(embedding, prompts, multimask_output=True)
    assert max_diff(ours, masks) <= TOLERANCE and max_diff(our_iou, iou) <= TOLERANCE


@torch.no_grad()
def test_the_converted_pair_equals_the_official_predictor(folder):
    official, model, _ = _convert(folder, "vit")
    assert_matches_official_predictor(official, model, photo("chelsea"))


def test_the_report_names_what_the_pair_replaced(folder, capsys):
    _, _, written = _convert(folder, "vit")
    decoder, *_ = _decoder_file(folder, SMALL.image_size)
    result = finesam("convert", folder / "vit_encoder.pt", "--decoder", decoder, "--out", folder / "cli")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(folder / "cli" / written.name)]
    # the encoder file's own prompt encoder and decoder, HQ-SAM's tensors included, are left out, said so
    _, checkpoint = _vit()
    replaced = sum(k.startswith(("prompt_encoder.", "mask_decoder.")) for k in checkpoint)
    assert f"decoder ({replaced} tensors) left out" in result.stderr
    assert "was trained on 64 x 64" in result.stderr  # the small test encoder's 16 x 16 grid


def test_the_decoder_file_is_read_key_for_key(folder):
    decoder, prompt_encoder, mask_decoder = _decoder_file(folder, SMALL.image_size)
    tensors = read_prompt_guided_decoder(decoder)
    expected = {f"prompt_encoder.{k}": v for k, v in prompt_encoder.state_dict().items()}
    expected |= {f"mask_decoder.{k}": v for k, v in mask_decoder.state_dict().items()}
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], v) for k, v in expected.items())


def _refused(folder: Path, decoder: Path, encoder: Path | None = None) -> str:
    if encoder is None:
        encoder = folder / "vit_encoder.pt"
        torch.save(_vit()[1], encoder)
    with pytest.raises(CheckpointError) as error:
        convert_checkpoint(encoder, folder / "refused", decoder=decoder)
    assert not (folder / "refused").exists() or not any((folder / "refused").iterdir())
    return str(error.value)


def test_a_file_that_is_not_the_decoder_is_refused(folder):
    # a whole SAM checkpoint given as the decoder
    sam = folder / "sam.pth"
    torch.save(_vit()[1], sam)
    message = _refused(folder, sam)
    assert "not MobileSAMv2's prompt-guided decoder" in message and "give it as the encoder" in message
    assert "'PromtEncoder' and 'MaskDecoder'" in message
    # a section that is not a state dict
    odd = folder / "odd.pt"
    torch.save({"PromtEncoder": {"weight": torch.zeros(1)}, "MaskDecoder": [torch.zeros(1)]}, odd)
    assert "'MaskDecoder' is not a state dict" in _refused(folder, odd)
    # a missing tensor is named
    _, prompt_encoder, mask_decoder = _decoder_file(folder, SMALL.image_size)
    partial = {k: v for k, v in mask_decoder.state_dict().items() if k != "iou_token.weight"}
    torch.save({"PromtEncoder": prompt_encoder.state_dict(), "MaskDecoder": partial}, folder / "partial.pt")
    message = _refused(folder, folder / "partial.pt")
    assert "mask_decoder.iou_token.weight" in message and "missing" in message


def test_a_converted_file_as_the_encoder_is_refused(folder):
    _, _, written = _convert(folder, "vit")
    message = _refused(folder, _decoder_file(folder, SMALL.image_size)[0], encoder=written)
    assert "a finesam SAM file; a decoder pairs with the official checkpoint of an encoder" in message


def test_a_decoder_of_another_width_is_refused(folder):
    prompt_encoder, mask_decoder = _official_decoder(16, 256, dim=128)
    decoder = _save_decoder(folder / "narrow.pt", prompt_encoder, mask_decoder)
    message = _refused(folder, decoder)
    assert "does not fit MobileSAMv2's decoder: its embedding has 256 channels" in message
    assert "the decoder takes 128" in message


def test_an_encoder_of_a_family_with_its_own_decoder_is_refused(folder):
    # a SAM 2 checkpoint, as far as the layouts look (its Hiera trunk)
    sam2 = folder / "sam2.pt"
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}}, sam2)
    message = _refused(folder, _decoder_file(folder, SMALL.image_size)[0], encoder=sam2)
    assert "hiera family" in message and "has a mask decoder of its own" in message
    assert "pairs with the encoders of vit, tiny_vit, slimsam" in message


class DetectionModel(torch.nn.Module):
    """Stands in for ultralytics' YOLOv8 model class (the prompter file pickles one whole)."""


def test_the_yolov8_prompter_is_refused(folder, monkeypatch):
    module = types.ModuleType("ultralytics.nn.tasks")
    DetectionModel.__module__ = module.__name__
    module.DetectionModel = DetectionModel  # type: ignore[attr-defined]
    for name in ("ultralytics", "ultralytics.nn", "ultralytics.nn.tasks"):
        monkeypatch.setitem(sys.modules, name, module if name.endswith("tasks") else types.ModuleType(name))
    prompter = folder / "ObjectAwareModel.pt"
    torch.save({"model": DetectionModel(), "train_args": {}}, prompter)
    monkeypatch.undo()  # the class is no longer importable: only a full unpickle would look for it
    with pytest.raises(CheckpointError) as error:
        load_sam(prompter)
    for message in (_refused(folder, prompter), str(error.value)):
        assert "refused to load" in message and "ultralytics.nn.tasks.DetectionModel" in message
        assert "MobileSAMv2's object-aware prompter" in message and "finesam segment --manifest" in message
    result = finesam("convert", prompter, "--out", folder / "cli_refused")
    assert result.returncode != 0 and "object-aware prompter" in result.stderr


def test_the_catalogue_offers_the_decoder_file_and_download_leaves_it_for_pairing(folder, tmp_path):
    checkpoint = CHECKPOINTS["mobilesamv2_decoder"]
    assert checkpoint.url == (
        "https://github.com/ChaoningZhang/MobileSAM/raw/master/MobileSAMv2/PromptGuidedDecoder/"
        "Prompt_guided_Mask_Decoder.pt"
    )
    assert checkpoint.filename == "Prompt_guided_Mask_Decoder.pt"
    assert checkpoint.licence == "Apache-2.0" and checkpoint.decoder and checkpoint.preset is None
    # `finesam download` fetches it (from a mirror here) and, a decoder alone, says how to pair it
    served = tmp_path / "served"
    served.mkdir()
    decoder, *_ = _decoder_file(folder, SMALL.image_size)
    (served / checkpoint.filename).write_bytes(decoder.read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *_: None  # type: ignore[attr-defined]
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        mirror = f"http://127.0.0.1:{server.server_address[1]}/"
        try:
            result = finesam("download", checkpoint.name, "--dir", tmp_path / "cache", env={"FINESAM_MIRROR": mirror})
        finally:
            server.shutdown()
    assert result.returncode == 0, result.stderr
    path = tmp_path / "cache" / checkpoint.filename
    assert result.stdout.split() == [str(path)] and path.read_bytes() == decoder.read_bytes()
    assert f"finesam convert ENCODER --decoder {path}" in result.stderr
