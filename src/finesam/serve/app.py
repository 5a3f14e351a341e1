"""The HTTP side of `finesam serve`: a Starlette app over one `ModelHost` (see docs/serve.md for the API).

Nothing a request sends reaches the file system (uploads are decoded in memory; `--images` files are served by
their listed names only) or imports code. Every refused request gets `{"error": "..."}` with a 4xx status.
"""

import io
import json
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
from finesam.serve.requests import ApiError, everything_request, mask_request

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file
STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


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
) -> Starlette:
    """The app: the page at `/`, the API under `/api/`.

    Args:
        host: the model and its adapters.
        images: a folder whose images the page may open by name.
        token: when given, every API call must send it (`Authorization: Bearer TOKEN` or `?token=TOKEN`).
        max_upload_mb: the largest upload accepted.
        log: one line per request on stderr.
    """
    max_bytes = int(max_upload_mb * 1e6)

    async def body_json(request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(422, f"the request body is not valid JSON: {e}") from None

    def decoded(data: bytes, name: str) -> Image.Image:
        try:
            return as_rgb(open_image(io.BytesIO(data)))
        except ValueError as e:
            message = str(e).split(": ", 1)[-1]
            status = 413 if "pixel limit" in message else 422
            raise ApiError(status, f"{name}: {message}") from None

    def added(image: Image.Image) -> JSONResponse:
        return JSONResponse({"id": host.add_image(image), "width": image.width, "height": image.height})

    async def upload(request: Request) -> Response:
        too_large = ApiError(413, f"the upload is over the limit of {max_upload_mb:g} MB (--max-upload-mb)")
        limit, received = max_bytes + MULTIPART_OVERHEAD, 0
        body = bytearray()  # read into memory, never spooled to disk
        async for chunk in request.stream():
            received += len(chunk)
            if received <= limit:
                body += chunk
            elif received > 4 * limit:  # drained enough to answer politely: stop reading
                raise too_large
        if received > limit:  # answered once the client has sent it all, so that it reads the answer
            raise too_large
        name, data = uploaded_file(request.headers.get("content-type", ""), bytes(body), max_bytes)
        if len(data) > max_bytes:
            raise too_large
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
        if token is not None and request.url.path.startswith("/api/") and not _authorised(request, token):
            response: Response = error(401, "this server needs its access token (printed when it started)")
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
    sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    sent = sent or request.query_params.get("token", "")
    return secrets.compare_digest(sent.encode(), token.encode())
