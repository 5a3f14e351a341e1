"""Building, loading, saving and converting SAM weights (official `.pth` or finesam `.safetensors`)."""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from finesam.conversion import CheckpointError, convert_state_dict, infer_config, is_unused_key
from finesam.hq.adapter import HQSAMAdapter
from finesam.hq.weights import convert_hq_state_dict, is_hq_key, save_hq
from finesam.io import (
    CONFIG_KEY,
    FORMAT_KEY,
    OFFICIAL_SUFFIXES,
    atomic_write,
    check_tensors,
    load_official_state_dict,
    read_safetensors,
    write_safetensors,
)
from finesam.model.config import SAMConfig, preset_name
from finesam.model.sam import SegmentAnything
from finesam.model.tiny_vit import BiasedAttention

FORMAT_SAM = "sam"
DIGEST_KEY = "finesam.weights_sha256"

__all__ = [
    "CheckpointError",
    "ConversionReport",
    "atomic_write",
    "build_from_official",
    "convert_checkpoint",
    "load_official_state_dict",
    "load_sam",
    "save_sam",
]


def build_from_official(state_dict: Mapping[str, Tensor], device: torch.device | str = "cpu") -> SegmentAnything:
    """A `SegmentAnything` holding the SAM weights of an official `state_dict` (any size).

    The HQ-SAM keys of an HQ-SAM checkpoint are left aside (its SAM part is a complete SAM), and so is the
    unused classifier head of TinyViT checkpoints.
    """
    model = SegmentAnything(infer_config(state_dict), device="meta")
    weights = convert_state_dict(state_dict, model, ignore=lambda k: is_hq_key(k) or is_unused_key(k))
    return _assign(model, weights, device)


def _assign(model: SegmentAnything, weights: Mapping[str, Tensor], device: torch.device | str) -> SegmentAnything:
    """Puts loaded tensors into a model built on `meta`, and rebuilds the buffers checkpoints do not store."""
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, assign=True)
    for module in model.modules():
        if isinstance(module, BiasedAttention):
            module.rebuild_buffers(device)
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


def save_sam(model: SegmentAnything, path: str | Path) -> Path:
    """Writes the model's weights and configuration to a safetensors file, atomically."""
    state_dict = model.state_dict()
    metadata = {
        FORMAT_KEY: FORMAT_SAM,
        CONFIG_KEY: json.dumps(model.config.to_dict()),
        DIGEST_KEY: weights_digest(state_dict),
    }
    return write_safetensors(state_dict, path, metadata)


def load_sam(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> SegmentAnything:
    """Loads a converted `.safetensors` file or an official SAM / HQ-SAM `.pth` checkpoint (its SAM part).

    `dtype` (e.g. `torch.bfloat16`) is the image encoder's precision, see `SegmentAnything.set_encoder_dtype`.
    """
    path = Path(path)
    if path.suffix in OFFICIAL_SUFFIXES:
        model = build_from_official(load_official_state_dict(path), device)
    else:
        tensors, metadata = read_safetensors(path)
        if metadata.get(FORMAT_KEY) != FORMAT_SAM or CONFIG_KEY not in metadata:
            raise CheckpointError(f"{path}: not a finesam SAM file (no '{FORMAT_KEY}: {FORMAT_SAM}' metadata)")
        model = SegmentAnything(SAMConfig.from_dict(json.loads(metadata[CONFIG_KEY])), device="meta")
        check_tensors(path, tensors, model.state_dict(), what="the model in its metadata")
        model = _assign(model, tensors, device)
    return model if dtype is None else model.set_encoder_dtype(dtype)


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[SegmentAnything, HQSAMAdapter | None]:
    """The model of any weights file, and its HQ adapter (not injected) when the file is an HQ-SAM `.pth`."""
    path = Path(path)
    if path.suffix not in OFFICIAL_SUFFIXES:
        return load_sam(path, device), None
    return from_official_state_dict(load_official_state_dict(path), device)


def from_official_state_dict(
    state_dict: Mapping[str, Tensor], device: torch.device | str = "cpu"
) -> tuple[SegmentAnything, HQSAMAdapter | None]:
    """The model of an official state_dict, and its HQ adapter (not injected) when it has HQ-SAM keys."""
    model = build_from_official(state_dict, device)
    if not any(is_hq_key(k) for k in state_dict):
        return model, None
    adapter = HQSAMAdapter(model)
    adapter.load_state_dict(convert_hq_state_dict(state_dict, adapter))
    return model, adapter


@dataclass(frozen=True)
class ConversionReport:
    written: list[Path]  # the base model, then the HQ adapter if the checkpoint has one
    base_digest: str
    same_base_as: list[Path]  # finesam SAM files beside the output with identical base weights
    dropped: list[str]  # checkpoint keys SAM does not use (TinyViT's classifier head)

    def summary(self) -> str:
        note = f"dropped {len(self.dropped)} unused keys ({', '.join(self.dropped)}); " if self.dropped else ""
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


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> ConversionReport:
    """`CHECKPOINT.pth` -> `OUT_DIR/CHECKPOINT.safetensors`, plus `OUT_DIR/CHECKPOINT.hq.safetensors` for HQ-SAM."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    state_dict = load_official_state_dict(checkpoint)
    model, adapter = from_official_state_dict(state_dict)
    base = out_dir / f"{checkpoint.stem}.safetensors"
    written = [save_sam(model, base)]
    if adapter is not None:
        written.append(save_hq(adapter, out_dir / f"{checkpoint.stem}.hq.safetensors"))
    digest = read_safetensors(base, tensors=False)[1][DIGEST_KEY]
    same = [
        other
        for other in sorted(out_dir.glob("*.safetensors"))
        if other != base and read_safetensors(other, tensors=False)[1].get(DIGEST_KEY) == digest
    ]
    return ConversionReport(written, digest, same, sorted(k for k in state_dict if is_unused_key(k)))


def describe(model: SegmentAnything) -> str:
    config = model.config
    encoder = (
        f"TinyViT {'/'.join(map(str, config.tiny_dims))}"
        if config.encoder_type == "tiny_vit"
        else f"ViT {config.encoder_dim}x{config.encoder_depth}"
    )
    return f"SAM {preset_name(config)} ({encoder}, input {config.image_size})"
