"""The padding-point rule (a point labelled -1 when there are points but no box, as the official encoder does) is
stated once (`finesam.inputs.needs_padding_point`); the torch model's batched sequence and the ONNX predictor's
numpy one are the same for every kind of prompt, bit for bit."""

import itertools

import numpy as np
import pytest
import torch

from finesam.inputs import PADDING_LABEL, labelled_points, needs_padding_point
from finesam.model.prompt_encoder import labelled_points as torch_labelled_points
from finesam.model.prompts import Prompts

POINTS = np.array([[10.5, 20.0], [30.0, 4.25]])
LABELS = np.array([1, 0])
BOX = np.array([1.0, 2.0, 50.0, 60.0])


@pytest.mark.parametrize(("has_points", "has_box"), list(itertools.product((False, True), repeat=2)))
def test_torch_and_numpy_sequences_are_equal(has_points, has_box):
    points, labels = (POINTS, LABELS) if has_points else (None, None)
    box = BOX if has_box else None
    coords, kinds = labelled_points(points, labels, box)
    prompts = Prompts(
        points=None if points is None else torch.tensor(points[None], dtype=torch.float32),
        labels=None if labels is None else torch.tensor(labels[None]),
        boxes=None if box is None else torch.tensor(box[None], dtype=torch.float32),
    )
    torch_coords, torch_kinds = torch_labelled_points(prompts)
    assert np.array_equal(torch_coords[0].numpy(), coords.astype(np.float32))
    assert np.array_equal(torch_kinds[0].numpy(), kinds.astype(np.int64))
    padded = needs_padding_point(has_points, has_box)
    assert padded == (has_points and not has_box)
    assert (PADDING_LABEL in kinds) == padded
    if padded:  # after the points, at the origin
        assert kinds[len(POINTS)] == PADDING_LABEL and not coords[len(POINTS)].any()
