"""Downloads against a real HTTP server on 127.0.0.1 serving checkpoints made from the official package."""

import hashlib
import io
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from finesam.weights.download import Checkpoint, DownloadError, download

from conftest import SMALL
from helpers import finesam
from official import build_official, build_official_tiny


class CheckpointServer(ThreadingHTTPServer):
    """Serves `files` by name, with Range support; `mode` makes it misbehave: "truncate" or "error"."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.mode = "ok"
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: CheckpointServer

    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests.append((name, self.headers.get("Range")))
        if self.server.mode == "error":
            self.send_error(500, "storage backend unavailable")
            return
        if name not in self.server.files:
            self.send_error(404)
            return
        data = self.server.files[name]
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
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.mode == "truncate":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
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


def entry(server: CheckpointServer, name: str = "sam_small.pth", **overrides) -> Checkpoint:
    data = server.files[name]
    values = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), **overrides}
    return Checkpoint("test", f"{server.url}/{name}", values["size"], values["sha256"], "test checkpoint")


def test_download_is_verified_and_atomic(tmp_path, server):
    path = download(entry(server), tmp_path)
    assert path == tmp_path / "sam_small.pth" and path.read_bytes() == server.files["sam_small.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam_small.pth"]
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
    assert list(tmp_path.iterdir()) == []


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
    assert list(tmp_path.iterdir()) == []


def test_cli_download_then_convert(tmp_path, server):
    result = finesam("download", "sam_hq_vit_b", "--dir", tmp_path, env={"FINESAM_MIRROR": server.url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(tmp_path / "sam_hq_vit_b.pth"),
        str(tmp_path / "sam_hq_vit_b.safetensors"),
        str(tmp_path / "sam_hq_vit_b.hq.safetensors"),
    ]
    digest = hashlib.sha256(server.files["sam_hq_vit_b.pth"]).hexdigest()
    assert f"no published SHA-256; received {digest}" in result.stderr
    assert "MB/s" in result.stderr  # the progress bar


def test_cli_download_refuses_a_file_that_is_not_the_release(tmp_path, server):
    result = finesam("download", "sam_vit_b", "--dir", tmp_path, env={"FINESAM_MIRROR": server.url})
    assert result.returncode == 2
    assert "expected 375042383" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
    unknown = finesam("download", "sam_vit_z", "--dir", tmp_path)
    assert unknown.returncode == 2 and "one of: sam_vit_b, sam_vit_l" in unknown.stderr


def test_demo_downloads_light_hq_sam_and_runs(tmp_path, server):
    """`make demo` on a machine without checkpoints: download Light HQ-SAM, convert it, show SAM | HQ-SAM."""
    env = {"FINESAM_HOME": str(tmp_path / "cache"), "FINESAM_CHECKPOINT": "", "FINESAM_MIRROR": server.url}
    result = finesam("demo", "--out-dir", tmp_path / "out", env=env)
    assert result.returncode == 0, result.stderr
    assert ("sam_hq_vit_tiny.pth", None) in server.requests
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cache == ["sam_hq_vit_tiny.hq.safetensors", "sam_hq_vit_tiny.pth", "sam_hq_vit_tiny.safetensors"]
    assert Image.open(tmp_path / "out" / "demo_overlay.png").size == (2 * 960, 640)  # SAM | HQ-SAM
    assert "SAM: encoded in" in result.stdout and "HQ-SAM: encoded in" in result.stdout
    again = finesam("demo", "--out-dir", tmp_path / "out", env=env)  # now found in the cache: no new request
    assert again.returncode == 0 and len(server.requests) == 1
