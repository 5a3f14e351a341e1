"""What an API request may send, checked before it reaches the model: every bad value is one sentence."""

from typing import Any

from finesam.amg import GENERATOR_OPTIONS, AutomaticMaskGenerator
from finesam.inputs import JSON_PROMPT_KEYS, finite_number, parse_json_prompts, shown
from finesam.serve.host import DetectionRequest, MaskRequest


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one clear sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _invalid(message: str) -> ApiError:
    return ApiError(422, message)


def _number(value: Any, where: str) -> float:
    number = finite_number(value)
    if number is None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _invalid(f"{where} must be a number, got {shown(value)}")
        raise _invalid(f"{where} must be a finite number a float holds, got {shown(value)}")
    return number


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise _invalid(f'"{key}" must be true or false, got {shown(value)}')
    return value


def _loras(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("loras", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f'"loras" must be a list of names, got {shown(value)}')
    if len(set(value)) != len(value):
        raise _invalid(f'"loras" names a LoRA twice: {shown(value)}')
    return tuple(value)


MAX_POINTS_PER_SIDE = 128  # 16384 prompts: one request cannot hold the model for long
MASK_KEYS = JSON_PROMPT_KEYS | {"multimask", "hq", "hq_only", "loras"}


def mask_request(data: Any) -> MaskRequest:
    """A `MaskRequest` from the JSON of `POST /api/images/{id}/masks`: one object in the JSON prompt dialect
    (docs/prompting.md: "box" or "boxes", "points", "labels"; `[]` means none) and the model setup.

    Raises:
        ApiError: 422 naming the first problem (shapes, types, NaN, x2 < x1, more than one object, ...).
    """
    if not isinstance(data, dict):
        raise _invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    if unknown := sorted(set(data) - MASK_KEYS):
        raise _invalid(f"unknown keys {unknown} (known: {sorted(MASK_KEYS)})")
    try:
        objects = parse_json_prompts(data)
    except ValueError as e:
        raise _invalid(str(e)) from None
    if len(objects) != 1:
        raise _invalid(f"one object per request: one box and/or one point list, got {len(objects)} objects")
    return MaskRequest(
        points=None if objects.points is None else objects.points[0],
        labels=None if objects.labels is None else objects.labels[0],
        box=None if objects.boxes is None else objects.boxes[0],
        multimask=_flag(data, "multimask"),
        hq=_flag(data, "hq"),
        hq_only=_flag(data, "hq_only"),
        loras=_loras(data),
    )


def everything_request(data: Any) -> tuple[dict[str, Any], bool, bool, tuple[str, ...]]:
    """Generator options, hq, hq_only and LoRA names from the JSON of `POST /api/images/{id}/everything`."""
    if not isinstance(data, dict):
        raise _invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    known = {*GENERATOR_OPTIONS, "hq", "hq_only", "loras"}
    if unknown := sorted(set(data) - known):
        raise _invalid(f"unknown keys {unknown} (known: {sorted(known)})")
    options: dict[str, Any] = {}
    for name, (kind, _) in GENERATOR_OPTIONS.items():
        if name in data:
            value = data[name]
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise _invalid(f'"{name}" must be an integer, got {shown(value)}')
            options[name] = kind(_number(value, f'"{name}"'))
    if options.get("points_per_side", 0) > MAX_POINTS_PER_SIDE:
        raise _invalid(f'"points_per_side" is at most {MAX_POINTS_PER_SIDE} on this server')
    try:
        AutomaticMaskGenerator.check_options(**options)
    except (ValueError, TypeError) as e:
        raise _invalid(str(e)) from None
    return options, _flag(data, "hq"), _flag(data, "hq_only"), _loras(data)


MAX_TEXT_CHARACTERS = 1000


def detection_request(data: Any) -> DetectionRequest:
    """A `DetectionRequest` from the JSON of `POST /api/images/{id}/detections`: {"text": "a dog. a cat.",
    "box_threshold": 0.3, "text_threshold": 0.25, "max_detections": 10} (all but "text" optional)."""
    if not isinstance(data, dict):
        raise _invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    known = {"text", "box_threshold", "text_threshold", "max_detections"}
    if unknown := sorted(set(data) - known):
        raise _invalid(f"unknown keys {unknown} (known: {sorted(known)})")
    text = data.get("text")
    if not isinstance(text, str) or not text.strip():
        raise _invalid(f'"text" must be the phrases to find, separated by dots ("a dog. a cat."), got {shown(text)}')
    if len(text) > MAX_TEXT_CHARACTERS:
        raise _invalid(f'"text" is at most {MAX_TEXT_CHARACTERS} characters')
    thresholds: dict[str, float | None] = {}
    for key in ("box_threshold", "text_threshold"):
        value = data.get(key)
        number = None if value is None else _number(value, f'"{key}"')
        if number is not None and not 0 <= number <= 1:
            raise _invalid(f'"{key}" must be between 0 and 1, got {shown(value)}')
        thresholds[key] = number
    limit = data.get("max_detections")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise _invalid(f'"max_detections" must be a whole number of at least 1, got {shown(limit)}')
    return DetectionRequest(text, thresholds["box_threshold"], thresholds["text_threshold"], limit)
