"""HQ-SAM weights: the official HQ keys -> `HQSAMAdapter`, and the adapter's own safetensors file."""

import json
import re
from collections.abc import Mapping
from pathlib import Path

from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.conversion import CheckpointError, Rule, apply_rules, rules_for
from finesam.hq.adapter import HQSAMAdapter
from finesam.hq.layers import CompressViTFeatures, EmbeddingEncoder, HQMaskFeatures, HQToken, HQTokenMLP
from finesam.io import (
    CONFIG_KEY,
    FORMAT_KEY,
    OFFICIAL_SUFFIXES,
    check_tensors,
    load_official_state_dict,
    read_safetensors,
    write_safetensors,
)
from finesam.model.sam import SegmentAnything

FORMAT_HQ = "hq_sam"
HQ_KEY = re.compile(r"mask_decoder\.(hf_token|hf_mlp|compress_vit_feat|embedding_encoder|embedding_maskfeature)\.")


def is_hq_key(key: str) -> bool:
    """Whether an official checkpoint key belongs to the HQ-SAM additions (25 keys in every release)."""
    return HQ_KEY.match(key) is not None


def hq_key_map(adapter: HQSAMAdapter) -> dict[str, Rule]:
    """For every key of `adapter.state_dict()`, the official HQ-SAM key it is made from."""

    def weighted(chain: fl.Chain) -> list[fl.Module]:
        return [m for m in chain if isinstance(m, fl.WeightedModule)]

    pairs: list[tuple[str, fl.Module]] = [("mask_decoder.hf_token", adapter.ensure_find(HQToken))]
    pairs += [
        (f"mask_decoder.hf_mlp.layers.{j}", linear)
        for j, linear in enumerate(adapter.ensure_find(HQTokenMLP).layers(fl.Linear))
    ]
    for name, part in (
        ("compress_vit_feat", CompressViTFeatures),
        ("embedding_encoder", EmbeddingEncoder),
        ("embedding_maskfeature", HQMaskFeatures),
    ):
        pairs += [
            (f"mask_decoder.{name}.{i}", m) for i, m in zip((0, 1, 3), weighted(adapter.ensure_find(part)), strict=True)
        ]
    return rules_for(adapter, pairs)


def convert_hq_state_dict(official: Mapping[str, Tensor], adapter: HQSAMAdapter) -> dict[str, Tensor]:
    """The adapter's weights from an official HQ-SAM `state_dict` (its SAM keys are ignored)."""
    if not any(is_hq_key(k) for k in official):
        raise CheckpointError("the checkpoint has no HQ-SAM weights (no mask_decoder.hf_token, ...)")
    return apply_rules(official, hq_key_map(adapter), adapter.state_dict(), ignore=lambda k: not is_hq_key(k))


def save_hq(adapter: HQSAMAdapter, path: str | Path) -> Path:
    """Writes only the adapter's weights (a few MB) to a safetensors file, atomically."""
    config = adapter.target.config
    metadata = {
        FORMAT_KEY: FORMAT_HQ,
        CONFIG_KEY: json.dumps({"encoder_dim": config.encoder_dim, "prompt_dim": config.prompt_dim}),
    }
    return write_safetensors(adapter.state_dict(), path, metadata)


def load_hq_weights(path: str | Path, adapter: HQSAMAdapter) -> dict[str, Tensor]:
    """Weights for `adapter` from a file written by `save_hq` or an official HQ-SAM `.pth`."""
    path = Path(path)
    if path.suffix in OFFICIAL_SUFFIXES:
        try:
            return convert_hq_state_dict(load_official_state_dict(path), adapter)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
    tensors, metadata = read_safetensors(path)
    if metadata.get(FORMAT_KEY) != FORMAT_HQ:
        raise CheckpointError(f"{path}: not a finesam HQ-SAM file (no '{FORMAT_KEY}: {FORMAT_HQ}' metadata)")
    vit_dim = adapter.target.config.encoder_dim
    check_tensors(path, tensors, adapter.state_dict(), what=f"an HQ adapter for this model (ViT width {vit_dim})")
    return tensors


def load_hq(model: SegmentAnything, path: str | Path, hq_mask_only: bool = False) -> HQSAMAdapter:
    """An `HQSAMAdapter` for `model` with the weights of `path` (not injected yet)."""
    adapter = HQSAMAdapter(model, hq_mask_only=hq_mask_only)
    adapter.load_state_dict(load_hq_weights(path, adapter))
    return adapter
