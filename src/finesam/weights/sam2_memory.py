"""SAM 2's video memory from its official tensors: the one key map of `SAM2VideoMemory`, its configuration from
the tensors' shapes, and loading from an official checkpoint or from the tensors a converted file keeps.

A converted SAM 2 file keeps the memory's official tensors under `official.` (`read_kept`); an official
`sam2.1_hiera_*.pt` holds them beside the image model's. Either way the same names are read here.
"""

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.layers import LayerNorm2d
from finesam.model.sam2.memory_attention import (
    MemoryAttentionLayer,
    MemoryCrossAttention,
    MemoryFeedForward,
    MemorySelfAttention,
    RoPEAttention,
)
from finesam.model.sam2.memory_config import SAM2_1_MEMORY, SAM2_MEMORY, SAM2MemoryConfig
from finesam.model.sam2.memory_encoder import (
    ConvNeXtBlock,
    Fuser,
    MaskDownsampler,
    MemoryProjection,
    NoObjectSpatialEmbedding,
    PixelFeatures,
)
from finesam.model.sam2.memory_layers import LayerScale
from finesam.model.sam2.object_pointers import NoObjectPointer, PointerProjection
from finesam.model.sam2.video_memory import SAM2VideoMemory
from finesam.weights.io import CheckpointError, load_official_state_dict
from finesam.weights.key_map import Rule, apply_rules, rules_for
from finesam.weights.layouts.hiera import is_memory_key
from finesam.weights.loading import read_kept


def _attention_pairs(prefix: str, attention: RoPEAttention) -> list[tuple[str, fl.Module]]:
    q, k, v, out = attention.layers(fl.Linear, recurse=True)
    return [
        (f"{prefix}.{name}", linear)
        for name, linear in zip(("q_proj", "k_proj", "v_proj", "out_proj"), (q, k, v, out), strict=True)
    ]


def _layer_pairs(prefix: str, layer: MemoryAttentionLayer) -> list[tuple[str, fl.Module]]:
    self_attention = layer.ensure_find(MemorySelfAttention)
    cross = layer.ensure_find(MemoryCrossAttention)
    feed_forward = layer.ensure_find(MemoryFeedForward)
    linear1, linear2 = feed_forward.layers(fl.Linear)
    return [
        *_attention_pairs(f"{prefix}.self_attn", self_attention.ensure_find(RoPEAttention)),
        *_attention_pairs(f"{prefix}.cross_attn_image", cross.ensure_find(RoPEAttention)),
        (f"{prefix}.linear1", linear1),
        (f"{prefix}.linear2", linear2),
        (f"{prefix}.norm1", self_attention.ensure_find(fl.LayerNorm)),
        (f"{prefix}.norm2", cross.ensure_find(fl.LayerNorm)),
        (f"{prefix}.norm3", feed_forward.ensure_find(fl.LayerNorm)),
    ]


def _encoder_pairs(memory: SAM2VideoMemory) -> list[tuple[str, fl.Module]]:
    encoder = memory.memory_encoder
    prefix = "memory_encoder"
    downsampler = encoder.ensure_find(MaskDownsampler)
    # the official Sequential numbers conv, norm, activation in threes, then the last 1 x 1 conv
    pairs = [
        (f"{prefix}.mask_downsampler.encoder.{i}", m) for i, m in enumerate(downsampler) if not isinstance(m, fl.GeLU)
    ]
    pairs.append((f"{prefix}.pix_feat_proj", encoder.ensure_find(PixelFeatures).ensure_find(fl.Conv2d)))
    for i, block in enumerate(encoder.ensure_find(Fuser).layers(ConvNeXtBlock)):
        pwconv1, pwconv2 = block.layers(fl.Linear)
        norm = block.ensure_find(LayerNorm2d)
        names = ("dwconv", "norm", "pwconv1", "pwconv2")
        modules = (block.ensure_find(fl.Conv2d), norm, pwconv1, pwconv2)
        pairs += [(f"{prefix}.fuser.layers.{i}.{n}", m) for n, m in zip(names, modules, strict=True)]
    pairs.append((f"{prefix}.out_proj", encoder.ensure_find(MemoryProjection).ensure_find(fl.Conv2d)))
    return pairs


def memory_rules(memory: SAM2VideoMemory) -> dict[str, Rule]:
    """Every tensor of `memory` from the official names (one place for the whole key map).

    Args:
        memory: the modules to fill.

    Returns:
        Rules keyed by `memory`'s `state_dict` keys.
    """
    names = {id(m): name for name, m in memory.named_modules()}

    def key(module: torch.nn.Module, tensor: str) -> str:
        return f"{names[id(module)]}.{tensor}"

    layers = memory.memory_attention.layers(MemoryAttentionLayer)
    pairs = [pair for i, layer in enumerate(layers) for pair in _layer_pairs(f"memory_attention.layers.{i}", layer)]
    pairs.append(("memory_attention.norm", memory.memory_attention[-1]))
    pairs += _encoder_pairs(memory)
    pointer_linears = list(memory.object_pointer.ensure_find(PointerProjection).layers(fl.Linear, recurse=True))
    if len(pointer_linears) == 1:
        pairs.append(("obj_ptr_proj", pointer_linears[0]))
    else:
        pairs += [(f"obj_ptr_proj.layers.{i}", linear) for i, linear in enumerate(pointer_linears)]
    if memory.pointer_time is not None and memory.config.pointer_time_projection:
        pairs.append(("obj_ptr_tpos_proj", memory.pointer_time.ensure_find(fl.Linear)))
    pairs.append(("mask_downsample", memory.mask_input_downsample.ensure_find(fl.Conv2d)))
    rules = rules_for(memory, pairs)
    rules[key(memory.object_pointer.ensure_find(NoObjectPointer), "weight")] = Rule(("no_obj_ptr",))
    rules[key(memory.memory_time, "weight")] = Rule(("maskmem_tpos_enc",), lambda t: t.reshape(t.shape[0], -1))
    rules["no_memory_positions"] = Rule(("no_mem_pos_enc",), lambda t: t.reshape(-1))
    if memory.config.no_object_spatial:
        spatial = memory.memory_encoder.ensure_find(NoObjectSpatialEmbedding)
        rules[key(spatial, "weight")] = Rule(("no_obj_embed_spatial",))
    for i, block in enumerate(memory.memory_encoder.ensure_find(Fuser).layers(ConvNeXtBlock)):
        rules[key(block.ensure_find(LayerScale), "weight")] = Rule((f"memory_encoder.fuser.layers.{i}.gamma",))
    return rules


def _count(tensors: Mapping[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in tensors if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def _shape(tensors: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"no SAM 2 video memory in these weights: '{key}' is missing")
    return tuple(tensors[key].shape)


def memory_config_of(tensors: Mapping[str, Tensor]) -> SAM2MemoryConfig:
    """The memory configuration of official memory tensors: SAM 2.1's where `no_obj_embed_spatial` is present, else
    SAM 2.0's, with the widths, depths and counts the shapes show.

    Raises:
        CheckpointError: the memory tensors are missing.
    """
    release = SAM2_1_MEMORY if "no_obj_embed_spatial" in tensors else SAM2_MEMORY
    num_maskmem, *_, memory_dim = _shape(tensors, "maskmem_tpos_enc")
    pointer_layers = _count(tensors, r"obj_ptr_proj\.layers\.(\d+)\.weight") or 1
    downsampler = _count(tensors, r"memory_encoder\.mask_downsampler\.encoder\.(\d+)\.weight")
    try:
        return dataclasses.replace(
            release,
            dim=_shape(tensors, "no_mem_pos_enc")[-1],
            memory_dim=memory_dim,
            num_maskmem=num_maskmem,
            attention_layers=_count(tensors, r"memory_attention\.layers\.(\d+)\.norm1\.weight"),
            feedforward_dim=_shape(tensors, "memory_attention.layers.0.linear1.weight")[0],
            mask_kernel=_shape(tensors, "memory_encoder.mask_downsampler.encoder.0.weight")[-1],
            # (conv, norm, GELU) per stride, then the last conv: the layers are (count - 1) / 3
            mask_total_stride=release.mask_stride ** ((downsampler - 1) // 3),
            fuser_layers=_count(tensors, r"memory_encoder\.fuser\.layers\.(\d+)\.gamma"),
            fuser_kernel=_shape(tensors, "memory_encoder.fuser.layers.0.dwconv.weight")[-1],
            pointer_mlp_layers=pointer_layers,
        )
    except ValueError as e:
        raise CheckpointError(f"the video memory's tensors have shapes of no SAM 2 release: {e}") from None


def video_memory_from_state_dict(
    tensors: Mapping[str, Tensor], device: torch.device | str = "cpu", config: SAM2MemoryConfig | None = None
) -> SAM2VideoMemory:
    """The video memory holding official tensors (a whole official SAM 2 `state_dict`: its image-model keys are
    left aside; or the kept tensors of a converted file).

    Args:
        tensors: official names.
        device: where the modules go.
        config: the configuration (by default from the shapes, `memory_config_of`).

    Returns:
        The memory modules, in eval mode.

    Raises:
        CheckpointError: a missing, unexpected or mis-shaped memory key, named.
    """
    official = {k: v for k, v in tensors.items() if is_memory_key(k)}
    memory = SAM2VideoMemory(config or memory_config_of(official), device="meta")
    expected = memory.state_dict()
    weights = apply_rules(official, memory_rules(memory), expected)
    memory.load_state_dict({k: v.to(device=device, dtype=expected[k].dtype) for k, v in weights.items()}, assign=True)
    return memory.eval()


def load_video_memory(path: str | Path, device: torch.device | str = "cpu") -> SAM2VideoMemory:
    """The video memory of a converted SAM 2 `.safetensors` file (its kept tensors) or of an official
    `sam2*.pt` checkpoint.

    Raises:
        CheckpointError: the file is unreadable or holds no (complete) SAM 2 video memory.
    """
    path = Path(path)
    tensors = read_kept(path) if path.suffix == ".safetensors" else load_official_state_dict(path)
    try:
        return video_memory_from_state_dict(tensors, device)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
