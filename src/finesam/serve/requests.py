"""What an API request may send, checked before it reaches the model: every bad value is one sentence."""

import math
from typing import Any

from finesam.amg import GENERATOR_OPTIONS, AutomaticMaskGenerator
from finesam.serve.host import MaskRequest


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one clear sentence."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _invalid(message: str) -> ApiError:
    return ApiError(422, message)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise _invalid(f"{where} must be finite, got {value!r}")
    return float(value)


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise _invalid(f'"{key}" must be true or false, got {value!r}')
    return value


def _loras(data: dict[str, Any]) -> tuple[str, ...]:
    value = data.get("loras", [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _invalid(f'"loras" must be a list of names, got {value!r}')
    if len(set(value)) != len(value):
        raise _invalid(f'"loras" names a LoRA twice: {value!r}')
    return tuple(value)


MAX_POINTS_PER_SIDE = 128  # 16384 prompts: one request cannot hold the model for long
MASK_KEYS = {"points", "labels", "box", "multimask", "hq", "hq_only", "loras"}


def mask_request(data: Any) -> MaskRequest:
    """A `MaskRequest` from the JSON of `POST /api/images/{id}/masks`.

    Raises:
        ApiError: 422 naming the first problem (shapes, types, NaN, x2 < x1, ...).
    """
    if not isinstance(data, dict):
        raise _invalid(f"the request body must be a JSON object, got {type(data).__name__}")
    if unknown := sorted(set(data) - MASK_KEYS):
        raise _invalid(f"unknown keys {unknown} (known: {sorted(MASK_KEYS)})")
    points, labels, box = data.get("points"), data.get("labels"), data.get("box")
    if points is not None:
        if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
            raise _invalid(f'"points" must be a list of [x, y] pairs, got {points!r}')
        points = [[_number(v, f"points[{i}]") for v in p] for i, p in enumerate(points)] or None
    if labels is not None:
        if not isinstance(labels, list) or not all(type(v) is int and v in (0, 1) for v in labels):
            raise _invalid(f'"labels" must be a list of 1 (foreground) and 0 (background), got {labels!r}')
        if points is None or len(labels) != len(points):
            raise _invalid(f'"labels" needs one label per point ({0 if points is None else len(points)} points)')
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise _invalid(f'"box" must be [x1, y1, x2, y2] or null, got {box!r}')
        box = [_number(v, f"box[{i}]") for i, v in enumerate(box)]
        if box[2] < box[0] or box[3] < box[1]:
            raise _invalid(f'"box" must have x2 >= x1 and y2 >= y1, got {box!r}')
    if points is None and box is None:
        raise _invalid('give "points" and/or a "box"')
    return MaskRequest(
        points=points,
        labels=labels if labels else None,
        box=box,
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
                raise _invalid(f'"{name}" must be an integer, got {value!r}')
            options[name] = kind(_number(value, f'"{name}"'))
    if options.get("points_per_side", 0) > MAX_POINTS_PER_SIDE:
        raise _invalid(f'"points_per_side" is at most {MAX_POINTS_PER_SIDE} on this server')
    try:
        AutomaticMaskGenerator.check_options(**options)
    except (ValueError, TypeError) as e:
        raise _invalid(str(e)) from None
    return options, _flag(data, "hq"), _flag(data, "hq_only"), _loras(data)
