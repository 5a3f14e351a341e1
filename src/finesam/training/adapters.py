"""The adapters a training run trains: HQ-SAM, LoRA, a user-defined variant; built, loaded and saved."""

import importlib
import json
from pathlib import Path
from typing import Any

from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import Adapter

from finesam.hq import HQSAMAdapter, load_hq, save_hq
from finesam.io import FORMAT_KEY, read_safetensors, write_safetensors
from finesam.lora import TARGETS, SAMLoraAdapter, load_lora
from finesam.model.sam import SegmentAnything
from finesam.training.config import TrainConfig, VariantConfig

FORMAT_VARIANT = "variant"


def import_adapter(spec: str) -> type:
    """`package.module:ClassName` -> the class."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ValueError(f"[variant] adapter must look like 'package.module:ClassName', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"[variant] cannot import {spec!r}: {e}") from None


def build_variant(model: SegmentAnything, config: VariantConfig) -> Any:
    adapter = import_adapter(config.adapter)(model, **config.options)
    if not (isinstance(adapter, Adapter) and isinstance(adapter, fl.Chain)):
        raise ValueError(f"[variant] {config.adapter} must build a refiners Adapter chain")
    if config.init is not None:
        tensors, _ = read_safetensors(config.init)
        adapter.load_state_dict(tensors)
    return adapter


def build_adapters(
    config: TrainConfig, model: SegmentAnything, official_hq: HQSAMAdapter | None = None
) -> dict[str, Any]:
    """The adapters of `config` for `model`, not injected, in injection order (hq, lora, variant).

    `official_hq` is the HQ adapter that came with an official HQ-SAM `.pth` given as the base weights.
    """
    adapters: dict[str, Any] = {}
    if config.hq is not None:
        if config.hq.init is not None:
            adapters["hq"] = load_hq(model, config.hq.init)
        else:
            adapters["hq"] = official_hq if official_hq is not None else HQSAMAdapter(model)
        adapters["hq"].hq_mask_only = config.hq.hq_mask_only
    if config.lora is not None:
        lora = config.lora
        if lora.init is not None:
            adapters["lora"] = load_lora(model, lora.init, name=lora.name, scale=lora.scale)
        else:
            include = tuple(c for t in lora.targets for c in TARGETS.get(t, (t,)))
            adapters["lora"] = SAMLoraAdapter(
                model, name=lora.name, rank=lora.rank, scale=lora.scale, include=include, exclude=lora.exclude
            )
    if config.variant is not None:
        adapters["variant"] = build_variant(model, config.variant)
    return adapters


def save_adapter(name: str, adapter: Any, directory: Path) -> Path:
    """The trained weights of one adapter, in the file format its loader reads."""
    if type(adapter) is HQSAMAdapter:  # subclasses (variants) are saved as variants
        return save_hq(adapter, directory / "hq.safetensors")
    if isinstance(adapter, SAMLoraAdapter):
        return adapter.save(directory / f"{adapter.name}.lora.safetensors")
    metadata = {FORMAT_KEY: FORMAT_VARIANT, "finesam.variant": json.dumps({"class": type(adapter).__qualname__})}
    return write_safetensors(adapter.state_dict(), directory / f"{name}.safetensors", metadata)
