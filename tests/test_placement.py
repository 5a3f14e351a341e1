"""`check_placement` on its own (the HQ and LoRA tests check it through `inject()`)."""

import warnings

import pytest
import torch

from finesam.adapters.placement import check_placement


def test_another_device_is_refused_even_after_another_dtype():
    base = torch.zeros(1)
    joins = [(base.bfloat16(), base, "layer a"), (torch.zeros(1, device="meta"), base, "layer b")]
    with pytest.raises(ValueError, match=r"on meta but the layer b they join is torch\.float32 on cpu"):
        check_placement("an adapter", joins)


def test_another_dtype_warns_once_and_the_same_placement_is_silent():
    base = torch.zeros(1)
    with pytest.warns(UserWarning, match="layer a they join") as caught:
        check_placement("an adapter", [(base.bfloat16(), base, "layer a"), (base.half(), base, "layer b")])
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_placement("an adapter", [(base.clone(), base, "layer a")])
