"""The HTTP side of `finesam serve`: a Starlette app over one `ModelHost` (see docs/serve.md for the API).

Nothing a request sends reaches the file system (uploads are decoded in memory; `--images` files are served by
their listed names only) or imports code. Every refused request gets `{"error": "..."}` with a 4xx status.

The access rules (docs/serve.md#access) live here, once: the token's minimum length, the `Host` names a server
answers to, the size of JSON bodies and the time any body may take to arrive.
"""

import asyncio
import io
import ipaddress
import json
import re
import secrets
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import FormParser, parse_options_header
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from finesam.data.pairs import IMAGE_SUFFIXES
from finesam.inputs import as_rgb, open_image
from finesam.serve.host import ModelHost, NotFound
from finesam.serve.requests import ApiError, detection_request, everything_request, mask_request

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
MIN_TOKEN_LENGTH = 16  # a generated token has 24 characters
MAX_JSON_BYTES = 1_000_000  # one prompt or a few generator options: a few hundred bytes
MAX_JSON_DEPTH = 32  # the deepest prompt is 4 levels ({"points": [[[x, y]]]})
BODY_TIMEOUT_S = 30.0
DRAIN_FACTOR = 4  # bodies over their limit are read (and dropped) up to this many limits, so that the client
# sees the 413 instead of a reset connection; a larger declared length is refused before reading anything
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def check_token(token: str) -> str:
    """The access token of a server, if it is long enough to guess at no better than at random.

    Raises:
        ValueError: an empty token (every request would match it) or one under `MIN_TOKEN_LENGTH` characters.
    """
    if len(token) < MIN_TOKEN_LENGTH:
        given = "an empty token" if not token else f"{len(token)} characters"
        raise ValueError(
            f"the access token must have at least {MIN_TOKEN_LENGTH} characters, got {given} "
            "(leave --token out to have one generated)"
        )
    return token


def allowed_hosts(bind: str) -> frozenset[str] | None:
    """The host names (without port, lower case, IPv6 without brackets) a server bound to `bind` answers to in
    the `Host` header: the bound address, and for a loopback bind `localhost`, `127.0.0.1` and `::1`. A page of
    another site that a DNS-rebinding attack points at 127.0.0.1 sends its own name and is refused.

    Args:
        bind: the address the server listens on (`--host`).

    Returns:
        The names, or None for a wildcard bind (0.0.0.0, ::), which any name may reach: such a server always has
        a token, which a rebinding page does not know.
    """
    name = bind.strip("[]").lower()
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return LOOPBACK_NAMES | {name} if name == "localhost" else frozenset({name})
    if address.is_unspecified:
        return None
    return LOOPBACK_NAMES | {name} if address.is_loopback else frozenset({name})


def _host_name(header: str) -> str | None:
    """The name of a `Host` header (`name`, `name:port`, `[v6]`, `[v6]:port`), lower case; None if malformed."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(:\d{1,5})?", header.strip())
    return None if match is None else match.group(1).strip("[]").lower()


async def read_body(request: Request, limit: int, too_large: str, timeout: float) -> bytes:
    """The body of a request, read in memory and refused past `limit` bytes (413: before anything is read when
    the declared length is far over it), or when it takes more than `timeout` seconds to arrive (408: a client
    that sends part of a body and waits is cut off), or when the client goes away (400, one log line).

    Raises:
        ApiError: the status and one sentence, as above.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_FACTOR * limit:
        raise ApiError(413, too_large)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    body, received = bytearray(), 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive in full within {timeout:g} s") from None
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client closed the connection before sending the whole body")
        chunk = message.get("body", b"")
        received += len(chunk)
        if received <= limit:
            body += chunk
        elif received > DRAIN_FACTOR * limit:  # drained enough to answer politely: stop reading
            raise ApiError(413, too_large)
        if not message.get("more_body", False):
            break
    if received > limit:  # answered once the client has sent it all, so that it reads the answer
        raise ApiError(413, too_large)
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """A JSON request body (empty: null), at most `MAX_JSON_DEPTH` levels deep.

    Raises:
        ApiError: 422 for invalid JSON and for nesting deeper than any request needs.
    """
    too_deep = ApiError(422, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body or b"null")
    except RecursionError:  # the parser's own recursion: thousands of levels
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, f"the request body is not valid JSON: {e}") from None
    stack = [(data, 1)]
    while stack:  # iterative: a deep value must not recurse in the checks that follow either
        value, level = stack.pop()
        if level > MAX_JSON_DEPTH:
            raise too_deep
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, level + 1) for child in children)
    return data


def _static(name: str) -> bytes:
    return resources.files("finesam.serve").joinpath("static").joinpath(name).read_bytes()


def uploaded_file(content_type: str, body: bytes, max_bytes: int) -> tuple[str, bytes]:
    """(file name, bytes) of the `file` field of a multipart/form-data body, parsed in memory."""
    kind, parameters = parse_options_header(content_type)
    expected = ApiError(422, "bad upload: expected multipart/form-data with a 'file' field")
    if kind != b"multipart/form-data" or b"boundary" not in parameters:
        raise expected
    files: list[Any] = []
    config = {"MAX_MEMORY_FILE_SIZE": max_bytes + 1, "MAX_BODY_SIZE": max_bytes + MULTIPART_OVERHEAD}
    try:
        parser = FormParser("multipart/form-data", None, files.append, boundary=parameters[b"boundary"], config=config)
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise ApiError(422, f"bad upload: {e}") from None
    file = next((f for f in files if f.field_name == b"file"), None)
    if file is None or not file.in_memory:
        raise expected
    name = (file.file_name or b"the upload").decode(errors="replace")
    return name, file.file_object.getvalue()


def library(folder: Path | None) -> dict[str, Path]:
    """The images of `--images DIR` by name (files directly in it, with an image suffix, not hidden)."""
    if folder is None:
        return {}
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    }


def create_app(
    host: ModelHost,
    images: Path | None = None,
    token: str | None = None,
    max_upload_mb: float = 50,
    log: bool = True,
    hosts: frozenset[str] | None = None,
    body_timeout: float = BODY_TIMEOUT_S,
) -> Starlette:
    """The app: the page at `/`, the API under `/api/`.

    Args:
        host: the model and its adapters.
        images: a folder whose images the page may open by name.
        token: when given, every API call must send it (`Authorization: Bearer TOKEN` or `?token=TOKEN`); at
            least `MIN_TOKEN_LENGTH` characters.
        max_upload_mb: the largest upload accepted.
        log: one line per request on stderr.
        hosts: the names the `Host` header may give (see `allowed_hosts`); None accepts any.
        body_timeout: seconds a request body may take to arrive in full.

    Returns:
        The Starlette app.

    Raises:
        ValueError: a token that is too short, or a limit that is not positive.
    """
    if token is not None:
        check_token(token)
    if not (max_upload_mb > 0 and body_timeout > 0):
        raise ValueError(f"max_upload_mb and body_timeout must be positive, got {max_upload_mb}, {body_timeout}")
    max_bytes = int(max_upload_mb * 1e6)

    async def body_json(request: Request) -> Any:
        too_large = f"the JSON body is over the limit of {MAX_JSON_BYTES} bytes"
        return parse_json(await read_body(request, MAX_JSON_BYTES, too_large, body_timeout))

    def decoded(data: bytes, name: str) -> Image.Image:
        buffer = io.BytesIO(data)
        try:
            return as_rgb(open_image(buffer))
        except ValueError as e:  # PIL names an in-memory file by its repr (<_io.BytesIO object at 0x...>)
            message = str(e).replace(repr(buffer), name)
            status = 413 if "pixel limit" in message else 422
            raise ApiError(status, message if message.startswith(name) else f"{name}: {message}") from None

    def added(image: Image.Image) -> JSONResponse:
        return JSONResponse({"id": host.add_image(image), "width": image.width, "height": image.height})

    async def upload(request: Request) -> Response:
        too_large = f"the upload is over the limit of {max_upload_mb:g} MB (--max-upload-mb)"
        body = await read_body(request, max_bytes + MULTIPART_OVERHEAD, too_large, body_timeout)
        name, data = uploaded_file(request.headers.get("content-type", ""), body, max_bytes)
        if len(data) > max_bytes:
            raise ApiError(413, too_large)
        return added(await run_in_threadpool(decoded, data, name))

    async def open_listed(request: Request) -> Response:
        listed = library(images)
        name = request.path_params["name"]
        if name not in listed:  # only names of the listing: nothing a request sends becomes a path
            raise ApiError(404, f"no image named {name!r} in the server's --images folder")
        image = await run_in_threadpool(decoded, listed[name].read_bytes(), name)
        return added(image)

    async def masks(request: Request) -> Response:
        prompt = mask_request(await body_json(request))
        return JSONResponse(await run_in_threadpool(host.masks, request.path_params["id"], prompt))

    async def detections(request: Request) -> Response:
        asked = detection_request(await body_json(request))
        return JSONResponse(await run_in_threadpool(host.detections, request.path_params["id"], asked))

    async def everything(request: Request) -> Response:
        options, hq, hq_only, loras = everything_request(await body_json(request))
        result = await run_in_threadpool(host.everything, request.path_params["id"], options, hq, hq_only, loras)
        return JSONResponse(result)

    async def image_pixels(request: Request) -> Response:
        image = host.image(request.path_params["id"])
        buffer = io.BytesIO()
        await run_in_threadpool(image.save, buffer, "PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    async def model(_: Request) -> Response:
        return JSONResponse(host.describe())

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def listing(_: Request) -> Response:
        return JSONResponse({"images": list(library(images))})

    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in STATIC:
            raise ApiError(404, f"no page {name!r}")
        return Response(_static(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    routes = [
        Route("/", page),
        Route("/static/{name}", page),
        Route("/api/health", health),
        Route("/api/model", model),
        Route("/api/library", listing),
        Route("/api/library/{name}", open_listed, methods=["POST"]),
        Route("/api/images", upload, methods=["POST"]),
        Route("/api/images/{id}", image_pixels),
        Route("/api/images/{id}/masks", masks, methods=["POST"]),
        Route("/api/images/{id}/everything", everything, methods=["POST"]),
        Route("/api/images/{id}/detections", detections, methods=["POST"]),
    ]

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    async def api_error(_: Request, e: Exception) -> Response:
        assert isinstance(e, ApiError)
        return error(e.status, e.message)

    async def not_found(_: Request, e: Exception) -> Response:
        return error(404, str(e))

    async def invalid(_: Request, e: Exception) -> Response:
        return error(422, str(e).splitlines()[0])

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        messages = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed here"}
        return error(e.status_code, messages.get(e.status_code, str(e.detail)))

    async def guard_and_log(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        name = _host_name(request.headers.get("host", ""))
        if hosts is not None and name not in hosts:
            shown = sorted(hosts)
            response: Response = error(
                400, f"this server answers to the host names {', '.join(shown)} only, not {name or 'none'!r}"
            )
        elif token is not None and request.url.path.startswith("/api/") and not _authorised(request, token):
            response = error(401, "this server needs its access token (printed when it started)")
        else:
            response = await call_next(request)
        if log:
            ms = 1000 * (time.perf_counter() - start)
            print(f"{request.method} {request.url.path} {response.status_code} {ms:.1f} ms", file=sys.stderr)
        return response

    return Starlette(
        routes=routes,
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard_and_log)],
        exception_handlers={ApiError: api_error, NotFound: not_found, ValueError: invalid, HTTPException: http_error},
    )


def _authorised(request: Request, token: str) -> bool:
    scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
    sent = credentials.strip() if scheme.lower() == "bearer" else ""  # auth schemes are case-insensitive (RFC 7235)
    sent = sent or request.query_params.get("token", "")
    return secrets.compare_digest(sent.encode(), token.encode())
