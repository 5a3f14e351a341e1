"""HQ-SAM weights: the official HQ keys (of an official HQ-SAM `.pth`, an official HQ-SAM 2 `.pt` or a Hugging Face
`SamHQModel` checkpoint) -> the adapter of the model's generation (`HQSAMAdapter`, `HQSAM2Adapter`), and the
adapter's own safetensors file."""

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.adapters.hq import HQAdapter, hq_adapter_for
from finesam.adapters.hq.layers import CompressEarlyFeatures, EmbeddingEncoder, HQMaskFeatures, HQToken, HQTokenMLP
from finesam.fast import apply_fast_paths, has_fast_paths
from finesam.model.sam import SegmentAnything
from finesam.weights.hf import is_hf_checkpoint, read_hf_config, read_official
from finesam.weights.io import (
    CheckpointError,
    check_tensors,
    format_metadata,
    is_official,
    load_official_state_dict,
    read_format,
    write_safetensors,
)
from finesam.weights.key_map import Rule, apply_rules, rules_for

FORMAT_HQ = "hq_sam"
HQ_KEY = re.compile(
    r"(sam_)?mask_decoder\.(hf_token|hf_mlp|compress_vit_feat|embedding_encoder|embedding_maskfeature)\."
)


def is_hq_key(key: str) -> bool:
    """Whether an official checkpoint key belongs to the HQ-SAM additions (25 keys under `mask_decoder.` in every
    HQ-SAM release, 13 under `sam_mask_decoder.` in HQ-SAM 2's)."""
    return HQ_KEY.match(key) is not None


def has_hq_keys(keys: Iterable[str]) -> bool:
    """Whether official checkpoint keys include HQ-SAM's."""
    return any(is_hq_key(k) for k in keys)


def holds_hq(path: str | Path) -> bool:
    """Whether `path` is an official HQ-SAM / HQ-SAM 2 checkpoint or a Hugging Face `SamHQModel` one (its HQ part
    loads with `load_hq`)."""
    if is_hf_checkpoint(path):
        return read_hf_config(path)["model_type"] == "sam_hq"
    return is_official(path) and has_hq_keys(load_official_state_dict(path))


def hq_weights_for(base: Path, given: Path | None = None) -> Path | None:
    """The HQ weights that go with the base weights `base`: `given` when there is such a file, else `base`
    itself when it is an official HQ-SAM checkpoint, else None."""
    if given is not None:
        return given
    return base if holds_hq(base) else None


def hq_key_map(adapter: HQAdapter) -> dict[str, Rule]:
    """For every key of `adapter.state_dict()`, the official HQ-SAM (or HQ-SAM 2) key it is made from: the
    adapter's parts under its generation's decoder prefix (HQ-SAM 2 has no early-feature fusion)."""

    def weighted(chain: fl.Chain) -> list[fl.Module]:
        return [m for m in chain if isinstance(m, fl.WeightedModule)]

    prefix = adapter.official_prefix
    pairs: list[tuple[str, fl.Module]] = [(f"{prefix}.hf_token", adapter.ensure_find(HQToken))]
    pairs += [
        (f"{prefix}.hf_mlp.layers.{j}", linear)
        for j, linear in enumerate(adapter.ensure_find(HQTokenMLP).layers(fl.Linear))
    ]
    for name, part in (
        ("compress_vit_feat", CompressEarlyFeatures),
        ("embedding_encoder", EmbeddingEncoder),
        ("embedding_maskfeature", HQMaskFeatures),
    ):
        if (found := adapter.find(part)) is not None:
            pairs += [(f"{prefix}.{name}.{i}", m) for i, m in zip((0, 1, 3), weighted(found), strict=True)]
    return rules_for(adapter, pairs)


def hq_from_state_dict(model: SegmentAnything, official: Mapping[str, Tensor]) -> HQAdapter:
    """The HQ adapter of `model`'s generation (not injected) with the HQ weights of an official HQ-SAM /
    HQ-SAM 2 `state_dict`."""
    adapter = hq_adapter_for(model)
    adapter.load_state_dict(convert_hq_state_dict(official, adapter))
    return adapter


def convert_hq_state_dict(official: Mapping[str, Tensor], adapter: HQAdapter) -> dict[str, Tensor]:
    """The adapter's weights from an official HQ-SAM / HQ-SAM 2 `state_dict` (its SAM keys are ignored)."""
    if not has_hq_keys(official):
        raise CheckpointError(f"the checkpoint has no HQ-SAM weights (no {adapter.official_prefix}.hf_token, ...)")
    return apply_rules(official, hq_key_map(adapter), adapter.state_dict(), ignore=lambda k: not is_hq_key(k))


def adapter_config(model: SegmentAnything) -> dict[str, int]:
    """What an adapter file records of the model it was made for (its shapes depend on these): the channels of
    the early embedding HQ-SAM fuses, and the prompt width. (Files of finesam 0.1 recorded `encoder_dim`, the
    encoder's last width, instead; nothing reads it back: the tensor shapes are checked against the model.)"""
    config = model.config
    return {"early_embedding_dim": config.encoder.early_embedding_dim, "prompt_dim": config.decoder.prompt_dim}


def save_hq(adapter: HQAdapter, path: str | Path) -> Path:
    """Writes only the adapter's weights (a few MB) to a safetensors file, atomically.

    Returns:
        `path`.
    """
    metadata = format_metadata(FORMAT_HQ, config=adapter_config(adapter.target))
    return write_safetensors(adapter.state_dict(), path, metadata)


# the adapter's parts were renamed when they stopped being ViT-only; files written before name them the old way
_FORMER_PREFIXES = {"CompressViTFeatures.": "CompressEarlyFeatures."}


def with_current_names(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Adapter weights with the keys of finesam 0.1 files (`CompressViTFeatures.*`) under today's names."""
    renamed = {}
    for key, tensor in tensors.items():
        old = next((prefix for prefix in _FORMER_PREFIXES if key.startswith(prefix)), None)
        renamed[key if old is None else _FORMER_PREFIXES[old] + key[len(old) :]] = tensor
    return renamed


def load_hq_weights(path: str | Path, adapter: HQAdapter) -> dict[str, Tensor]:
    """Weights for `adapter` from a file written by `save_hq`, an official HQ-SAM `.pth` / HQ-SAM 2 `.pt` or a
    Hugging Face `SamHQModel` checkpoint."""
    path = Path(path)
    if (official := read_official(path)) is not None:
        try:
            with official.own_names():
                return convert_hq_state_dict(official.state_dict, adapter)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    tensors, _ = read_format(path, FORMAT_HQ)
    tensors = with_current_names(tensors)
    early_dim = adapter.target.config.encoder.early_embedding_dim
    what = f"an HQ adapter for this model (early embedding width {early_dim})"
    check_tensors(path, tensors, adapter.state_dict(), what=what)
    return tensors


def load_hq(model: SegmentAnything, path: str | Path, hq_mask_only: bool = False) -> HQAdapter:
    """The HQ adapter of `model`'s generation (`HQSAMAdapter` on SAM, `HQSAM2Adapter` on SAM 2 / 2.1) with the
    weights of `path` (not injected yet); its layers have their fast paths (`finesam.fast`) where `model` has
    them.

    Args:
        model: the base model the adapter is for.
        path: a file written by `save_hq` (`*.hq.safetensors`), an official HQ-SAM `.pth` or HQ-SAM 2 `.pt`
            (`sam2.1_hq_hiera_large.pt`), or a Hugging Face `SamHQModel` checkpoint (its folder, or its
            `model.safetensors` with `config.json` beside it).
        hq_mask_only: the HQ mask alone instead of SAM's mask plus the HQ mask (official `hq_token_only`).

    Raises:
        CheckpointError: the file is unreadable or its weights do not fit `model`.
    """
    adapter = hq_adapter_for(model, hq_mask_only=hq_mask_only)
    adapter.load_state_dict(load_hq_weights(path, adapter))
    if has_fast_paths(model):
        apply_fast_paths(*adapter.placed_adapters)
    return adapter
