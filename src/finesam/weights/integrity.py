"""Is a file a complete checkpoint? A structural check that reads the head and the index of a file, not its
tensors: cheap on a 2.5 GB checkpoint, and enough to tell a truncated download, an HTML page or a Git LFS
pointer saved under a checkpoint's name from the real thing."""

import json
import zipfile
from pathlib import Path

LFS_POINTER = b"version https://git-lfs"
_HTML = (b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml")
_EOCD_SEARCH = 22 + 65535  # a zip's end-of-index record and its longest comment
_PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # legacy (pre-zip) torch.save files


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` is not a complete PyTorch (zip or legacy pickle) or safetensors checkpoint; None when it is.

    The answer names what the file looks like instead ("an HTML page", "a Git LFS pointer", "random bytes") so
    that nobody is tempted to load it with fewer safety checks.
    """
    path = Path(path)
    size = path.stat().st_size
    if (impostor := impostor_problem(path)) is not None:
        return impostor
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        return _zip_problem(path, size)
    if head.startswith(_PICKLE_PROTOCOLS):
        return None
    if safetensors_problem(path, size) is None:
        return None
    return "not a checkpoint: neither a PyTorch nor a safetensors file (it looks like random bytes)"


def impostor_problem(path: str | Path) -> str | None:
    """What a file saved under a checkpoint's name is instead (empty, an HTML page, a Git LFS pointer), or None."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        return "not a checkpoint: the file is empty"
    if head.startswith(LFS_POINTER):
        return (
            "not a checkpoint: it is a Git LFS pointer (a small text file naming the real one); "
            "fetch the file itself (git lfs pull, or download it)"
        )
    if head.lstrip().lower().startswith(_HTML):
        return "not a checkpoint: it is an HTML page (an error, login or redirect page saved instead of the file)"
    return None


def _zip_problem(path: Path, size: int) -> str | None:
    with open(path, "rb") as f:  # the index's end record must end the file: nothing missing, nothing appended
        f.seek(max(0, size - _EOCD_SEARCH))
        tail = f.read()
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or end + 22 + int.from_bytes(tail[end + 20 : end + 22], "little") != len(tail):
        return "a truncated or corrupt PyTorch checkpoint: its zip index is not at the end of the file"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "a truncated or corrupt PyTorch checkpoint: its zip index does not read"
    if not any(m.filename == "data.pkl" or m.filename.endswith("/data.pkl") for m in members):
        return "a zip file, but not a PyTorch checkpoint (it holds no data.pkl)"
    if any(m.header_offset + m.compress_size > size for m in members):
        return "a truncated or corrupt PyTorch checkpoint: its index points past the end of the file"
    return None


def safetensors_problem(path: str | Path, size: int | None = None) -> str | None:
    """Why `path` is not a complete safetensors file (its header's tensors must fill the file exactly)."""
    path = Path(path)
    size = path.stat().st_size if size is None else size
    if size < 8:
        return "not a safetensors file: shorter than its 8-byte header length"
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > min(size - 8, 100 << 20):
            return "not a safetensors file: its header length exceeds the file (random bytes, or another format?)"
        try:
            header = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return "not a safetensors file: its header is not JSON (random bytes, or another format?)"
    if not isinstance(header, dict):
        return "not a safetensors file: its header is not a JSON object"
    ends = [0]
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return f"not a safetensors file: tensor {key!r} has no valid data_offsets"
        ends.append(offsets[1])
    if 8 + length + max(ends) != size:
        return f"a truncated or padded safetensors file: its tensors need {8 + length + max(ends)} bytes, it has {size}"
    return None
