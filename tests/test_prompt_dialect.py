"""One JSON prompt dialect (docs/prompting.md), one parser (`finesam.inputs.parse_json_prompts`): the same JSON
objects read by `segment --prompts`, by a manifest line and by the HTTP API give the same prompts, and the same
bad objects are refused by all three with the same sentence. The HTTP side over a real server is in
test_serve.py (`test_the_json_dialect_over_http`)."""

import json
from typing import Any

import pytest

from finesam.cli.common import UsageError
from finesam.cli.segment import read_prompt_file
from finesam.inputs import JsonPrompts, parse_json_prompts
from finesam.labelling import read_manifest
from finesam.serve.requests import ApiError, mask_request

BOX = [120, 60, 520, 480]

# each object is one prompt of one object: what all three entry points take
SAME = {
    "box": ({"box": BOX}, {"boxes": [BOX]}, {"boxes": BOX}, {"points": [], "labels": [], "box": BOX}),
    "points": (
        {"points": [[400, 260]]},
        {"points": [[400, 260]], "labels": [1]},
        {"points": [[[400, 260]]], "labels": [[1]], "boxes": []},
    ),
    "points and box": (
        {"points": [[400, 260], [150, 100]], "labels": [1, 0], "box": BOX},
        {"points": [[[400, 260], [150, 100]]], "labels": [[1, 0]], "boxes": [BOX]},
    ),
}

BAD = [
    ({}, 'give "box" (or "boxes") and/or "points"'),
    ({"points": [], "labels": [], "box": None}, 'give "box" (or "boxes") and/or "points"'),
    ({"box": [1, 2, 3]}, '"box" must be [x1, y1, x2, y2]'),
    ({"boxes": [[1, 2, 3, True]]}, '"boxes" must hold numbers'),
    ({"box": BOX, "boxes": BOX}, 'give "box" or "boxes", not both'),
    ({"box": [50, 50, 10, 60]}, "x2 >= x1"),
    ({"points": [[1, "2"]]}, '"points" must hold numbers'),
    ({"points": [[1, 2, 3]]}, '"points" must be a list of [x, y] pairs'),
    ({"labels": [1]}, '"labels" were given without "points"'),
    ({"points": [[1, 2]], "labels": [2]}, "1 (foreground) or 0 (background)"),
    ({"points": [[1, 2]], "labels": [True]}, "1 (foreground) or 0 (background)"),
    ({"points": [[1, 2]], "labels": [1, 0]}, "one label per point"),
]


def through_segment(tmp_path, data: dict[str, Any]) -> JsonPrompts:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([data]))
    (prompt,) = read_prompt_file(path)
    return prompt.objects


def through_manifest(tmp_path, data: dict[str, Any]) -> JsonPrompts:
    path = tmp_path / "manifest.jsonl"
    path.write_text(json.dumps({"image": "a.png", **data}) + "\n")
    (job,) = read_manifest(path)
    assert job.prompts is not None
    return JsonPrompts(job.prompts.boxes, job.prompts.points, job.prompts.labels)


def through_http(tmp_path, data: dict[str, Any]) -> JsonPrompts:
    request = mask_request(json.loads(json.dumps(data)))
    return JsonPrompts(
        None if request.box is None else [request.box],
        None if request.points is None else [request.points],
        None if request.labels is None else [request.labels],
    )


ENTRY_POINTS = [through_segment, through_manifest, through_http]


@pytest.mark.parametrize("kind", list(SAME))
def test_the_same_objects_give_the_same_prompts_everywhere(tmp_path, kind):
    expected = parse_json_prompts(SAME[kind][0])
    assert len(expected) == 1
    for data in SAME[kind]:
        for read in ENTRY_POINTS:
            assert read(tmp_path, data) == expected, (read.__name__, data)


def test_several_objects_in_a_manifest_and_in_a_prompts_file(tmp_path):
    data = {"boxes": [BOX, [0, 0, 10, 10]], "points": [[[400, 260]], [[5, 5]]], "labels": [[1], [0]]}
    expected = JsonPrompts(
        [[float(v) for v in BOX], [0.0, 0.0, 10.0, 10.0]], [[[400.0, 260.0]], [[5.0, 5.0]]], [[1], [0]]
    )
    assert through_manifest(tmp_path, data) == through_segment(tmp_path, data) == expected
    with pytest.raises(ApiError, match="one object per request"):
        through_http(tmp_path, data)


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_objects_are_refused_everywhere_with_the_same_sentence(tmp_path, data, message):
    for read, error in zip(ENTRY_POINTS, (UsageError, ValueError, ApiError), strict=True):
        with pytest.raises(error) as raised:
            read(tmp_path, data)
        assert message in str(raised.value), (read.__name__, str(raised.value))
