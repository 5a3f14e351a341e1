"""`finesam serve`: the browser page and HTTP API (docs/serve.md), on one loaded model."""

import argparse
import secrets
import socket
import sys
from pathlib import Path

from finesam.cli.common import UsageError, load_base
from finesam.cli.demo import converted_checkpoint, find_checkpoint, instructions
from finesam.cli.options import Commands, add_command, model_options, port_number, positive_int, positive_number
from finesam.cli.text_prompts import load_detector
from finesam.detection import DetectorError, check_detector_source
from finesam.serve.app import BODY_TIMEOUT_S, MIN_TOKEN_LENGTH, allowed_hosts, check_token
from finesam.weights import load_lora

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def access_token(text: str) -> str:
    """An argparse type: `--token`, checked by the server's one rule (`finesam.serve.app.check_token`)."""
    try:
        return check_token(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from finesam.serve import ModelHost, create_app

    if args.images is not None and not args.images.is_dir():
        raise UsageError(f"--images {args.images}: not a folder")
    token = args.token
    if token is None and args.host not in LOCAL_HOSTS:
        token = secrets.token_urlsafe(18)  # reachable from elsewhere: never without a token
    if args.weights is None:
        checkpoint = find_checkpoint()
        if checkpoint is None:
            print(instructions("serve", "finesam serve"), file=sys.stderr)
            raise SystemExit(1)
        args.weights, hq = converted_checkpoint(checkpoint)
        args.hq = args.hq if args.hq is not None or not hq.is_file() else hq
    if args.detector is not None:  # transformers and a folder checked before anything loads
        try:
            args.detector = check_detector_source(args.detector)
        except DetectorError as e:
            raise UsageError(f"--detector: {e}") from None
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((args.host, args.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    model, adapter = load_base(args)
    loras = [load_lora(model, path) for path in args.lora]
    detector = None if args.detector is None else load_detector(args)
    host = ModelHost(model, adapter, loras, cache_images=args.cache_images, detector=detector)
    app = create_app(
        host,
        images=args.images,
        token=token,
        max_upload_mb=args.max_upload_mb,
        hosts=allowed_hosts(args.host),
        body_timeout=args.body_timeout,
    )
    listener.listen(128)  # from here connections wait in the backlog until uvicorn accepts them
    port = listener.getsockname()[1]
    shown = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"finesam serve: {url}", flush=True)
    # a bounded graceful shutdown: a client holding a connection open must not keep Ctrl-C / SIGTERM waiting
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    server.run(sockets=[listener])


def add_commands(commands: Commands) -> None:
    serve = add_command(
        commands,
        "serve",
        "the interactive page and HTTP API on one loaded model",
        (model_options(weights_required=False),),
        description="the interactive page and HTTP API on one loaded model (docs/serve.md)\n\n"
        "Without --weights, the demo's checkpoint is used ($FINESAM_CHECKPOINT or the cache folder).",
    )
    serve.add_argument("--lora", type=Path, action="append", default=[], metavar="LORA.safetensors", help="repeatable")
    serve.add_argument("--host", default="127.0.0.1", help="any other address than this machine's needs a token")
    serve.add_argument("--port", type=port_number, default=7860, help="0: any free port (the URL printed says which)")
    serve.add_argument(
        "--token",
        type=access_token,
        help=f"the access token API calls must send, at least {MIN_TOKEN_LENGTH} characters (default: one is "
        "generated off-machine)",
    )
    serve.add_argument("--images", type=Path, metavar="DIR", help="a folder of images the page may open by name")
    serve.add_argument("--cache-images", type=positive_int, default=8, help="images (and embeddings) kept")
    serve.add_argument("--max-upload-mb", type=positive_number, default=50, help="the largest image upload accepted")
    serve.add_argument(
        "--body-timeout",
        type=positive_number,
        default=BODY_TIMEOUT_S,
        metavar="S",
        help="seconds a request body may take to arrive in full (a client that stops halfway is cut off)",
    )
    serve.add_argument(
        "--detector",
        metavar="HUB_ID|DIR",
        help="text prompts on the page: this transformers zero-shot object detector (e.g. "
        "IDEA-Research/grounding-dino-tiny, or a local folder; pip install 'finesam[text]')",
    )
    serve.set_defaults(run=run_serve, box_threshold=None, text_threshold=None)
