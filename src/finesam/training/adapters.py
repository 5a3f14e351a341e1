"""The adapters a training run trains: HQ-SAM, LoRA, a user-defined variant; built, loaded and saved."""

import importlib
from typing import Any

from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import Adapter

from finesam.adapters.hq import hq_adapter_for
from finesam.adapters.lora import TARGETS, SAMLoraAdapter
from finesam.model.sam import SegmentAnything
from finesam.training.config import TrainConfig, VariantConfig
from finesam.weights import hq_weights_for, load_hq, load_lora
from finesam.weights.hq import with_current_names
from finesam.weights.io import read_safetensors


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
        adapter.load_state_dict(with_current_names(tensors))  # variants of HQ-SAM share its part names
    return adapter


def build_adapters(config: TrainConfig, model: SegmentAnything) -> dict[str, Any]:
    """The adapters of `config` for `model`, not injected, in injection order (hq, lora, variant).

    Without an `[hq] init`, the HQ adapter starts from the HQ weights of the base checkpoint when it is an
    official HQ-SAM `.pth`, else from scratch.
    """
    adapters: dict[str, Any] = {}
    if config.hq is not None:
        source = hq_weights_for(config.model.weights, config.hq.init)
        adapters["hq"] = hq_adapter_for(model) if source is None else load_hq(model, source)
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
