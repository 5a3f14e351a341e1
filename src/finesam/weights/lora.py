"""LoRA files: the weights of one `SAMLoraAdapter` keyed by target path, with its name, rank, scale and targets."""

from pathlib import Path
from typing import Any

from finesam.adapters.lora import SAMLoraAdapter, base_linears
from finesam.model.quantized import DynamicInt8Linear
from finesam.model.sam import SegmentAnything
from finesam.text import listing
from finesam.weights.hq import adapter_config
from finesam.weights.io import CheckpointError, check_dtypes, format_metadata, read_format, write_safetensors

FORMAT_LORA = "lora"


def save_lora(adapter: SAMLoraAdapter, path: str | Path) -> Path:
    """Writes the LoRA weights alone, with name, rank, scale and targets in the metadata, atomically.

    Returns:
        `path`.
    """
    recipe = {
        "name": adapter.name,
        "rank": adapter.rank,
        "scale": adapter.scale,
        "include": list(adapter.include),
        "exclude": list(adapter.exclude),
    }
    metadata = format_metadata(FORMAT_LORA, config=adapter_config(adapter.target), lora=recipe)
    return write_safetensors({k: v.detach() for k, v in adapter.lora_weights().items()}, path, metadata)


def read_lora_metadata(path: str | Path) -> dict[str, Any]:
    """Name, rank, scale, include and exclude of a LoRA file written by `save_lora`."""
    _, sections = read_format(path, FORMAT_LORA, tensors=False)
    if not isinstance(sections.get("lora"), dict):
        raise CheckpointError(f"{path}: not a finesam LoRA file (no 'finesam.lora' metadata)")
    return sections["lora"]


def load_lora(
    model: SegmentAnything, path: str | Path, name: str | None = None, scale: float | None = None
) -> SAMLoraAdapter:
    """A `SAMLoraAdapter` for `model` with the weights of `path` (not injected yet).

    Args:
        model: the base model.
        path: a file written by `save_lora`.
        name: overrides the name recorded in the file (to inject two copies, say).
        scale: overrides the recorded scale.

    Raises:
        CheckpointError: the file is unreadable or its layers or shapes do not fit `model`.
    """
    info = read_lora_metadata(path)
    tensors, _ = read_format(path, FORMAT_LORA)
    in_file = {key.removesuffix(".down.weight") for key in tensors if key.endswith(".down.weight")}
    in_model = [linear.path for linear in base_linears(model)]
    missing = sorted(in_file - set(in_model))
    if missing:
        int8 = any(True for _ in model.image_encoder.walk(DynamicInt8Linear))
        hint = "; its image encoder is in int8 (--dtype int8), which takes no LoRA on its linear layers" if int8 else ""
        raise CheckpointError(f"{path}: LoRA targets not found in this model{hint}: {listing(missing, 5)}")
    try:
        adapter = SAMLoraAdapter(
            model,
            name=info["name"] if name is None else name,
            rank=int(info["rank"]),
            scale=float(info["scale"]) if scale is None else scale,
            include=info["include"],
            exclude=info["exclude"],
            paths=[p for p in in_model if p in in_file],  # the model's order
        )
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: bad 'finesam.lora' metadata: {e}") from None
    expected = adapter.lora_weights()
    problems = [k for k in expected if k not in tensors or tensors[k].shape != expected[k].shape]
    problems += [k for k in tensors if k not in expected]
    if problems:
        raise CheckpointError(f"{path}: LoRA weights do not fit this model: {listing(problems, 5)}")
    check_dtypes(path, tensors, expected)
    for key, parameter in expected.items():
        parameter.data.copy_(tensors[key])
    return adapter
