"""An adapter's weights join the layers of a model: on another device they cannot run, in another dtype only
under `torch.autocast`."""

import warnings
from collections.abc import Iterable

from torch import Tensor


def check_placement(adapter: str, joins: Iterable[tuple[Tensor, Tensor, str]]) -> None:
    """Checks, for each (weight of `adapter`, weight of the layer it joins, that layer's name), that the two are
    on the same device in the same dtype, as they are not after a model was moved with `.to()` but not the
    adapter built before it: raises `ValueError` for another device, and warns once for another dtype (which
    runs under `torch.autocast` only). Both messages say how to move the adapter."""
    other_dtype = ""
    for weight, base, joined in joins:
        if weight.device == base.device and weight.dtype == base.dtype:
            continue
        message = (
            f"the weights of {adapter} are {weight.dtype} on {weight.device} but the {joined} they join is "
            f"{base.dtype} on {base.device}: move the adapter first (`adapter.to(device={str(base.device)!r}, "
            f"dtype={base.dtype})`), or build it after moving the model"
        )
        if weight.device != base.device:
            raise ValueError(message)
        other_dtype = other_dtype or message
    if other_dtype:
        warnings.warn(f"{other_dtype}; outside torch.autocast the model will fail", stacklevel=3)
