"""Downloads against a real HTTP server on 127.0.0.1 serving checkpoints made from the official package."""

import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image

from finesam.weights.download import Checkpoint, DownloadError, download

from conftest import SMALL
from helpers import finesam, finesam_process
from official import build_official, build_official_tiny


class CheckpointServer(ThreadingHTTPServer):
    """Serves `files` by base name (also under a Hub-like `/repo/resolve/main/` path, whose HEAD answers with the
    Hub's LFS headers), with Range support. `mode` makes it misbehave: "truncate" (half the body, then close),
    "drop" (no Content-Length, half the body, then close), "half" (a complete response holding half the file),
    "html" (a 200 carrying an HTML page), "slow" (small chunks with pauses), "stall" (headers, then nothing),
    "error" (HTTP 500)."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.mode = "ok"
        self.hub_sha256: dict[str, str] = {}  # overrides of the SHA-256 the Hub's HEAD announces
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: CheckpointServer

    def log_message(self, *_: object) -> None:
        pass

    def do_HEAD(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.server.files:
            self.send_error(404)
            return
        data = self.server.files[name]
        self.send_response(200)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("X-Linked-Size", str(len(data)))
        sha256 = self.server.hub_sha256.get(name, hashlib.sha256(data).hexdigest())
        self.send_header("X-Linked-Etag", f'"{sha256}"')
        self.send_header("ETag", '"not-the-sha"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        mode = self.server.mode
        self.server.requests.append((name, self.headers.get("Range")))
        if mode == "error":
            self.send_error(500, "storage backend unavailable")
            return
        if mode == "html":
            page = b"<!DOCTYPE html><html><body>Please sign in to continue</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if name not in self.server.files:
            self.send_error(404)
            return
        data = self.server.files[name]
        if mode == "half":
            data = data[: len(data) // 2]
        start = 0
        if match := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or ""):
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        if mode != "drop":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode in ("truncate", "drop"):
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif mode == "stall":
            time.sleep(3)
        elif mode == "slow":
            for i in range(0, len(body), 1 << 16):
                self.wfile.write(body[i : i + (1 << 16)])
                time.sleep(0.02)
        else:
            self.wfile.write(body)


@pytest.fixture(scope="module")
def payloads() -> dict[str, bytes]:
    def saved(state_dict) -> bytes:
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        return buffer.getvalue()

    hq = saved(build_official(SMALL, seed=1, hq=True).state_dict())
    return {
        "sam_small.pth": saved(build_official(SMALL, seed=0).state_dict()),
        "sam_hq_vit_b.pth": hq,
        "sam_vit_b_01ec64.pth": hq,
        "sam_hq_vit_tiny.pth": saved(build_official_tiny(seed=4).state_dict()),  # full size, ~40 MB
    }


@pytest.fixture
def server(payloads) -> Iterator[CheckpointServer]:
    httpd = CheckpointServer(payloads)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def visible(folder: Path) -> list[str]:
    """The files of `folder` but the hidden lock files of downloads."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def entry(server: CheckpointServer, name: str = "sam_small.pth", **overrides) -> Checkpoint:
    data = server.files[name]
    values = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **overrides}
    return Checkpoint("test", f"{server.url}/{name}", values["size"], values["sha256"], "test checkpoint")


def test_download_is_verified_and_atomic(tmp_path, server):
    path = download(entry(server), tmp_path)
    assert path == tmp_path / "sam_small.pth" and path.read_bytes() == server.files["sam_small.pth"]
    assert visible(tmp_path) == ["sam_small.pth"]
    server.requests.clear()
    assert download(entry(server), tmp_path) == path  # already there and verified: nothing fetched
    assert server.requests == []


def test_interrupted_transfer_is_resumed(tmp_path, server):
    server.mode = "truncate"
    with pytest.raises(DownloadError, match=r"transfer interrupted.*run again to resume"):
        download(entry(server), tmp_path)
    assert not (tmp_path / "sam_small.pth").exists()
    partial = (tmp_path / "sam_small.pth.part").stat().st_size
    assert 0 < partial < len(server.files["sam_small.pth"])
    server.mode = "ok"
    path = download(entry(server), tmp_path)
    assert server.requests[-1] == ("sam_small.pth", f"bytes={partial}-")
    assert path.read_bytes() == server.files["sam_small.pth"]
    assert not (tmp_path / "sam_small.pth.part").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [({"sha256": "0" * 64}, r"SHA-256 [0-9a-f]{64}, expected 0{64}"), ({"size": 123}, r"bytes, expected 123")],
)
def test_wrong_digest_or_size_leaves_nothing(tmp_path, server, override, message):
    with pytest.raises(DownloadError, match=message + ".*the download was removed"):
        download(entry(server, **override), tmp_path)
    assert visible(tmp_path) == []


def test_server_error_and_refused_connection(tmp_path, server):
    server.mode = "error"
    with pytest.raises(DownloadError, match="HTTP 500 storage backend unavailable"):
        download(entry(server), tmp_path)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    unreachable = Checkpoint("x", f"http://127.0.0.1:{closed}/sam_small.pth", None, None, "x")
    with pytest.raises(DownloadError, match="cannot connect"):
        download(unreachable, tmp_path)
    assert visible(tmp_path) == []


def test_cli_download_then_convert(tmp_path, server):
    env = {"FINESAM_MIRROR": server.url, "FINESAM_PROGRESS": "1"}
    result = finesam("download", "sam_hq_vit_b", "--dir", tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(tmp_path / "sam_hq_vit_b.pth"),
        str(tmp_path / "sam_hq_vit_b.safetensors"),
        str(tmp_path / "sam_hq_vit_b.hq.safetensors"),
    ]
    digest = hashlib.sha256(server.files["sam_hq_vit_b.pth"]).hexdigest()
    assert f"no published SHA-256; received {digest}" in result.stderr
    # the progress bar with its rate (MB/s or GB/s from a local server, depending on the machine)
    assert re.search(r"\d[kMGT]?B/s", result.stderr), result.stderr


def test_cli_download_refuses_a_file_that_is_not_the_release(tmp_path, server):
    result = finesam("download", "sam_vit_b", "--dir", tmp_path, env={"FINESAM_MIRROR": server.url})
    assert result.returncode == 2
    assert "expected 375042383" in result.stderr and "Traceback" not in result.stderr
    assert visible(tmp_path) == []
    unknown = finesam("download", "sam_vit_z", "--dir", tmp_path)
    assert unknown.returncode == 2 and "one of: sam_vit_b, sam_vit_l" in unknown.stderr


def test_demo_downloads_light_hq_sam_and_runs(tmp_path, server):
    """`make demo` on a machine without checkpoints: download Light HQ-SAM, convert it, show SAM | HQ-SAM."""
    env = {"FINESAM_HOME": str(tmp_path / "cache"), "FINESAM_CHECKPOINT": "", "FINESAM_MIRROR": server.url}
    result = finesam("demo", "--out-dir", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr
    assert ("sam_hq_vit_tiny.pth", None) in server.requests
    cache = visible(tmp_path / "cache")
    assert cache == ["sam_hq_vit_tiny.hq.safetensors", "sam_hq_vit_tiny.pth", "sam_hq_vit_tiny.safetensors"]
    assert Image.open(tmp_path / "out" / "demo_overlay.png").size == (2 * 960, 640)  # SAM | HQ-SAM
    assert "SAM: encoded in" in result.stdout and "HQ-SAM: encoded in" in result.stdout
    again = finesam("demo", "--out-dir", tmp_path / "out", env=env)  # now found in the cache: no new request
    assert again.returncode == 0 and len(server.requests) == 1


def unpinned(server: CheckpointServer, name: str = "sam_small.pth") -> Checkpoint:
    """A catalogue entry without a published size or SHA-256, as the HQ-SAM files and MobileSAM are."""
    return Checkpoint("test", f"{server.url}/{name}", None, None, "unpinned test checkpoint")


@pytest.mark.parametrize("mode", ["drop", "half", "html"])
def test_an_unpinned_file_reaches_its_name_only_when_whole(tmp_path, server, mode):
    """No size or hash published: a dropped connection without Content-Length, a complete response holding half
    the file, or an HTML page is never promoted, and the next run with a good server succeeds."""
    server.mode = mode
    message = "HTML page" if mode == "html" else "truncated or corrupt PyTorch checkpoint"
    with pytest.raises(DownloadError, match=message + ".*run again to fetch it anew"):
        download(unpinned(server), tmp_path)
    assert visible(tmp_path) == []
    server.mode = "ok"
    assert download(unpinned(server), tmp_path).read_bytes() == server.files["sam_small.pth"]


def test_416_never_promotes_a_bad_part(tmp_path, server):
    """A leftover part as long as the file or longer (a different file, or junk appended) with a 416 answer:
    it is checked, found not to be the file, and fetched again from the start."""
    data = server.files["sam_small.pth"]
    (tmp_path / "sam_small.pth.part").write_bytes(data + b"junk after the end")
    path = download(unpinned(server), tmp_path)
    assert path.read_bytes() == data
    assert server.requests == [("sam_small.pth", f"bytes={len(data) + 18}-"), ("sam_small.pth", None)]
    (tmp_path / "sam_small.pth").unlink()
    (tmp_path / "sam_small.pth.part").write_bytes(data)  # a complete part: the 416 means done
    assert download(unpinned(server), tmp_path).read_bytes() == data


def test_a_bad_file_under_the_final_name_is_moved_aside_and_fetched_again(tmp_path, server):
    (tmp_path / "sam_small.pth").write_bytes(server.files["sam_small.pth"][:1000])  # an old truncated download
    path = download(unpinned(server), tmp_path)
    assert path.read_bytes() == server.files["sam_small.pth"]
    aside = [name for name in visible(tmp_path) if name.startswith("sam_small.pth.bad-")]
    assert len(aside) == 1 and (tmp_path / aside[0]).stat().st_size == 1000


def test_a_stalled_server_times_out_with_a_message(tmp_path, server):
    server.mode = "stall"
    with pytest.raises(DownloadError, match=r"transfer interrupted.*run again"):
        download(unpinned(server), tmp_path, timeout=0.5)
    assert "sam_small.pth" not in visible(tmp_path)


def test_hub_metadata_gives_size_and_sha256(tmp_path, server, monkeypatch):
    """Files hosted on the Hugging Face Hub are checked against the SHA-256 of its LFS metadata."""
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("FINESAM_MIRROR", raising=False)  # finesam reads $HF_ENDPOINT at each download
    hub = Checkpoint("t", "https://huggingface.co/x/y/resolve/main/sam_hq_vit_b.pth", None, None, "t", "lkeab/hq-sam")
    server.hub_sha256["sam_hq_vit_b.pth"] = "ab" * 32
    with pytest.raises(DownloadError, match=f"expected {'ab' * 32}"):
        download(hub, tmp_path)
    assert visible(tmp_path) == []
    server.hub_sha256.clear()
    assert download(hub, tmp_path).read_bytes() == server.files["sam_hq_vit_b.pth"]
    assert server.requests[-1] == ("sam_hq_vit_b.pth", None)


def test_cli_hub_download_uses_hf_endpoint(tmp_path, server):
    env = {"HF_ENDPOINT": server.url, "FINESAM_MIRROR": ""}
    # a process of its own: huggingface_hub reads HF_ENDPOINT once, when it is imported
    result = finesam_process("download", "sam_hq_vit_b", "--dir", tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "no published SHA-256" not in result.stderr  # the Hub's was checked
    assert "MB/s" not in result.stderr  # stderr is not a terminal: no bar


def test_ctrl_c_leaves_a_resumable_part_and_one_line(tmp_path, server):
    server.mode = "slow"
    env = {"FINESAM_MIRROR": server.url, **os.environ}
    command = [sys.executable, "-m", "finesam.cli", "download", "sam_hq_vit_b", "--dir", str(tmp_path)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    part = tmp_path / "sam_hq_vit_b.pth.part"
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("finesam download: interrupted")
    kept = part.stat().st_size
    assert f"({kept} bytes): run again to resume" in stderr
    assert 0 < kept < len(server.files["sam_hq_vit_b.pth"]) and not (tmp_path / "sam_hq_vit_b.pth").exists()
    server.mode = "ok"
    result = finesam("download", "sam_hq_vit_b", "--dir", tmp_path, env={"FINESAM_MIRROR": server.url})
    assert result.returncode == 0, result.stderr
    assert server.requests[-1] == ("sam_hq_vit_b.pth", f"bytes={kept}-")
    assert (tmp_path / "sam_hq_vit_b.pth").read_bytes() == server.files["sam_hq_vit_b.pth"]


def test_concurrent_downloads_of_one_file_are_serialised(tmp_path, server):
    server.mode = "slow"
    env = {"FINESAM_MIRROR": server.url, **os.environ}
    command = [sys.executable, "-m", "finesam.cli", "download", "sam_hq_vit_b", "--dir", str(tmp_path)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = tmp_path / "sam_hq_vit_b.pth.part"
    deadline = time.monotonic() + 60
    while not part.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    assert "another download of it is running; waiting for it" in outputs[1][1]
    assert outputs[0][0] == outputs[1][0]  # the same files
    assert server.requests == [("sam_hq_vit_b.pth", None)]  # fetched once: the second found it done
    assert (tmp_path / "sam_hq_vit_b.pth").read_bytes() == server.files["sam_hq_vit_b.pth"]
