"""Downloading the official checkpoints: proven whole, resumable, atomic, one at a time, with a progress bar.

A transfer goes to `FILE.part` beside the target and is resumed with an HTTP Range request the next time. The
file reaches its final name only once it is proven whole: the published size and SHA-256 where they are known
(pinned here, or the Hugging Face Hub's LFS metadata for the files it hosts), the Content-Length the server
sent, and in every case a structural check that it is a complete checkpoint (`integrity.checkpoint_problem`).
A lock file serialises downloads of one file. `$FINESAM_MIRROR` (a base URL) replaces every host, the file
names staying the same; `$HF_ENDPOINT` replaces the Hub's.
"""

import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from finesam.files import sha256_of
from finesam.progress import progress_bar
from finesam.weights.integrity import checkpoint_problem
from finesam.weights.layouts import Checkpoint, layouts
from finesam.weights.mobilesamv2 import CHECKPOINT as MOBILESAMV2_DECODER

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed; the message says what to do next."""


@dataclass(frozen=True)
class Source:
    """Where a checkpoint is fetched from and what it must be."""

    url: str
    size: int | None
    sha256: str | None


# the catalogue: every registered family's official files (`CheckpointLayout.checkpoints`), then the decoders that
# pair with them
CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c for c in [*(c for layout in layouts() for c in layout.checkpoints), MOBILESAMV2_DECODER]
}


def source_url(checkpoint: Checkpoint) -> str:
    mirror = os.environ.get("FINESAM_MIRROR")
    if mirror:
        return f"{mirror.rstrip('/')}/{checkpoint.filename}"
    if checkpoint.hub_repo is not None:
        from huggingface_hub import hf_hub_url

        # $HF_ENDPOINT as it is now: huggingface_hub reads it once, when something first imports it
        return hf_hub_url(checkpoint.hub_repo, checkpoint.filename, endpoint=os.environ.get("HF_ENDPOINT") or None)
    return checkpoint.url


def resolve(checkpoint: Checkpoint, timeout: float) -> Source:
    """The URL and the expected size and SHA-256: pinned, else the Hub's (not asked when a mirror is set)."""
    url, size, sha256 = source_url(checkpoint), checkpoint.size, checkpoint.sha256
    if checkpoint.hub_repo is not None and sha256 is None and not os.environ.get("FINESAM_MIRROR"):
        from huggingface_hub import get_hf_file_metadata
        from huggingface_hub.errors import HfHubHTTPError

        try:
            metadata = get_hf_file_metadata(url, timeout=timeout)
        except (HfHubHTTPError, OSError) as e:
            raise DownloadError(f"{url}: cannot read the Hub's metadata ({e}); check the network") from None
        except Exception as e:  # the Hub client's own connection errors (httpx) share no base with OSError
            raise DownloadError(f"{url}: cannot connect ({type(e).__name__}: {e}); check the network") from None
        size = metadata.size if size is None else size
        if metadata.etag and len(metadata.etag) == 64:  # an LFS file's etag is the SHA-256 of its content
            sha256 = metadata.etag
    return Source(url, size, sha256)


def _problem(path: Path, size: int | None, sha256: str | None) -> tuple[str | None, str]:
    """(what is wrong with `path`, or None; its SHA-256, or "" when not computed)."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{actual} bytes, expected {size}", ""
    if (structure := checkpoint_problem(path)) is not None:
        return structure, ""
    digest = sha256_of(path)
    if sha256 is not None and digest != sha256:
        return f"SHA-256 {digest}, expected {sha256}", digest
    return None, digest


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse | None:
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the partial file may be complete (checked next)
            return None
        raise DownloadError(f"{url}: the server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: cannot connect ({reason}); check the network or set $FINESAM_MIRROR") from None


def _transfer(source: Source, part: Path, name: str, progress: bool, timeout: float) -> None:
    """Appends the rest of the file to `part` (or rewrites it when the server ignores the Range)."""
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(source.url, offset, timeout)
    if response is None:
        return
    with response:
        resumed = response.status == 206
        start = offset if resumed else 0
        length = response.headers.get("Content-Length")
        expected = start + int(length) if length is not None else source.size
        with (
            open(part, "ab" if resumed else "wb") as out,
            progress_bar(expected, name, unit="B", initial=start, quiet=not progress) as bar,
        ):
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{source.url}: transfer interrupted ({e}); run again to resume") from None
            except KeyboardInterrupt:
                out.flush()
                raise KeyboardInterrupt(f"{part.name} kept ({out.tell()} bytes): run again to resume") from None
            finally:
                out.flush()
                os.fsync(out.fileno())
    received = part.stat().st_size
    if expected is not None and received < expected:
        raise DownloadError(
            f"{source.url}: transfer interrupted at {received} of {expected} bytes; run again to resume"
        )


def _set_aside(path: Path, problem: str) -> None:
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    print(f"{path.name}: {problem}; moved aside to {aside.name}, fetching it again", file=sys.stderr)


def download(checkpoint: Checkpoint, directory: Path, progress: bool = False, timeout: float = 30.0) -> Path:
    """The checkpoint file in `directory`, proven whole; downloaded (or resumed) when it is not there yet.

    A file already there that fails the check is moved aside (`FILE.bad-<time>`) and fetched again.

    Raises:
        DownloadError: the transfer failed or what arrived is not the checkpoint; the message says what to do.
        KeyboardInterrupt: interrupted; the partial file is kept for the next run.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint.filename
    lock = FileLock(directory / f".{checkpoint.filename}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"{checkpoint.filename}: another download of it is running; waiting for it", file=sys.stderr)
        lock.acquire()
    try:
        return _download_locked(checkpoint, final, progress, timeout)
    finally:
        lock.release()


def _download_locked(checkpoint: Checkpoint, final: Path, progress: bool, timeout: float) -> Path:
    if final.is_file():
        problem, _ = _problem(final, checkpoint.size, checkpoint.sha256)
        if problem is None:
            return final
        _set_aside(final, problem)
    source = resolve(checkpoint, timeout)
    part = final.with_name(f"{final.name}.part")
    for attempt in range(2):
        resumed = part.is_file() and part.stat().st_size > 0
        _transfer(source, part, final.name, progress, timeout)
        problem, digest = _problem(part, source.size, source.sha256)
        if problem is None:
            os.replace(part, final)
            if source.sha256 is None:
                print(f"{final.name}: no published SHA-256; received {digest}", file=sys.stderr)
            return final
        part.unlink()
        if not resumed or attempt == 1:
            raise DownloadError(f"{source.url}: {problem}; the download was removed, run again to fetch it anew")
        print(f"{final.name}: the resumed file is not whole ({problem}); fetching it from the start", file=sys.stderr)
    raise AssertionError("unreachable")
