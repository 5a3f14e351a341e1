"""Hugging Face checkpoints: the folders (or `model.safetensors` + `config.json`) that HF transformers writes for
`SamModel` and `SamHQModel`, read back into the official SAM / HQ-SAM layout.

This module is the one place for the renames between the two layouts. They are facts of HF's published conversion
scripts (`models/sam/convert_sam_to_hf.py`, `models/sam_hq/convert_samhq_to_hf.py` in the transformers
repository), written here as two-way rules so that the same table reads HF files (`from_hf_key`) and lets the
benchmark give the official weights to HF's models (`to_hf_key`). Everything after the renames (the configuration
read off the shapes, the key map, the HQ split) is the official path's.
"""

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from finesam.text import listing
from finesam.weights.io import FORMAT_KEY, WEIGHTS_FORMS, CheckpointError, is_official, read_safetensors
from finesam.weights.layouts import read_plain_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = {"sam": "SamModel", "sam_hq": "SamHQModel"}
DEFAULT_DECODER_HEADS = 8  # HF's SamMaskDecoderConfig default, and every official release's


@dataclass(frozen=True)
class Rename:
    """One module prefix in both layouts. `{name}` stands for a number that both sides share; a template that ends
    with a dot is a prefix (the tensor name after it is kept), any other is one whole key."""

    official: str
    hf: str


def _mlp(official: str, hf: str) -> tuple[Rename, ...]:
    # SAM's three-layer MLPs: HF names the layers proj_in / layers.0 / proj_out where the official code has
    # layers.0 / layers.1 / layers.2
    return (
        Rename(f"{official}.layers.0.", f"{hf}.proj_in."),
        Rename(f"{official}.layers.1.", f"{hf}.layers.0."),
        Rename(f"{official}.layers.2.", f"{hf}.proj_out."),
    )


# The first rule whose template matches a key renames it (in either direction): specific rules come before the
# plain prefixes that end the table.
RENAMES: tuple[Rename, ...] = (
    # image encoder
    Rename("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    Rename("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    Rename("image_encoder.blocks.{block}.norm{n}.", "vision_encoder.layers.{block}.layer_norm{n}."),
    Rename("image_encoder.blocks.{block}.", "vision_encoder.layers.{block}."),
    Rename("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    Rename("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    Rename("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    Rename("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    # prompt encoder
    Rename(
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    Rename("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    Rename("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    Rename("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    Rename("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    Rename("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    Rename("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    # mask decoder
    Rename(
        "mask_decoder.transformer.layers.{layer}.norm{n}.", "mask_decoder.transformer.layers.{layer}.layer_norm{n}."
    ),
    Rename("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    Rename("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    Rename("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    Rename("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    *_mlp("mask_decoder.output_hypernetworks_mlps.{i}", "mask_decoder.output_hypernetworks_mlps.{i}"),
    *_mlp("mask_decoder.iou_prediction_head", "mask_decoder.iou_prediction_head"),
    # HQ-SAM's additions to the decoder
    Rename("mask_decoder.hf_token.", "mask_decoder.hq_token."),
    *_mlp("mask_decoder.hf_mlp", "mask_decoder.hq_mask_mlp"),
    Rename("mask_decoder.compress_vit_feat.0.", "mask_decoder.compress_vit_conv1."),
    Rename("mask_decoder.compress_vit_feat.1.", "mask_decoder.compress_vit_norm."),
    Rename("mask_decoder.compress_vit_feat.3.", "mask_decoder.compress_vit_conv2."),
    Rename("mask_decoder.embedding_encoder.0.", "mask_decoder.encoder_conv1."),
    Rename("mask_decoder.embedding_encoder.1.", "mask_decoder.encoder_norm."),
    Rename("mask_decoder.embedding_encoder.3.", "mask_decoder.encoder_conv2."),
    Rename("mask_decoder.embedding_maskfeature.0.", "mask_decoder.mask_conv1."),
    Rename("mask_decoder.embedding_maskfeature.1.", "mask_decoder.mask_norm."),
    Rename("mask_decoder.embedding_maskfeature.3.", "mask_decoder.mask_conv2."),
    # the rest keeps its name (tokens, label embeddings, attention projections, the transformer's MLPs)
    Rename("prompt_encoder.", "prompt_encoder."),
    Rename("mask_decoder.", "mask_decoder."),
)

# HF keeps the prompt encoder's Fourier matrix a second time at the top of the model (tied to the first; files
# written by transformers 5 hold this copy alone)
HF_SHARED_POSITIONAL = "shared_image_embedding.positional_embedding"
_PROMPT_POSITIONAL = "prompt_encoder.shared_embedding.positional_embedding"


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(template))
    return re.compile(pattern if template.endswith(".") else pattern + "$")


_OFFICIAL = [(_compile(rule.official), rule.hf) for rule in RENAMES]
_HF = [(_compile(rule.hf), rule.official) for rule in RENAMES]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        if match := pattern.match(key):
            return template.format(**match.groupdict()) + key[match.end() :]
    return None


def to_hf_key(key: str) -> str | None:
    """The HF name of an official SAM / HQ-SAM key (None for a key outside both layouts)."""
    return _rename(key, _OFFICIAL)


def from_hf_key(key: str) -> str | None:
    """The official name of an HF `SamModel` / `SamHQModel` key (None for a key outside both layouts)."""
    return _rename(key, _HF)


def to_hf_state_dict(official: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An official SAM / HQ-SAM `state_dict` under HF's names, with the positional matrix HF keeps twice.

    Raises:
        KeyError: a key that has no HF name.
    """
    renamed = {}
    for key, value in official.items():
        if (hf := to_hf_key(key)) is None:
            raise KeyError(f"{key}: no HF name")
        renamed[hf] = value
    renamed[HF_SHARED_POSITIONAL] = renamed[_PROMPT_POSITIONAL]
    return renamed


@dataclass(frozen=True)
class HFCheckpoint:
    """An HF checkpoint in the official layout: what the official path needs, and what was left out."""

    state_dict: dict[str, Tensor]  # official keys
    decoder_heads: int  # `mask_decoder_config.num_attention_heads`: not visible in the shapes
    dropped: list[str]  # HF keys the official layout lacks, checked and left out
    model_type: str  # "sam" or "sam_hq"


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def is_hf_checkpoint(path: str | Path) -> bool:
    """Whether `path` is to be read as an HF checkpoint: a folder, or a `*.safetensors` file (or the index of a
    sharded one) with a `config.json` beside it that is not a finesam file. Cheap: reads at most a header."""
    path = Path(path)
    if path.is_dir():
        return True  # read_hf_checkpoint explains what a folder lacks
    if not (path.is_file() and (path.parent / CONFIG_FILE).is_file()):
        return False
    if path.name == INDEX_FILE:
        return True
    if path.suffix != ".safetensors":
        return False
    try:
        _, metadata = read_safetensors(path, tensors=False)
    except CheckpointError:
        return False  # the usual path reports what is wrong with the file
    return FORMAT_KEY not in metadata


def hf_name(path: str | Path) -> str:
    """The name converted files of an HF checkpoint take: its folder's name (`sam-vit-base`, say)."""
    path = Path(path).resolve()
    return _folder(path).name


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The `config.json` of an HF `SamModel` / `SamHQModel` checkpoint (a folder or a file in it).

    Raises:
        CheckpointError: no `config.json`, or one of another model (`sam2`, ...).
    """
    path = Path(path)
    config_path = _folder(path) / CONFIG_FILE
    if not config_path.is_file() and path.is_dir():
        raise CheckpointError(
            f"{path}: is a folder, not a weights file; expected {WEIGHTS_FORMS} ({CONFIG_FILE} + {WEIGHTS_FILE}: "
            f"this folder has no {CONFIG_FILE})"
        )
    if not config_path.is_file():
        raise CheckpointError(
            f"{path}: no {CONFIG_FILE} in {_folder(path)}; a Hugging Face checkpoint is the folder that "
            f"save_pretrained writes ({CONFIG_FILE} + {WEIGHTS_FILE}), and finesam reads its model type from it"
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not a readable JSON file: {e}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        found = "no model_type" if model_type is None else f"model_type {model_type!r}"
        raise CheckpointError(
            f"{config_path}: {found}; finesam reads Hugging Face SAM checkpoints of model_type 'sam' (SamModel) "
            "or 'sam_hq' (SamHQModel)"
        )
    return config


def _check_config(config_path: Path, config: Mapping[str, Any]) -> int:
    """The decoder's head count, after refusing settings the official layout cannot express."""
    decoder = config.get("mask_decoder_config") or {}
    vision = config.get("vision_config") or {}
    prompt = config.get("prompt_encoder_config") or {}
    # what the shapes do not show: the activations, and the IoU head's depth (its layers are renamed by position)
    fixed = {
        ("vision_config", "hidden_act"): (vision.get("hidden_act", "gelu"), "gelu"),
        ("prompt_encoder_config", "hidden_act"): (prompt.get("hidden_act", "gelu"), "gelu"),
        ("mask_decoder_config", "hidden_act"): (decoder.get("hidden_act", "relu"), "relu"),
        ("mask_decoder_config", "iou_head_depth"): (decoder.get("iou_head_depth", 3), 3),
    }
    wrong = [
        f"{part}.{name} = {value!r} (SAM: {sam!r})" for (part, name), (value, sam) in fixed.items() if value != sam
    ]
    if wrong:
        raise CheckpointError(f"{config_path}: settings finesam's SAM does not have: {listing(wrong)}")
    heads = decoder.get("num_attention_heads", DEFAULT_DECODER_HEADS)
    if type(heads) is not int or heads < 1:
        raise CheckpointError(f"{config_path}: mask_decoder_config.num_attention_heads = {heads!r}")
    return heads


def _shards(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: `model.safetensors`, or the shards its index names."""
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        pickled = sorted(p.name for p in folder.glob("pytorch_model*.bin"))
        note = f" (it has {', '.join(pickled)}: finesam does not unpickle HF files)" if pickled else ""
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} and no {INDEX_FILE}{note}")
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index_path}: not a readable safetensors index: {e!r}") from None
    # a shard is a file of this folder: a name with a path in it could point anywhere
    outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in (".", "..")]
    if outside:
        raise CheckpointError(f"{index_path}: shard names that are not files of {folder}: {listing(outside)}")
    return [folder / name for name in names]


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint (memory-mapped), each key once."""
    folder = _folder(path)
    files = _shards(folder) if path.is_dir() or path.name == INDEX_FILE else [path]
    tensors: dict[str, Tensor] = {}
    for file in files:
        loaded, _ = read_safetensors(file)
        if twice := sorted(set(loaded) & set(tensors)):
            raise CheckpointError(f"{file}: keys already read from another shard: {listing(twice)}")
        tensors.update(loaded)
    return tensors


def read_hf_checkpoint(path: str | Path) -> HFCheckpoint:
    """An HF `SamModel` / `SamHQModel` checkpoint as an official `state_dict`, memory-mapped (safetensors only).

    Args:
        path: the folder `save_pretrained` wrote, its `model.safetensors`, or its `model.safetensors.index.json`.

    Returns:
        The official-layout tensors, the decoder's head count from `config.json`, and the HF keys left out.

    Raises:
        CheckpointError: no `config.json`, another model type, a setting SAM does not have, a key with no
            official name (named), a key that two HF keys would fill, or HF's two positional matrices differing.
    """
    path = Path(path)
    config = read_hf_config(path)
    heads = _check_config(_folder(path) / CONFIG_FILE, config)
    tensors = _read_tensors(path)
    dropped: list[str] = []
    if HF_SHARED_POSITIONAL in tensors:
        shared = tensors.pop(HF_SHARED_POSITIONAL)
        if _PROMPT_POSITIONAL not in tensors:
            tensors[_PROMPT_POSITIONAL] = shared  # tied in HF: transformers 5 saves this copy alone
        elif not torch.equal(shared, tensors[_PROMPT_POSITIONAL]):
            raise CheckpointError(
                f"{path}: {HF_SHARED_POSITIONAL} differs from {_PROMPT_POSITIONAL}; in SAM they are one matrix"
            )
        else:
            dropped.append(HF_SHARED_POSITIONAL)
    official: dict[str, Tensor] = {}
    unknown, clashes = [], []
    for key, tensor in tensors.items():
        name = from_hf_key(key)
        if name is None:
            unknown.append(key)
        elif name in official:
            clashes.append(f"{key} -> {name}")
        else:
            official[name] = tensor
    if unknown or clashes:
        problems = [f"keys outside HF's SAM layout: {listing(sorted(unknown))}"] if unknown else []
        problems += [f"keys that fill the same official key: {listing(sorted(clashes))}"] if clashes else []
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return HFCheckpoint(official, heads, dropped, config["model_type"])


def with_hf_names(message: str) -> str:
    """`message` with each official key in it followed by its HF name: errors about an HF file name its keys."""

    def annotate(match: re.Match[str]) -> str:
        key = match.group(0)
        hf = to_hf_key(key)
        return key if hf is None or hf == key else f"{key} (HF: {hf})"

    return re.sub(r"\b(?:image_encoder|prompt_encoder|mask_decoder)\.[\w.]*\w", annotate, message)


@dataclass(frozen=True)
class OfficialCheckpoint:
    """A checkpoint in the official layout, read from an official `.pth` or a Hugging Face checkpoint."""

    state_dict: dict[str, Tensor]  # official keys
    decoder_heads: int
    dropped: list[str]  # keys the official layout lacks, checked and left out (HF's second positional matrix)
    hf: bool = False

    @contextlib.contextmanager
    def own_names(self) -> Iterator[None]:
        """Errors raised inside (a missing or mis-shaped key) name the keys as the file does, HF's too."""
        try:
            yield
        except CheckpointError as e:
            if not self.hf:
                raise
            raise CheckpointError(with_hf_names(str(e))) from None


def read_official(path: str | Path) -> OfficialCheckpoint | None:
    """The official-layout tensors of an official checkpoint or a Hugging Face one; None for any other file (a
    finesam file). The one place where the readers of those layouts are chosen.

    Raises:
        CheckpointError: the checkpoint is unreadable, unsafe to unpickle, or not a SAM / HQ-SAM checkpoint.
    """
    if is_hf_checkpoint(path):
        hf = read_hf_checkpoint(path)
        return OfficialCheckpoint(hf.state_dict, hf.decoder_heads, hf.dropped, hf=True)
    if is_official(path):
        return OfficialCheckpoint(read_plain_weights(path), DEFAULT_DECODER_HEADS, [])
    return None
