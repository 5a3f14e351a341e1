"""The one order in which finesam injects adapters: HQ-SAM first, then the LoRAs in the order given.

A LoRA may adapt layers of the HQ-SAM adapter (its `hq` targets) and is trained on a model with HQ-SAM already
injected, so HQ-SAM goes in first; LoRAs follow in the order the user gave them. Ejecting goes in reverse.
"""

from collections.abc import Sequence
from typing import TypeVar

from refiners.fluxion.adapters import Adapter

T = TypeVar("T")


def injection_order(hq: T | None, loras: Sequence[T]) -> list[T]:
    """HQ-SAM (if any), then the LoRAs: for adapters, or for their names.

    Args:
        hq: the HQ-SAM adapter (or its name), or None.
        loras: the LoRA adapters (or their names), in the order given.

    Returns:
        The order to inject them in; eject in reverse.
    """
    return ([] if hq is None else [hq]) + list(loras)


def inject_in_order(hq: Adapter | None, loras: Sequence[Adapter]) -> list[Adapter]:
    """Injects HQ-SAM (if any), then the LoRAs, each into the place it was built for.

    Args:
        hq: the HQ-SAM adapter, not injected, or None.
        loras: LoRA adapters, not injected.

    Returns:
        The adapters in injection order (eject them in reverse).
    """
    adapters = injection_order(hq, loras)
    for adapter in adapters:
        adapter.inject()
    return adapters
