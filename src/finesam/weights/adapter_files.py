"""One way to save any trained adapter: HQ-SAM, LoRA, or a user-defined variant, each in its own format."""

from pathlib import Path
from typing import Any

from finesam.adapters.hq import HQ_ADAPTERS
from finesam.adapters.lora import SAMLoraAdapter
from finesam.weights.hq import save_hq
from finesam.weights.io import format_metadata, write_safetensors
from finesam.weights.lora import save_lora

FORMAT_VARIANT = "variant"


def save_adapter(adapter: Any, directory: Path, name: str) -> Path:
    """Writes an adapter's weights in the format its loader reads: `hq.safetensors` (`load_hq`),
    `LORA_NAME.lora.safetensors` (`load_lora`), or `NAME.safetensors` for any other adapter chain.

    Returns:
        The file written.
    """
    if type(adapter) in HQ_ADAPTERS.values():  # HQ-SAM or HQ-SAM 2; subclasses (variants) are saved as variants
        return save_hq(adapter, directory / "hq.safetensors")
    if isinstance(adapter, SAMLoraAdapter):
        return save_lora(adapter, directory / f"{adapter.name}.lora.safetensors")
    metadata = format_metadata(FORMAT_VARIANT, variant={"class": type(adapter).__qualname__})
    return write_safetensors(adapter.state_dict(), directory / f"{name}.safetensors", metadata)
