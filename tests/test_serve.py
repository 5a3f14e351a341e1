"""`finesam serve` over real HTTP: a server subprocess on 127.0.0.1 with random weights converted from the
official HQ-SAM package, its masks compared bit for bit with `predict` on the same files in this process."""

import io
import json
import signal
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finesam.adapters.lora import SAMLoraAdapter
from finesam.amg import AutomaticMaskGenerator
from finesam.amg.rle import from_coco, rle_to_mask
from finesam.weights import convert_checkpoint, load_hq, load_lora, load_sam, save_lora

from conftest import SMALL, photo
from helpers import finesam
from official import build_official
from served import Served


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("serve")
    checkpoint = folder / "sam_hq_small.pth"
    torch.save(build_official(SMALL, seed=5, hq=True).state_dict(), checkpoint)
    base, hq = convert_checkpoint(checkpoint, folder).written
    model = load_sam(base)
    lora = SAMLoraAdapter(model, name="tune", rank=2)
    torch.manual_seed(0)
    for parameter in lora.parameters():
        parameter.data.normal_(0, 0.05)  # a trained-looking LoRA: it changes the masks
    images = folder / "images"
    images.mkdir()
    photo("rocket").save(images / "rocket.png")
    photo("chelsea").save(images / "chelsea.jpg")
    (images / "notes.txt").write_text("not listed")
    return {"base": base, "hq": hq, "lora": save_lora(lora, folder / "tune.lora.safetensors"), "images": images}


@pytest.fixture(scope="module")
def server(files):
    served = Served(
        "--weights", files["base"], "--hq", files["hq"], "--lora", files["lora"], "--images", files["images"],
        "--max-upload-mb", "2", "--cache-images", "3", "--body-timeout", "2",
    )  # fmt: skip
    yield served
    served.close()


@pytest.fixture(scope="module")
def local(files):
    """The same weights in this process: the reference."""
    model = load_sam(files["base"])
    return model, load_hq(model, files["hq"]), load_lora(model, files["lora"])


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def uploaded(server) -> dict[str, object]:
    status, answer = server.upload(png(photo("rocket")), "rocket.png")
    assert status == 200, answer
    return answer


def decoded(answer: dict) -> list[np.ndarray]:
    return [rle_to_mask(from_coco(mask["rle"])) for mask in answer["masks"]]


def expected(local, image, prompt: dict, hq: bool = False, hq_only: bool = False, lora: bool = False) -> dict:
    model, adapter, tune = local
    injected = [a for a, on in ((adapter, hq), (tune, lora)) if on]
    for a in injected:
        a.inject()
    adapter.hq_mask_only = hq_only
    try:
        kwargs = {"points": prompt.get("points"), "labels": prompt.get("labels"), "boxes": prompt.get("box")}
        prediction = model.predict(image, multimask_output=prompt.get("multimask", False), **kwargs)
    finally:
        for a in reversed(injected):
            a.eject()
    return {"masks": [m.numpy() for m in prediction.masks[0]], "scores": prediction.iou_predictions[0].tolist()}


PROMPTS = [
    {"points": [[400, 260]], "labels": [1]},
    {"box": [120, 60, 520, 480]},
    {"points": [[400, 260], [150, 100]], "labels": [1, 0], "box": [120, 60, 520, 480], "multimask": True},
]


def test_health_and_model(server):
    assert server.call("GET", "/api/health") == (200, {"status": "ok"})
    status, model = server.call("GET", "/api/model")
    assert status == 200 and model["adapters"] == {"hq": True, "loras": ["tune"]}
    assert model["model"].startswith("SAM custom") and model["cache"]["limit"] == 3


@pytest.mark.parametrize("prompt", PROMPTS, ids=["point", "box", "points+box multimask"])
@pytest.mark.parametrize(
    "setup", [{}, {"hq": True}, {"hq": True, "hq_only": True}, {"loras": ["tune"]}, {"hq": True, "loras": ["tune"]}]
)
def test_masks_equal_predict_bit_for_bit(server, uploaded, local, prompt, setup):
    status, answer = server.call("POST", f"/api/images/{uploaded['id']}/masks", {**prompt, **setup})
    assert status == 200, answer
    reference = expected(
        local, photo("rocket"), prompt, setup.get("hq", False), setup.get("hq_only", False), "loras" in setup
    )
    masks = decoded(answer)
    # HQ-SAM's multimask rule keeps one mask (the best of SAM's three, with the HQ mask)
    assert len(masks) == (3 if prompt.get("multimask") and not setup.get("hq") else 1) == len(reference["masks"])
    for mask, wanted in zip(masks, reference["masks"], strict=True):
        np.testing.assert_array_equal(mask, wanted)
    assert [m["score"] for m in answer["masks"]] == pytest.approx(reference["scores"], abs=1e-6)
    assert answer["ms"] > 0


def test_hq_changes_the_mask_and_switching_back_restores_sam(server, uploaded):
    path = f"/api/images/{uploaded['id']}/masks"
    prompt = PROMPTS[1]
    first = decoded(server.call("POST", path, prompt)[1])[0]
    with_hq = decoded(server.call("POST", path, {**prompt, "hq": True})[1])[0]
    again = decoded(server.call("POST", path, prompt)[1])[0]
    assert not np.array_equal(first, with_hq)  # random HQ weights: a different mask
    np.testing.assert_array_equal(first, again)  # ejected: SAM exactly as before
    assert server.call("GET", "/api/model")[1]["injected"] == []


def test_library_lists_and_opens_only_its_images(server):
    assert server.call("GET", "/api/library") == (200, {"images": ["chelsea.jpg", "rocket.png"]})
    status, answer = server.call("POST", "/api/library/chelsea.jpg")
    assert status == 200 and (answer["width"], answer["height"]) == photo("chelsea").size
    for name in ("notes.txt", "..%2Fserve.pth", "%2Fetc%2Fpasswd", "missing.png"):
        status, answer = server.call("POST", f"/api/library/{name}")
        assert status == 404 and "error" in answer, (name, answer)


def test_everything_equals_the_generator(server, uploaded, local):
    options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    status, answer = server.call("POST", f"/api/images/{uploaded['id']}/everything", {**options, "hq": True})
    assert status == 200, answer
    model, adapter, _ = local
    adapter.inject()
    adapter.hq_mask_only = False
    try:
        records = AutomaticMaskGenerator(model, **options, output_mode="coco_rle").generate(photo("rocket"))
    finally:
        adapter.eject()
    assert len(answer["annotations"]) == len(records) > 0
    for annotation, record in zip(answer["annotations"], records, strict=True):
        assert annotation["segmentation"] == record["segmentation"]
        assert annotation["bbox"] == record["bbox"] and annotation["area"] == record["area"]
        assert annotation["score"] == pytest.approx(record["predicted_iou"], abs=1e-6)


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    at = data.index(b"IHDR")
    data[at + 4 : at + 12] = struct.pack(">II", 60_000, 60_000)
    data[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(data[at : at + 17])))
    return bytes(data)


BAD_MASK_REQUESTS = [
    ("not json", b"{points: [1, 2]", "not valid JSON"),
    ("not an object", [1, 2], "must be a JSON object"),
    ("no prompt", {}, 'give "box" (or "boxes") and/or "points"'),
    ("unknown key", {"box": [1, 1, 5, 5], "colour": 1}, "unknown keys ['colour']"),
    ("point shape", {"points": [[1, 2, 3]]}, "list of [x, y] pairs"),
    ("string coordinate", {"points": [["1", 2]]}, "must hold numbers"),
    ("NaN", b'{"points": [[NaN, 2]]}', "must hold finite numbers"),
    ("label", {"points": [[1, 2]], "labels": [2]}, "1 (foreground) or 0 (background)"),
    ("label count", {"points": [[1, 2]], "labels": [1, 0]}, "one label per point"),
    ("box order", {"box": [50, 50, 10, 60]}, "x2 >= x1"),
    ("box length", {"box": [1, 2, 3]}, "[x1, y1, x2, y2]"),
    ("box and boxes", {"box": [1, 1, 5, 5], "boxes": [1, 1, 5, 5]}, '"box" or "boxes", not both'),
    ("two objects", {"boxes": [[1, 1, 5, 5], [2, 2, 6, 6]]}, "one object per request"),
    ("outside", {"points": [[5000, 10]]}, "outside"),
    ("multimask type", {"box": [1, 1, 5, 5], "multimask": "yes"}, '"multimask" must be true or false'),
    ("unknown lora", {"box": [1, 1, 5, 5], "loras": ["other"]}, "unknown LoRA other"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_MASK_REQUESTS, ids=[c[0] for c in BAD_MASK_REQUESTS])
def test_bad_mask_requests_get_422_and_the_server_keeps_serving(server, uploaded, case, body, message):
    path = f"/api/images/{uploaded['id']}/masks"
    raw = body if isinstance(body, bytes) else None
    status, answer = server.call("POST", path, None if raw else body, raw=raw)
    assert status == 422 and message in answer["error"], (case, answer)
    assert server.call("POST", path, PROMPTS[1])[0] == 200


def test_the_json_dialect_over_http(server, uploaded):
    """ "box" or "boxes", empty lists meaning none (`"points": [], "labels": []` with a box was refused with
    422): every spelling of one box gives the masks of `{"box": ...}`, bit for bit."""
    path = f"/api/images/{uploaded['id']}/masks"
    box = PROMPTS[1]["box"]
    status, reference = server.call("POST", path, {"box": box})
    assert status == 200, reference
    for body in (
        {"boxes": [box]},
        {"boxes": box},
        {"points": [], "labels": [], "box": box},
        {"points": None, "box": [box]},
    ):
        status, answer = server.call("POST", path, body)
        assert status == 200, (body, answer)
        assert [m.tolist() for m in decoded(answer)] == [m.tolist() for m in decoded(reference)], body
        assert answer["masks"][0]["score"] == reference["masks"][0]["score"]


def test_bad_uploads_and_ids(server):
    good = io.BytesIO()
    photo("rocket").save(good, format="JPEG")
    cases = [
        (b"hello, not an image", 422, "not a readable image"),
        (good.getvalue()[:5000], 422, "not a readable image"),  # truncated
        (bomb(), 413, "pixel limit"),
        (np.random.default_rng(0).bytes(2_500_000), 413, "over the limit of 2 MB"),
    ]
    for content, code, message in cases:
        status, answer = server.upload(content)
        assert status == code and message in answer["error"], answer
    status, answer = server.call("POST", "/api/images", raw=b"plain", headers={"Content-Type": "text/plain"})
    assert status == 422 and "multipart/form-data" in answer["error"]
    status, answer = server.call("POST", "/api/images/0123456789abcdef/masks", PROMPTS[1])
    assert status == 404 and "unknown image id" in answer["error"]
    assert server.call("GET", "/api/nothing")[0] == 404
    assert server.call("GET", "/api/images")[0] == 405
    status, answer = server.call("POST", "/api/images/x/everything", {"points_per_side": 100000})
    assert status == 422 and "at most 128" in answer["error"]
    assert server.call("GET", "/api/health")[0] == 200


def test_the_cache_is_bounded_and_reported(server):
    ids = [server.upload(png(photo(name).resize((200, 150))))[1]["id"] for name in ("coffee", "astronaut", "rocket")]
    for image_id in ids:
        assert server.call("POST", f"/api/images/{image_id}/masks", {"box": [10, 10, 100, 100]})[0] == 200
    cache = server.call("GET", "/api/model")[1]["cache"]
    assert cache["images"] == 3 and cache["bytes"] > 3 * 200 * 150 * 3
    server.upload(png(photo("chelsea").resize((200, 150))))
    status, answer = server.call("POST", f"/api/images/{ids[0]}/masks", {"box": [10, 10, 100, 100]})
    assert status == 404 and "keeps the last 3 images" in answer["error"]


def test_concurrent_clients_get_the_sequential_answers(server):
    """8 clients x 25 prompts over two images, HQ and LoRA switched from request to request: every answer
    equals the answer the same request gets alone."""
    images = [server.upload(png(photo(name).resize((600, 400))))[1]["id"] for name in ("rocket", "coffee")]
    setups = [{}, {"hq": True}, {"loras": ["tune"]}, {"hq": True, "hq_only": True}]
    requests = [
        (images[i % 2], {"box": [20 + 7 * i, 30 + 5 * i, 400 + 3 * i, 380], **setups[i % 4]}) for i in range(25)
    ]
    alone = [server.call("POST", f"/api/images/{image}/masks", body)[1]["masks"] for image, body in requests]
    answers: list[list[object]] = [[] for _ in range(8)]
    errors: list[object] = []

    def client(k: int) -> None:
        for image, body in requests[k:] + requests[:k]:  # each client in its own order
            status, answer = server.call("POST", f"/api/images/{image}/masks", body)
            if status != 200:
                errors.append(answer)
            answers[k].append(answer["masks"])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert errors == []
    for k in range(8):
        assert answers[k] == alone[k:] + alone[:k]


def test_one_log_line_per_request(server):
    server.call("GET", "/api/health")
    log = server.stderr().splitlines()
    assert any(line.startswith("GET /api/health 200 ") and line.endswith(" ms") for line in log)
    assert any(line.startswith("POST /api/images/") and " 422 " in line for line in log)


TOKEN = "s3cret-token-of-24-chars"


def test_token_is_required_when_set_and_off_this_machine(files):
    served = Served("--weights", files["base"], "--token", TOKEN)
    try:
        assert served.page.endswith(f"/?token={TOKEN}")
        status, answer = served.call("GET", "/api/model")
        assert status == 401 and "access token" in answer["error"]
        assert served.call("GET", "/api/model", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert served.call("GET", "/api/health?token=s3cret-token")[0] == 401  # a prefix is not the token
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):  # schemes are case-insensitive (RFC 7235)
            assert served.call("GET", "/api/model", headers={"Authorization": f"{scheme} {TOKEN}"})[0] == 200
        for header in (f"Basic {TOKEN}", TOKEN, f"Bearer{TOKEN}", "Bearer", f"Token {TOKEN}"):
            assert served.call("GET", "/api/model", headers={"Authorization": header})[0] == 401, header
        assert served.call("GET", f"/api/health?token={TOKEN}")[0] == 200
    finally:
        served.close()
    anywhere = Served("--weights", files["base"], "--host", "0.0.0.0")
    try:
        assert "?token=" in anywhere.page  # generated: never reachable from elsewhere without one
        assert anywhere.call("GET", "/api/health")[0] == 401
        token = anywhere.page.split("?token=")[1]
        assert anywhere.call("GET", f"/api/health?token={token}")[0] == 200
    finally:
        anywhere.close()


def test_the_page_and_its_files_are_served_without_a_network(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/") as response:
        html = response.read().decode()
    assert "static/app.js" in html and "http" not in html.replace("http-equiv", "")  # nothing from elsewhere
    with urllib.request.urlopen(server.url + "/static/app.js") as response:
        script = response.read().decode()
    assert "fetch(" in script and "https://" not in script and "http://" not in script
    assert server.call("GET", "/static/..%2F__init__.py")[0] == 404
    assert json.loads(json.dumps(server.call("GET", "/static/secret.py")[1]))["error"]


def test_without_weights_it_serves_the_demo_checkpoint(files, tmp_path):
    """No --weights: the demo's lookup ($FINESAM_CHECKPOINT here), converted into the cache, HQ part included."""
    checkpoint = files["base"].with_name("sam_hq_small.pth")
    env = {"FINESAM_CHECKPOINT": str(checkpoint), "FINESAM_HOME": str(tmp_path / "cache")}
    served = Served(env=env)
    try:
        status, model = served.call("GET", "/api/model")
        assert status == 200 and model["adapters"]["hq"] is True
    finally:
        served.close()
    assert (tmp_path / "cache" / "sam_hq_small.hq.safetensors").is_file()


# -- access: the token, the Host header, body sizes and times (docs/serve.md#access) ----------------------------


def raw_call(server: Served, request: bytes, body: bytes = b"", timeout: float = 60) -> tuple[int, dict]:
    """Sends bytes as they are on a real socket and reads one response: (status, its JSON); (0, {}) when the
    server closed the connection without answering."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as connection:
        connection.sendall(request + body)
        data = b""
        while b"\r\n\r\n" not in data and (chunk := connection.recv(65536)):
            data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        if not head:
            return 0, {}
        lines = head.decode().split("\r\n")
        length = next(int(v) for k, _, v in (line.partition(": ") for line in lines) if k.lower() == "content-length")
        while len(payload) < length and (chunk := connection.recv(65536)):
            payload += chunk
    return int(lines[0].split()[1]), json.loads(payload)


def request_bytes(method: str, path: str, host: str | None, headers: str = "", version: str = "1.1") -> bytes:
    host_line = "" if host is None else f"Host: {host}\r\n"
    return f"{method} {path} HTTP/{version}\r\n{host_line}{headers}Connection: close\r\n\r\n".encode()


@pytest.fixture
def fresh(server) -> str:
    """The id of an image uploaded for this test (the module's cache keeps only the last 3)."""
    status, answer = server.upload(png(photo("rocket")))
    assert status == 200, answer
    return answer["id"]


def test_only_the_host_names_it_was_started_for(server):
    """DNS rebinding: a page of another site that resolves its name to 127.0.0.1 sends its own Host header; a
    tokenless 127.0.0.1 server answers it with 400, the page, the API and the --images files alike."""
    port = server.url.rsplit(":", 1)[1]
    for name in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", "[::1]", f"[::1]:{port}"):
        status, answer = raw_call(server, request_bytes("GET", "/api/health", name))
        assert (status, answer) == (200, {"status": "ok"}), name
    bad = ["evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", f"localhost.evil.example:{port}",
           "127.0.0.2", "", f"127.0.0.1:{port}:1", "[::1", "a b"]  # fmt: skip
    for name in bad:
        for method, path in (("GET", "/api/health"), ("GET", "/"), ("POST", "/api/library/rocket.png")):
            status, answer = raw_call(server, request_bytes(method, path, name, "Content-Length: 0\r\n"))
            assert status == 400 and "answers to the host names" in answer["error"], (name, path, answer)
    status, answer = raw_call(server, request_bytes("GET", "/api/health", None, version="1.0"))  # no Host at all
    assert status == 400 and "answers to the host names" in answer["error"]
    assert server.call("GET", "/api/health")[0] == 200


def test_json_bodies_have_a_size_limit(server, fresh):
    path = f"/api/images/{fresh}/masks"
    host = server.url.removeprefix("http://")
    # declared far over the limit: refused at once, before the client has sent (or the server read) it
    start = time.perf_counter()
    head = request_bytes("POST", path, host, "Content-Type: application/json\r\nContent-Length: 100000000\r\n")
    status, answer = raw_call(server, head, b'{"box": [' + b" " * 10_000)
    assert status == 413 and "over the limit of 1000000 bytes" in answer["error"]
    assert time.perf_counter() - start < 5
    # over the limit, declared or streamed in chunks (no length): counted while it arrives
    padded = b'{"box": [10, 10, 100, 100]' + b" " * 1_500_000 + b"}"
    status, answer = server.call("POST", path, raw=padded, headers={"Content-Type": "application/json"})
    assert status == 413 and "JSON body is over the limit" in answer["error"]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(padded[i : i + 65536]), padded[i : i + 65536])
                      for i in range(0, len(padded), 65536)) + b"0\r\n\r\n"  # fmt: skip
    status, answer = raw_call(server, request_bytes("POST", path, host, "Transfer-Encoding: chunked\r\n"), chunks)
    assert status == 413 and "JSON body is over the limit" in answer["error"]
    assert server.call("POST", path, PROMPTS[1])[0] == 200  # under the limit, spaces and all: fine


def test_held_partial_bodies_are_cut_off(server, fresh):
    """A client that sends half a body and waits is answered 408 after --body-timeout (2 s here) and its
    connection closed; one that goes away leaves one log line; others are served meanwhile."""
    path = f"/api/images/{fresh}/masks"
    host = server.url.removeprefix("http://")
    before = server.stderr()
    results: dict[str, tuple[int, dict, float]] = {}

    def held(target: str, kind: str, body: bytes) -> None:
        start = time.perf_counter()
        head = request_bytes("POST", target, host, f"Content-Type: {kind}\r\nContent-Length: 4000\r\n")
        results[target] = (*raw_call(server, head, body, timeout=30), time.perf_counter() - start)

    cases = [
        (path, "application/json", b'{"box": [1, 2,'),
        ("/api/images", "multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data"),
    ]
    threads = [threading.Thread(target=held, args=case) for case in cases]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    assert server.call("POST", path, PROMPTS[1])[0] == 200  # served while the others hold their bodies
    for thread in threads:
        thread.join(timeout=30)
    for kind, (status, answer, seconds) in results.items():
        assert status == 408 and "did not arrive in full within 2 s" in answer["error"], (kind, answer)
        assert 1.5 < seconds < 10, (kind, seconds)
    host_name, port = host.rsplit(":", 1)
    for _ in range(3):  # half a body, then the client goes away
        with socket.create_connection((host_name, int(port))) as connection:
            head = request_bytes("POST", path, host, "Content-Type: application/json\r\nContent-Length: 400\r\n")
            connection.sendall(head + b'{"points"')
    time.sleep(0.5)
    assert server.call("GET", "/api/health")[0] == 200
    log = server.stderr()[len(before) :]
    assert "Traceback" not in log and "Exception" not in log, log
    assert len([line for line in log.splitlines() if line.startswith("POST ")]) == 6, log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", ""], "at least 16 characters, got an empty token"),
        (["--token", "short-token"], "at least 16 characters, got 11 characters"),
        (["--port", "http"], "expected a port number, got 'http'"),
        (["--port", "70000"], "from 0 to 65535, got 70000"),
        (["--port", "-1"], "from 0 to 65535, got -1"),
        (["--max-upload-mb", "0"], "expected a number above 0, got '0'"),
        (["--max-upload-mb", "-5"], "expected a number above 0, got '-5'"),
        (["--max-upload-mb", "ten"], "expected a number, got 'ten'"),
        (["--max-upload-mb", "nan"], "expected a number above 0, got 'nan'"),
        (["--body-timeout", "inf"], "expected a number above 0, got 'inf'"),
    ],
)
def test_bad_serve_options_are_one_line_and_status_2(files, args, message):
    result = finesam("serve", "--weights", files["base"], *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("finesam serve")


def test_a_port_in_use_is_one_line_before_the_model_loads(files):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        start = time.perf_counter()
        result = finesam("serve", "--weights", files["base"], "--port", port)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"finesam serve: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert time.perf_counter() - start < 5


HUGE = "9" * 400  # an integer no float holds: OverflowError where it meets float arithmetic
DEEP = "[" * 100_000 + "]" * 100_000  # RecursionError in the JSON parser
NUMBER_AND_NESTING_CASES = [
    ("masks", f'{{"points": [[{HUGE}, 2]]}}', '"points" must hold finite numbers, got 99999'),
    ("masks", f'{{"box": [1, 2, 3, -{HUGE}]}}', '"box" must hold finite numbers'),
    ("masks", '{"points": [[1e999, 2]]}', '"points" must hold finite numbers, got inf'),
    ("masks", f'{{"points": [[1, 2]], "labels": [{HUGE}]}}', '"labels" must be 1 (foreground) or 0'),
    ("everything", f'{{"pred_iou_thresh": {HUGE}}}', '"pred_iou_thresh" must be a finite number'),
    ("everything", f'{{"points_per_side": {HUGE}}}', '"points_per_side" must be a finite number'),
    ("everything", f'{{"min_mask_region_area": -{HUGE}}}', '"min_mask_region_area" must be a finite number'),
    ("everything", '{"crop_n_layers": 1000000000000000000}', "crop_n_layers must be in 0..4, got"),
    ("masks", f'{{"points": {DEEP}}}', "nested deeper than 32 levels"),
    ("masks", DEEP, "nested deeper than 32 levels"),
    ("everything", '{"hq": ' * 50_000 + "1" + "}" * 50_000, "nested deeper than 32 levels"),
    ("masks", '{"points": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32 levels"),  # parses; deeper checks
]


@pytest.mark.parametrize(("endpoint", "body", "message"), NUMBER_AND_NESTING_CASES)
def test_huge_numbers_and_deep_nesting_are_422(server, fresh, endpoint, body, message):
    status, answer = server.call(
        "POST", f"/api/images/{fresh}/{endpoint}", raw=body.encode(), headers={"Content-Type": "x"}
    )
    assert status == 422 and message in answer["error"], answer
    assert len(answer["error"]) < 300  # the value is shown cut short, not its 400 digits
    assert server.call("POST", f"/api/images/{fresh}/masks", PROMPTS[1])[0] == 200


def test_upload_errors_name_the_upload_not_a_buffer(server):
    good = io.BytesIO()
    photo("rocket").save(good, format="JPEG")
    for content, name in ((b"hello, not an image", "notes.png"), (good.getvalue()[:5000], "cut.jpg")):
        status, answer = server.upload(content, name)
        assert status == 422 and answer["error"].startswith(f"{name}: not a readable image"), answer
        assert "BytesIO" not in answer["error"] and " at 0x" not in answer["error"], answer
    assert server.call("GET", "/api/health")[0] == 200


def test_sigterm_stops_the_server_while_a_client_holds_a_connection(files):
    """A client that sent half its request body and waits must not keep the server from stopping until the body
    timeout (30 s by default): SIGTERM ends it within the bounded graceful shutdown (uvicorn then re-raises the
    signal: status -SIGTERM)."""
    served = Served("--weights", files["base"])
    assert served.call("GET", "/api/health")[0] == 200  # serving: its signal handlers are in place
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as held:
        head = f"POST /api/images/none/masks HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        held.sendall(f'{head}Content-Length: 1000\r\n\r\n{{"box": '.encode())  # 9 bytes of 1000
        time.sleep(0.5)
        served.process.send_signal(signal.SIGTERM)
        start = time.monotonic()
        try:
            status = served.process.wait(timeout=20)
        finally:
            served.process.kill()
    assert status in (0, -signal.SIGTERM) and time.monotonic() - start < 15
