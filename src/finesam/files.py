"""Safe file writes, for every layer (and for the torch-free ONNX path of the command): `atomic_write` (a
temporary beside the target, then a rename), `check_output`, and the `OutputError` of a failed write;
`sha256_of`, the digest a run records of its input files. No torch here."""

import glob
import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


class OutputError(OSError):
    """A file that could not be written (disk full, quota, read-only file system, I/O error): the message names
    the file and the cause; what was committed before stays."""


def output_error(path: str | Path, error: OSError) -> OutputError:
    """The `OutputError` of writing `path` that failed with `error` (one line: the file, then the cause)."""
    cause = error.strerror or str(error) or type(error).__name__
    return OutputError(error.errno, f"{path}: cannot write it: {cause}")


def check_output(path: str | Path) -> Path:
    """Raises `ValueError` when `path` cannot be written as a file: it exists and is not a regular file
    (a folder, a FIFO, a device), or its folder exists and is not writable. Cheap: call it before long work."""
    path = Path(path)
    limit = _name_limit(path)
    if len(os.fsencode(path.name)) > limit:
        raise ValueError(f"{path}: the name is {len(os.fsencode(path.name))} bytes, over the limit of {limit}")
    if path.exists() and not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a FIFO, a device, ...)"
        raise ValueError(f"{path}: exists and is {kind}; refusing to replace it")
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write in {folder}")
    return path


def _name_limit(path: Path) -> int:
    """The longest file name (bytes) the folder of `path` takes; 255 where it cannot be asked."""
    folder = next((p for p in (path.parent, *path.parent.parents) if p.is_dir()), Path("."))
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


# temporaries are `.fs<pid>.<random>.tmp` beside their target: short, so that any legal name can be written
TEMPORARY_PREFIX = ".fs"


def _remove_stale_temporaries(path: Path) -> None:
    """Temporaries in the folder of `path` left by writers that no longer run (a killed conversion, say); those
    of live writers are kept. Also the longer temporaries of earlier versions (`.<name>.<pid>.<random>.tmp`)."""
    candidates = [
        (tmp, tmp.name.removeprefix(TEMPORARY_PREFIX).split(".", 1)[0])
        for tmp in path.parent.glob(f"{TEMPORARY_PREFIX}*.*.tmp")
    ]
    candidates += [
        (tmp, tmp.name.removeprefix(f".{path.name}.").split(".", 1)[0])
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp")
    ]
    for tmp, pid in candidates:
        if pid.isdigit() and not process_running(int(pid)):
            tmp.unlink(missing_ok=True)


def process_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def process_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere reading it means setting it for an instant
    (which another thread creating a file in that instant would see)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Calls `write` on a temporary file beside `path`, then renames it: `path` is never half-written.

    The file gets the permissions a plain `open` would give (the umask's, or those of the file it replaces);
    a target that is not a regular file is refused (`check_output`), and temporaries left by dead writers are
    removed. The temporary's name is short (`TEMPORARY_PREFIX`), so any name `check_output` accepts works.

    Raises:
        ValueError: `path` cannot be a file (`check_output`).
        OutputError: the write failed (disk full, I/O error, ...): `path` is as it was, the temporary is gone.
    """
    check_output(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~process_umask()
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMPORARY_PREFIX}{os.getpid()}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OutputError:
        raise
    except OSError as e:
        raise output_error(path, e) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path
