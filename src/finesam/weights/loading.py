"""SAM weights: an official `state_dict` or `.pth`, a Hugging Face checkpoint, or a finesam `.safetensors` file, to a
`SegmentAnything`."""

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from finesam.fast import apply_fast_paths
from finesam.model.config import SAMConfig
from finesam.model.sam import SegmentAnything, build_sam
from finesam.weights.hf import DEFAULT_DECODER_HEADS, hf_name, read_official
from finesam.weights.hq import has_hq_keys, hq_from_state_dict, save_hq
from finesam.weights.io import (
    FORMAT_KEY,
    FORMATS,
    CheckpointError,
    check_readable,
    check_tensors,
    format_metadata,
    read_format,
    read_safetensors,
    write_safetensors,
)
from finesam.weights.layouts import layout_for
from finesam.weights.mobilesamv2 import grid_note, pair_with_decoder, read_prompt_guided_decoder
from finesam.weights.sam_keys import convert_state_dict, infer_config, is_unused_key

FORMAT_SAM = "sam"


def sam_from_state_dict(
    state_dict: Mapping[str, Tensor], device: torch.device | str = "cpu", decoder_heads: int = DEFAULT_DECODER_HEADS
) -> SegmentAnything:
    """A `SegmentAnything` holding the SAM weights of an official `state_dict` of any size (the converter's
    in-memory form; files go through `load_sam`).

    The HQ-SAM keys of an HQ-SAM checkpoint are left aside (its SAM part is a complete SAM), and so is the
    unused classifier head of TinyViT checkpoints.

    Args:
        state_dict: official keys.
        device: where the model goes.
        decoder_heads: the decoder's attention heads, which the shapes do not show (8 in every official release;
            HF checkpoints state theirs).

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: a missing, unexpected or mis-shaped key, named.
    """
    model = build_sam(infer_config(state_dict, decoder_heads), device="meta")
    weights = convert_state_dict(state_dict, model, ignore=lambda k: has_hq_keys([k]) or is_unused_key(k))
    return _assign(model, weights, device)


def _assign(model: SegmentAnything, weights: Mapping[str, Tensor], device: torch.device | str) -> SegmentAnything:
    """Puts loaded tensors into a model built on `meta`, and rebuilds the buffers checkpoints do not store."""
    expected = model.state_dict()  # float64 / float16 files take the model's dtype (assign would keep theirs)
    model.load_state_dict({k: v.to(device=device, dtype=expected[k].dtype) for k, v in weights.items()}, assign=True)
    model.image_encoder.rebuild_buffers(device)  # the family's hook (TinyViT: its attention-bias index tables)
    meta = [name for name, buffer in model.named_buffers() if buffer.is_meta]
    assert not meta, f"buffers left on the meta device: {meta}"
    return model.eval()


def weights_digest(state_dict: Mapping[str, Tensor]) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of every tensor: equal digests, equal weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(f"{key}|{tensor.dtype}|{tuple(state_dict[key].shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# official tensors a converted file keeps beside the model's, under their official names (`read_kept`)
KEPT_PREFIX = "official."


def save_sam(model: SegmentAnything, path: str | Path, kept: Mapping[str, Tensor] | None = None) -> Path:
    """Writes the model's weights and configuration to a safetensors file, atomically.

    Args:
        model: the base model (adapters ejected: their weights go to files of their own).
        path: the file to write.
        kept: official tensors the model does not build, kept in the file under their official names (SAM 2's
            video memory); the weights digest covers the model's weights alone.

    Returns:
        `path`.
    """
    state_dict = model.state_dict()
    metadata = format_metadata(FORMAT_SAM, config=model.config.to_dict(), weights_sha256=weights_digest(state_dict))
    extra = {f"{KEPT_PREFIX}{key}": tensor for key, tensor in (kept or {}).items()}
    return write_safetensors({**state_dict, **extra}, path, metadata)


def read_kept(path: str | Path) -> dict[str, Tensor]:
    """The official tensors a converted SAM file keeps beside the model's (see `save_sam`), by official name.

    Raises:
        CheckpointError: the file is unreadable or not a finesam SAM file.
    """
    tensors, _ = read_format(path, FORMAT_SAM)
    return {k.removeprefix(KEPT_PREFIX): v for k, v in tensors.items() if k.startswith(KEPT_PREFIX)}


def _model_tensors(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v for k, v in tensors.items() if not k.startswith(KEPT_PREFIX)}


def load_sam(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, fast: bool = True
) -> SegmentAnything:
    """Loads a SAM of any size from a converted `.safetensors` file, an official `.pth` / `.pt` (SAM, MobileSAM,
    SAM 2 / 2.1, or the SAM part of HQ-SAM; its HQ part loads with `load_hq`) or a Hugging Face `SamModel` /
    `SamHQModel` / `Sam2Model` checkpoint.

    Args:
        path: the weights file, or the folder of a Hugging Face checkpoint.
        device: where the model goes.
        dtype: the image encoder's precision (e.g. `torch.bfloat16`, see `SegmentAnything.set_encoder_dtype`);
            the decoder stays float32.
        fast: with the fast paths of inference swapped in (`finesam.fast`); False for the reference chains
            alone (what training and export run anyway).

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: the file is unreadable, unsafe to unpickle, or does not hold SAM weights.
    """
    path = Path(path)
    if (official := read_official(path)) is not None:
        try:
            with official.own_names():
                model = sam_from_state_dict(official.state_dict, device, official.decoder_heads)
        except CheckpointError as e:  # the layout's problems, named with the file they are in
            raise CheckpointError(f"{path}: {e}") from None
    else:
        declared, sections = read_format(path, FORMAT_SAM, tensors=False)
        if "config" not in sections:
            raise CheckpointError(f"{path}: not a finesam SAM file (no 'finesam.config' metadata)")
        try:
            config = SAMConfig.from_dict(sections["config"])
        except ValueError as e:
            raise CheckpointError(f"{path}: bad 'finesam.config' metadata: {e}") from None
        model = build_sam(config, device="meta")
        # shapes from the header first: a crafted file is refused before any tensor is mapped
        check_tensors(path, _model_tensors(declared), model.state_dict(), what="the model in its metadata")
        tensors, _ = read_format(path, FORMAT_SAM)
        model = _assign(model, _model_tensors(tensors), device)
    if fast:
        apply_fast_paths(model)
    return model if dtype is None else model.set_encoder_dtype(dtype)


@dataclass(frozen=True)
class ConversionReport:
    written: list[Path]  # the base model, then the HQ adapter if the checkpoint has one
    base_digest: str
    same_base_as: list[Path]  # finesam SAM files beside the output with identical base weights
    dropped: list[str]  # checkpoint keys SAM does not use (TinyViT's classifier head, HF's second positional matrix)
    kept: int = 0  # official tensors the image model does not use, kept in the file (SAM 2's video memory)
    replaced: int = 0  # the encoder checkpoint's prompt encoder and decoder tensors, replaced by a decoder file's
    notes: tuple[str, ...] = ()  # what else a user should know about the converted model

    def summary(self) -> str:
        note = f"dropped {len(self.dropped)} unused keys ({', '.join(self.dropped)}); " if self.dropped else ""
        if self.kept:
            note += f"kept {self.kept} tensors of the video memory beside the image model (read_kept); "
        if self.replaced:
            note += f"the checkpoint's own prompt encoder and mask decoder ({self.replaced} tensors) left out; "
        note += "".join(f"{n}; " for n in self.notes)
        return note + self._base_summary()

    def _base_summary(self) -> str:
        if len(self.written) == 1:
            return f"SAM weights sha256 {self.base_digest}"
        if self.same_base_as:
            others = ", ".join(str(p) for p in self.same_base_as)
            return f"the SAM part equals {others}: with that file, only {self.written[1]} is needed"
        return (
            f"the SAM part (sha256 {self.base_digest}) matches no SAM file in {self.written[0].parent}; "
            "convert the plain SAM release there to compare"
        )


def _digest_of(path: Path) -> str | None:
    try:
        return read_format(path, FORMAT_SAM, tensors=False)[1].get("weights_sha256")
    except ValueError:
        return None  # another kind of file (HQ, LoRA) or unreadable: not a base to compare with


def _finesam_kind(path: Path) -> str | None:
    """The `finesam.format` of a finesam file (`sam`, `hq_sam`, `lora`, ...), None for any other file."""
    try:
        return read_safetensors(path, tensors=False)[1].get(FORMAT_KEY)
    except CheckpointError:
        return None


def convert_checkpoint(
    checkpoint: str | Path, out_dir: str | Path, decoder: str | Path | None = None
) -> ConversionReport:
    """`CHECKPOINT.pth` -> `OUT_DIR/CHECKPOINT.safetensors`, plus `OUT_DIR/CHECKPOINT.hq.safetensors` for HQ-SAM;
    a Hugging Face checkpoint takes its folder's name (`sam-vit-base/` -> `OUT_DIR/sam-vit-base.safetensors`).
    With `decoder` (MobileSAMv2's `Prompt_guided_Mask_Decoder.pt`), the checkpoint's image encoder and that
    decoder become one SAM, `OUT_DIR/mobilesamv2_CHECKPOINT.safetensors` (`finesam.weights.mobilesamv2`).

    Args:
        checkpoint: an official checkpoint of a registered encoder family (SAM, HQ-SAM, MobileSAM, SlimSAM, ...),
            SAM 2 / 2.1, or a Hugging Face `SamModel` / `SamHQModel` / `Sam2Model` checkpoint (its folder, or its
            `model.safetensors` with `config.json` beside it); with `decoder`, also an image encoder's weights
            alone (MobileSAMv2's encoder files).
        out_dir: where the converted files go (created if needed).
        decoder: MobileSAMv2's prompt-guided decoder file, to pair with the checkpoint's image encoder.

    Returns:
        What was written, and whether its SAM part equals a SAM file already in `out_dir`.

    Raises:
        CheckpointError: the checkpoint is unreadable, unsafe to unpickle, or not a SAM / HQ-SAM checkpoint.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    official = read_official(checkpoint)
    if official is None:
        check_readable(checkpoint)
        kind = _finesam_kind(checkpoint)
        if kind is not None and decoder is not None:
            raise CheckpointError(
                f"{checkpoint}: a finesam {FORMATS.get(kind, kind)} file; a decoder pairs with the official checkpoint "
                "of an encoder (the .pth / .pt it was converted from)"
            )
        if kind is not None:
            raise CheckpointError(
                f"{checkpoint}: already a finesam {FORMATS.get(kind, kind)} file; it needs no conversion (give it "
                "to the commands as it is)"
            )
        raise CheckpointError(f"{checkpoint}: not an official checkpoint (.pth, .pt, .bin) nor a Hugging Face one")
    state_dict, replaced, notes = official.state_dict, 0, ()
    name = hf_name(checkpoint) if official.hf else checkpoint.stem
    if decoder is not None:
        try:
            pairing = pair_with_decoder(state_dict, read_prompt_guided_decoder(decoder))
        except CheckpointError as e:
            raise CheckpointError(f"{checkpoint} + {decoder}: {e}") from None
        state_dict, replaced, name = pairing.state_dict, len(pairing.replaced), f"mobilesamv2_{name}"
    try:
        with official.own_names():
            model = sam_from_state_dict(state_dict, decoder_heads=official.decoder_heads)
            hq = hq_from_state_dict(model, state_dict) if has_hq_keys(state_dict) else None
    except CheckpointError as e:  # the layout's problems, named with the file they are in
        raise CheckpointError(f"{checkpoint}{f' + {decoder}' if decoder else ''}: {e}") from None
    if decoder is not None:
        notes = tuple(grid_note(model.config.embedding_size))
    base = out_dir / f"{name}.safetensors"
    keeps = layout_for(state_dict).kept
    kept = {k: v for k, v in state_dict.items() if keeps(k)}
    written = [save_sam(model, base, kept)]
    if hq is not None:
        written.append(save_hq(hq, out_dir / f"{name}.hq.safetensors"))
    digest = _digest_of(base)  # computed once, by save_sam
    assert digest is not None
    same = [other for other in sorted(out_dir.glob("*.safetensors")) if other != base and _digest_of(other) == digest]
    dropped = sorted(k for k in state_dict if is_unused_key(k) and k not in kept) + official.dropped
    return ConversionReport(written, digest, same, dropped, len(kept), replaced, notes)
