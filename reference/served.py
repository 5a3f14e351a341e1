"""A real `finesam serve` subprocess and calls to its API over HTTP: what the serve tests, the browser test and
the serve benchmark share."""

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

FINESAM = Path(sys.executable).with_name("finesam")


def _die_with_parent() -> None:
    """In the child before it runs the server: killed when the test process dies (Linux), so that a test run
    stopped midway leaves no server behind."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Served:
    """A real `finesam serve` subprocess on a free port of 127.0.0.1, and calls to its API over HTTP."""

    def __init__(self, *args: object, env: dict[str, str] | None = None) -> None:
        command = [str(FINESAM)] if FINESAM.exists() else [sys.executable, "-m", "finesam.cli"]
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (a pipe could fill up and block the server)
        self.process = subprocess.Popen(
            [*command, "serve", "--port", "0", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("finesam serve: http://"):
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server did not start: {line}{self.stderr()}")
        self.page = line.split(": ", 1)[1].strip()
        self.url = self.page.split("?")[0].rstrip("/")

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON) of one API call; `body` is sent as JSON, `raw` as it is."""
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def upload(self, content: bytes, name: str = "photo.png", headers: dict[str, str] | None = None) -> tuple[int, Any]:
        boundary = "finesam-test-boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
                f"Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + content
            + f"\r\n--{boundary}--\r\n".encode()
        )
        kind = {"Content-Type": f"multipart/form-data; boundary={boundary}", **(headers or {})}
        return self.call("POST", "/api/images", raw=body, headers=kind)

    def stderr(self) -> str:
        """What the server wrote on stderr so far (its request log)."""
        self.log.seek(0)
        return self.log.read()

    def close(self) -> str:
        """Stops the server; returns its stderr."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()
        return self.stderr()
