"""Devices named by people (`--device`, `[run] device`), checked before anything is built on them."""

import torch


def available_devices() -> list[str]:
    """The devices tensors can live on here: cpu, then each CUDA device, then mps where there is one."""
    devices = ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0))]
    mps = getattr(torch.backends, "mps", None)
    return devices + (["mps"] if mps is not None and mps.is_available() else [])


def usable_device(name: str) -> torch.device:
    """The device `name`, if tensors can live on it here.

    Raises:
        ValueError: a predicate to put after the name, one short line: "is not usable here: ..." saying whether
            torch does not know the name or this machine (or this torch build) lacks the device, and which
            devices it has; "holds no data: ..." for `meta`.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError("is not usable here: not a device name torch knows (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "meta":
        raise ValueError("holds no data: use cpu, cuda, mps, ...")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # torch's own message is a dispatcher dump of many lines
        raise ValueError(
            f"is not usable here: this machine has no such device (available: {', '.join(available_devices())})"
        ) from None
    return device
