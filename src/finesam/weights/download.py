"""Downloading the official checkpoints: verified, resumable, atomic, with a progress bar.

A transfer goes to `FILE.part` beside the target; an interrupted one is resumed with an HTTP Range request
the next time; the file appears under its final name only after its size and SHA-256 were checked.
`$FINESAM_MIRROR` (a base URL) replaces the official hosts, the file names staying the same.
"""

import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that failed; the message says what to do next."""


@dataclass(frozen=True)
class Checkpoint:
    name: str
    url: str
    size: int | None  # bytes, where published
    sha256: str | None  # where published; otherwise the digest of what was received is reported
    description: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_HQ = "https://huggingface.co/lkeab/hq-sam/resolve/main/"
CHECKPOINTS = {
    c.name: c
    for c in (
        Checkpoint(
            "sam_vit_b",
            _SAM + "sam_vit_b_01ec64.pth",
            375042383,
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            "SAM ViT-B",
        ),
        Checkpoint(
            "sam_vit_l",
            _SAM + "sam_vit_l_0b3195.pth",
            1249524607,
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            "SAM ViT-L",
        ),
        Checkpoint(
            "sam_vit_h",
            _SAM + "sam_vit_h_4b8939.pth",
            2564550879,
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            "SAM ViT-H",
        ),
        Checkpoint("sam_hq_vit_b", _HQ + "sam_hq_vit_b.pth", None, None, "HQ-SAM ViT-B"),
        Checkpoint("sam_hq_vit_l", _HQ + "sam_hq_vit_l.pth", None, None, "HQ-SAM ViT-L"),
        Checkpoint("sam_hq_vit_h", _HQ + "sam_hq_vit_h.pth", None, None, "HQ-SAM ViT-H"),
        Checkpoint("sam_hq_vit_tiny", _HQ + "sam_hq_vit_tiny.pth", None, None, "Light HQ-SAM (TinyViT)"),
        Checkpoint(
            "mobile_sam",
            "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            None,
            None,
            "MobileSAM (TinyViT)",
        ),
    )
}


def source_url(checkpoint: Checkpoint) -> str:
    mirror = os.environ.get("FINESAM_MIRROR")
    return f"{mirror.rstrip('/')}/{checkpoint.filename}" if mirror else checkpoint.url


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class Progress:
    """A one-line progress bar on stderr, redrawn at most five times a second."""

    def __init__(self, label: str, total: int | None, done: int, enabled: bool) -> None:
        self.label, self.total, self.done, self.enabled = label, total, done, enabled
        self.start, self.shown, self.first = time.monotonic(), 0.0, done

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and now - self.shown > 0.2:
            self.shown = now
            self._draw(now)

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            print(file=sys.stderr)

    def _draw(self, now: float) -> None:
        rate = (self.done - self.first) / max(now - self.start, 1e-6) / 1e6
        if self.total:
            filled = int(30 * self.done / self.total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * self.done / self.total:5.1f}%"
            amount = f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB"
        else:
            bar, amount = "", f"{self.done / 1e6:.1f} MB"
        print(f"\r{self.label} {bar} {amount} {rate:.1f} MB/s", end="", file=sys.stderr, flush=True)


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to send: the partial file may be complete
            return None
        raise DownloadError(f"{url}: the server answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: cannot connect ({reason}); check the network or set $FINESAM_MIRROR") from None


def _copy(response, out: BinaryIO, progress: Progress) -> None:
    while block := response.read(CHUNK):
        out.write(block)
        progress.advance(len(block))


def _verify(checkpoint: Checkpoint, path: Path) -> str:
    size = path.stat().st_size
    if checkpoint.size is not None and size != checkpoint.size:
        raise DownloadError(f"{path.name}: {size} bytes, expected {checkpoint.size}")
    digest = sha256_of(path)
    if checkpoint.sha256 is not None and digest != checkpoint.sha256:
        raise DownloadError(f"{path.name}: SHA-256 {digest}, expected {checkpoint.sha256}")
    return digest


def download(checkpoint: Checkpoint, directory: Path, progress: bool = False, timeout: float = 30.0) -> Path:
    """The verified checkpoint file in `directory`, downloaded (or resumed) if it is not there yet."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint.filename
    if final.is_file():
        _verify(checkpoint, final)
        return final
    part = directory / f"{checkpoint.filename}.part"
    offset = part.stat().st_size if part.is_file() else 0
    url = source_url(checkpoint)
    response = _open(url, offset, timeout)
    if response is not None:
        with response:
            resumed = response.status == 206
            length = response.headers.get("Content-Length")
            expected = (offset if resumed else 0) + int(length) if length is not None else checkpoint.size
            bar = Progress(checkpoint.filename, expected, offset if resumed else 0, progress)
            try:
                with open(part, "ab" if resumed else "wb") as out:
                    _copy(response, out, bar)
                    out.flush()
                    os.fsync(out.fileno())
            except (OSError, http.client.HTTPException) as e:
                raise DownloadError(f"{url}: transfer interrupted ({e}); run again to resume") from None
            finally:
                bar.close()
        received = part.stat().st_size
        if expected is not None and received < expected:
            raise DownloadError(f"{url}: transfer interrupted at {received} of {expected} bytes; run again to resume")
    try:
        digest = _verify(checkpoint, part)
    except DownloadError as e:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{e}; the download was removed, run again to fetch it anew") from None
    os.replace(part, final)
    if checkpoint.sha256 is None:
        print(f"{final.name}: no published SHA-256; received {digest}", file=sys.stderr)
    return final
