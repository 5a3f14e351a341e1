"""Reading and writing weights safely: `torch.load(weights_only=True)`, memory-mapped safetensors, atomic writes."""

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from finesam.conversion import CheckpointError, convert_state_dict, infer_config
from finesam.model.config import SAMConfig, preset_name
from finesam.model.sam import SegmentAnything

FORMAT_KEY, FORMAT_SAM = "finesam.format", "sam"
CONFIG_KEY = "finesam.config"
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Calls `write` on a temporary file beside `path`, then renames it: `path` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_official_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of an official `.pth` checkpoint, refusing anything but plain weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load; it holds Python objects other than tensors, and finesam only reads plain "
            f"weights (torch.load weights_only=True). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if isinstance(loaded, Mapping) and not any(isinstance(v, Tensor) for v in loaded.values()):
        loaded = next((loaded[k] for k in ("model", "state_dict") if isinstance(loaded.get(k), Mapping)), loaded)
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return dict(loaded)


def build_from_official(state_dict: Mapping[str, Tensor], device: torch.device | str = "cpu") -> SegmentAnything:
    """A `SegmentAnything` holding the weights of an official `state_dict` (any size)."""
    config = infer_config(state_dict)
    model = SegmentAnything(config, device="meta")
    weights = convert_state_dict(state_dict, model)
    return _assign(model, weights, device)


def _assign(model: SegmentAnything, weights: Mapping[str, Tensor], device: torch.device | str) -> SegmentAnything:
    model.load_state_dict({k: v.to(device) for k, v in weights.items()}, assign=True)
    return model.eval()


def save_sam(model: SegmentAnything, path: str | Path) -> Path:
    """Writes the model's weights and configuration to a safetensors file, atomically."""
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {FORMAT_KEY: FORMAT_SAM, CONFIG_KEY: json.dumps(model.config.to_dict())}
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (memory-mapped read)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None


def load_sam(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> SegmentAnything:
    """Loads a converted `.safetensors` file or an official `.pth` checkpoint."""
    path = Path(path)
    if path.suffix in OFFICIAL_SUFFIXES:
        model = build_from_official(load_official_state_dict(path), device)
    else:
        tensors, metadata = read_safetensors(path)
        if metadata.get(FORMAT_KEY) != FORMAT_SAM or CONFIG_KEY not in metadata:
            raise CheckpointError(f"{path}: not a finesam SAM file (no '{FORMAT_KEY}: {FORMAT_SAM}' metadata)")
        model = SegmentAnything(SAMConfig.from_dict(json.loads(metadata[CONFIG_KEY])), device="meta")
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        misshaped = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
        if missing or unexpected or misshaped:
            raise CheckpointError(
                f"{path}: weights do not match the model in its metadata; "
                f"missing {missing[:8]}, unexpected {unexpected[:8]}, mis-shaped {misshaped[:8]}"
            )
        model = _assign(model, tensors, device)
    return model if dtype is None else model.to(dtype=dtype)


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> list[Path]:
    """`CHECKPOINT.pth` -> `OUT_DIR/CHECKPOINT.safetensors`; returns the written paths."""
    checkpoint = Path(checkpoint)
    model = build_from_official(load_official_state_dict(checkpoint))
    return [save_sam(model, Path(out_dir) / f"{checkpoint.stem}.safetensors")]


def describe(model: SegmentAnything) -> str:
    config = model.config
    return f"SAM {preset_name(config)} (ViT {config.encoder_dim}x{config.encoder_depth}, input {config.image_size})"
