"""Devices named by people (`--device`, `[run] device`), checked before anything is built on them."""

import torch


def usable_device(name: str) -> torch.device:
    """The device `name`, if tensors can live on it here.

    Raises:
        ValueError: a predicate to put after the name: "is not usable here (why)" for a device this machine or
            this torch build lacks, "holds no data: ..." for `meta`.
    """
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"is not usable here ({str(e).splitlines()[0]})") from None
    if device.type == "meta":
        raise ValueError("holds no data: use cpu, cuda, mps, ...")
    return device
