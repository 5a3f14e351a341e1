"""Safe weight I/O: `torch.load(weights_only=True)`, memory-mapped safetensors, atomic writes."""

import json
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

# the safe writes live below every layer, so that torch-free code has them too; re-exported here
from finesam.files import (  # noqa: F401
    TEMPORARY_PREFIX,
    OutputError,
    atomic_write,
    check_output,
    output_error,
    process_running,
    process_umask,
)
from finesam.text import listing
from finesam.weights.integrity import checkpoint_problem, impostor_problem, safetensors_problem


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not have the expected layout."""


class PickledObjectError(CheckpointError):
    """A checkpoint that holds pickled Python objects (a whole model, say), refused; `global_name` is the first
    class or function it names (`package.module.Class`), where the unpickler said."""

    def __init__(self, message: str, global_name: str | None = None) -> None:
        super().__init__(message)
        self.global_name = global_name


# safetensors metadata: `finesam.format` names the kind of file, `finesam.<section>` holds a JSON value
FORMAT_KEY = "finesam.format"
FORMATS = {
    "sam": "SAM",
    "hq_sam": "HQ-SAM",
    "lora": "LoRA",
    "variant": "variant adapter",
    "embedding_cache": "embedding cache",
}
OFFICIAL_SUFFIXES = (".pth", ".pt", ".bin")


def is_official(path: str | Path) -> bool:
    """Whether `path` names an official (PyTorch pickle) checkpoint rather than a safetensors file."""
    return Path(path).suffix in OFFICIAL_SUFFIXES


def format_metadata(kind: str, **sections: object) -> dict[str, str]:
    """The metadata of a finesam file of `kind` (one of `FORMATS`), each section JSON-encoded."""
    assert kind in FORMATS, kind
    return {FORMAT_KEY: kind, **{f"finesam.{name}": json.dumps(value) for name, value in sections.items()}}


def _section(value: str) -> Any:
    # finesam writes objects, lists and strings; finesam 0.1 wrote the weights digest as a bare string
    # (which could read as a JSON number), so anything else stays the text it is
    if not value.startswith(("{", "[", '"')):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_format(path: str | Path, kind: str, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors (with `tensors=False`: their shapes and dtypes alone, on `meta`) and decoded metadata sections of a
    finesam file of `kind`.

    Raises:
        CheckpointError: the file is unreadable or not of that kind.
    """
    loaded, metadata = read_safetensors(path, tensors)
    if metadata.get(FORMAT_KEY) != kind:
        raise CheckpointError(f"{path}: not a finesam {FORMATS[kind]} file (no '{FORMAT_KEY}: {kind}' metadata)")
    sections = {k.removeprefix("finesam."): _section(v) for k, v in metadata.items() if k != FORMAT_KEY}
    return loaded, sections


WEIGHTS_FORMS = "a converted .safetensors, an official .pth, or a Hugging Face checkpoint folder"


def check_readable(path: Path) -> None:
    """Raises `CheckpointError` with the cause, in one line, when `path` cannot be opened as a weights file: it
    does not exist, a folder on its way is a file, it is a folder or not a regular file, or it may not be read.

    Opened without blocking: a FIFO named as weights is refused, not waited on.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except NotADirectoryError:
        blocking = next((p for p in reversed(path.parents) if p.is_file()), path.parent)
        raise CheckpointError(f"{path}: no such file ({blocking} is a file, not a folder)") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a weights file; expected {WEIGHTS_FORMS}") from None
    except PermissionError:
        raise CheckpointError(f"{path}: cannot be read: permission denied") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read: {e.strerror or e}") from None
    try:
        regular = stat.S_ISREG(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
    if not regular:
        raise CheckpointError(f"{path}: not a regular file (a FIFO or a device?); expected {WEIGHTS_FORMS}")


def dtype_problems(tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> list[str]:
    """The keys whose dtype cannot stand for the model's: integer or bool tensors where it has floating-point
    weights, or the reverse. Floating-point tensors of another precision (float64, float16) are fine: loading
    casts them to the model's dtype.

    Returns:
        `key (dtype, expected dtype)` for each, sorted.
    """
    return [
        f"{key} ({_dtype_name(tensors[key].dtype)}, expected {_dtype_name(expected[key].dtype)})"
        for key in sorted(set(tensors) & set(expected))
        if tensors[key].dtype.is_floating_point != expected[key].dtype.is_floating_point
    ]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_dtypes(path: str | Path, tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> None:
    """Raises `CheckpointError` naming the tensors of a file whose dtype the model cannot take (`dtype_problems`)."""
    if problems := dtype_problems(tensors, expected):
        raise CheckpointError(f"{path}: {len(problems)} tensors of the wrong dtype: {listing(problems, 3)}")


# pickled objects of other projects that people take for SAM weights: what they are, and what to do instead
KNOWN_PICKLES = {
    "ultralytics.": (
        "it is an ultralytics (YOLO) model, such as MobileSAMv2's object-aware prompter ObjectAwareModel.pt: a "
        "detector pickled whole, which finesam does not load; run the detector with ultralytics and give its boxes "
        "to finesam (finesam segment --manifest, docs/mobilesamv2.md)"
    ),
}


def load_pickled_weights(path: str | Path) -> object:
    """What an official `.pth` / `.pt` file holds, read with `torch.load(weights_only=True)` (memory-mapped where the
    format allows): tensors in dicts and lists, never other Python objects.

    Raises:
        PickledObjectError: it holds other Python objects (the first one is named, with what it is when known).
        CheckpointError: the file is unreadable, truncated or not a checkpoint.
    """
    path = Path(path)
    check_readable(path)
    if (problem := checkpoint_problem(path)) is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # torch names the first object it refuses
        global_name = found.group(1) if found else None
        known = next((note for prefix, note in KNOWN_PICKLES.items() if (global_name or "").startswith(prefix)), None)
        raise PickledObjectError(
            f"{path}: refused to load; it holds Python objects other than tensors, and finesam only reads plain "
            f"weights (torch.load weights_only=True). Detail: "
            + (f"it names {global_name}" if global_name else str(e).splitlines()[0])
            + (f"; {known}" if known else ""),
            global_name,
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, IndexError, KeyError, MemoryError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {detail}") from None


def load_official_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of an official `.pth` checkpoint, refusing anything but plain weights (`load_pickled_weights`); a
    state dict under `model` or `state_dict` is taken out."""
    loaded = load_pickled_weights(path)
    if isinstance(loaded, Mapping) and not any(isinstance(v, Tensor) for v in loaded.values()):
        loaded = next((loaded[k] for k in ("model", "state_dict") if isinstance(loaded.get(k), Mapping)), loaded)
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors)")
    return dict(loaded)


def read_safetensors(path: str | Path, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (memory-mapped read). With `tensors=False` the tensors are on
    `meta`: their shapes and dtypes come from the header alone, nothing is read or mapped."""
    check_readable(Path(path))
    if (problem := impostor_problem(path) or safetensors_problem(path)) is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            loaded = {k: f.get_tensor(k) if tensors else _meta_tensor(f.get_slice(k)) for k in keys}
            return loaded, dict(f.metadata() or {})
    except (SafetensorError, OSError, MemoryError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from None


ALIGNMENT = 64  # bytes: where the CPU kernels expect their operands (a cache line)
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAMES = {name: dtype for dtype, name in _DTYPES.items()}


def write_safetensors(tensors: Mapping[str, Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Writes tensors and metadata to a safetensors file, atomically, with every tensor whose size allows it
    at a 64-byte aligned offset.

    Memory-mapped weights are used where they lie, and some CPU kernels round differently on unaligned
    operands: aligned, a converted file computes bit for bit what the official `.pth` does. The file is plain
    safetensors (the header is padded with spaces, as the format allows; the data has no holes).
    """
    blobs = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # sizes that are multiples of the alignment first: each of them then starts aligned
    order = sorted(blobs, key=lambda k: (blobs[k].nbytes % ALIGNMENT != 0, k))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in order:
        tensor = blobs[key]
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{key}: cannot write dtype {tensor.dtype} to safetensors")
        header[key] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGNMENT)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for key in order:
                if blobs[key].numel():
                    f.write(blobs[key].reshape(-1).view(torch.uint8).numpy().tobytes())

    return atomic_write(Path(path), write)


def _meta_tensor(view: Any) -> Tensor:
    """A `meta` tensor of the shape and dtype a safetensors slice declares."""
    return torch.empty(view.get_shape(), dtype=_FROM_NAMES.get(view.get_dtype(), torch.uint8), device="meta")


def check_tensors(path: str | Path, tensors: Mapping[str, Tensor], expected: Mapping[str, Tensor], what: str) -> None:
    """Raises `CheckpointError` naming missing, unexpected and mis-shaped keys of a file against a model, then
    tensors of a dtype it cannot take (`check_dtypes`)."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{k} {tuple(tensors[k].shape)} -> expected {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(tensors))
        if expected[k].shape != tensors[k].shape
    ]
    if missing or unexpected or misshaped:
        raise CheckpointError(
            f"{path}: weights do not match {what}; missing [{listing(missing)}], unexpected "
            f"[{listing(unexpected)}], mis-shaped [{listing(misshaped)}]"
        )
    check_dtypes(path, tensors, expected)
