"""Hugging Face checkpoints: the folders (or `model.safetensors` + `config.json`) that HF transformers writes for
`SamModel`, `SamHQModel` and `Sam2Model`, read back into the official SAM / HQ-SAM / SAM 2 layout.

This module is the one place for the renames between the layouts. For SAM and HQ-SAM they are facts of HF's
published conversion scripts (`models/sam/convert_sam_to_hf.py`, `models/sam_hq/convert_samhq_to_hf.py` in the
transformers repository); for SAM 2 (whose conversion script is not in the installed package) they were read off
the two models, the official `SAM2Base` and HF's `Sam2Model` of each layer, and are proven key for key and shape
for shape by tests/test_hf_sam2.py. They are written as two-way rules so that the same table reads HF files
(`from_hf_key`) and lets the benchmark give the official weights to HF's models (`to_hf_key`). Everything after the
renames (the configuration read off the shapes, the key map, the HQ split) is the official path's.
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

from finesam.model.sam2.config import HieraConfig, SAM2DecoderConfig
from finesam.text import listing
from finesam.weights.io import FORMAT_KEY, WEIGHTS_FORMS, CheckpointError, is_official, read_safetensors
from finesam.weights.layouts import read_plain_weights
from finesam.weights.layouts.hiera import infer_encoder as infer_hiera
from finesam.weights.layouts.hiera import is_memory_key

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPES = {"sam": "SamModel", "sam_hq": "SamHQModel", "sam2": "Sam2Model"}
SAM2 = "sam2"
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


def _mask_embed(official: str) -> tuple[Rename, ...]:
    # the prompt encoder's mask downscaling (SAM and SAM 2): HF names its convolutions and norms
    hf = "prompt_encoder.mask_embed"
    return tuple(
        Rename(f"{official}.mask_downscaling.{i}.", f"{hf}.{name}.")
        for i, name in ((0, "conv1"), (1, "layer_norm1"), (3, "conv2"), (4, "layer_norm2"), (6, "conv3"))
    )


def _upscaling(official: str) -> tuple[Rename, ...]:
    # the mask decoder's upscaling (SAM and SAM 2): two transposed convolutions and a norm
    return tuple(
        Rename(f"{official}.output_upscaling.{i}.", f"mask_decoder.{name}.")
        for i, name in ((0, "upscale_conv1"), (1, "upscale_layer_norm"), (3, "upscale_conv2"))
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
    *_mask_embed("prompt_encoder"),
    # mask decoder
    Rename(
        "mask_decoder.transformer.layers.{layer}.norm{n}.", "mask_decoder.transformer.layers.{layer}.layer_norm{n}."
    ),
    Rename("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    *_upscaling("mask_decoder"),
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


def _two_way(official: str, hf: str) -> tuple[Rename, ...]:
    # SAM 2's two-way transformer: HF names the attention output o_proj (official: out_proj), the norms
    # layer_norm{n} and the MLP's two layers proj_in / proj_out (official: layers.0 / layers.1)
    attentions = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
    return (
        *(
            Rename(f"{official}.layers.{{layer}}.{a}.out_proj.", f"{hf}.layers.{{layer}}.{a}.o_proj.")
            for a in attentions
        ),
        Rename(f"{official}.final_attn_token_to_image.out_proj.", f"{hf}.final_attn_token_to_image.o_proj."),
        Rename(f"{official}.layers.{{layer}}.norm{{n}}.", f"{hf}.layers.{{layer}}.layer_norm{{n}}."),
        Rename(f"{official}.layers.{{layer}}.mlp.layers.0.", f"{hf}.layers.{{layer}}.mlp.proj_in."),
        Rename(f"{official}.layers.{{layer}}.mlp.layers.1.", f"{hf}.layers.{{layer}}.mlp.proj_out."),
        Rename(f"{official}.norm_final_attn.", f"{hf}.layer_norm_final_attn."),
    )


# SAM 2 (`sam2_hiera_*.pt`, `sam2.1_hiera_*.pt`) <-> HF `Sam2Model`: the image model only (HF's Sam2Model has no
# video memory; the official file's memory tensors have no name here, see `to_hf_state_dict`). The four point
# embeddings are one HF tensor: `SAM2_POINT_EMBEDDINGS`, outside the table.
SAM2_RENAMES: tuple[Rename, ...] = (
    Rename("no_mem_embed", "no_memory_embedding"),
    # Hiera trunk and FPN neck
    Rename("image_encoder.trunk.patch_embed.proj.", "vision_encoder.backbone.patch_embed.projection."),
    Rename("image_encoder.trunk.blocks.{block}.norm{n}.", "vision_encoder.backbone.blocks.{block}.layer_norm{n}."),
    Rename("image_encoder.trunk.blocks.{block}.mlp.layers.0.", "vision_encoder.backbone.blocks.{block}.mlp.proj_in."),
    Rename("image_encoder.trunk.blocks.{block}.mlp.layers.1.", "vision_encoder.backbone.blocks.{block}.mlp.proj_out."),
    Rename("image_encoder.trunk.", "vision_encoder.backbone."),  # position embeddings, attn.qkv / proj, proj
    Rename("image_encoder.neck.convs.{level}.conv.", "vision_encoder.neck.convs.{level}."),
    # prompt encoder (every key named: a plain prefix rule would pass the point embeddings through)
    Rename(
        "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
        "prompt_encoder.shared_embedding.positional_embedding",
    ),
    *_mask_embed("sam_prompt_encoder"),
    Rename("sam_prompt_encoder.no_mask_embed.", "prompt_encoder.no_mask_embed."),
    Rename("sam_prompt_encoder.not_a_point_embed.", "prompt_encoder.not_a_point_embed."),
    # mask decoder
    *_two_way("sam_mask_decoder.transformer", "mask_decoder.transformer"),
    *_upscaling("sam_mask_decoder"),
    *_mlp("sam_mask_decoder.output_hypernetworks_mlps.{i}", "mask_decoder.output_hypernetworks_mlps.{i}"),
    *_mlp("sam_mask_decoder.iou_prediction_head", "mask_decoder.iou_prediction_head"),
    *_mlp("sam_mask_decoder.pred_obj_score_head", "mask_decoder.pred_obj_score_head"),
    # the rest keeps its name (tokens, conv_s0 / conv_s1, q / k / v projections)
    Rename("sam_mask_decoder.", "mask_decoder."),
)

# SAM 2's point-label embeddings: four (1, dim) tensors in the official layout, the rows of one (4, dim) in HF's
SAM2_POINT_EMBEDDINGS = "sam_prompt_encoder.point_embeddings.{i}.weight"
HF_POINT_EMBED = "prompt_encoder.point_embed.weight"
_POINT_EMBEDDING = re.compile(r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")

# HF keeps the prompt encoder's Fourier matrix a second time at the top of the model, under the same two names in
# SamModel and Sam2Model. SamModel ties them (files written by transformers 5 hold this copy alone); Sam2Model does
# not (both are saved, and a freshly initialised one has two different matrices, which the official layout, with
# one, cannot hold: refused)
HF_SHARED_POSITIONAL = "shared_image_embedding.positional_embedding"
_PROMPT_POSITIONAL = "prompt_encoder.shared_embedding.positional_embedding"


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>\\d+)", re.escape(template))
    return re.compile(pattern if template.endswith(".") else pattern + "$")


_TABLES = {"sam": RENAMES, "sam_hq": RENAMES, SAM2: SAM2_RENAMES}
_OFFICIAL = {t: [(_compile(rule.official), rule.hf) for rule in table] for t, table in _TABLES.items()}
_HF = {t: [(_compile(rule.hf), rule.official) for rule in table] for t, table in _TABLES.items()}


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        if match := pattern.match(key):
            return template.format(**match.groupdict()) + key[match.end() :]
    return None


def to_hf_key(key: str, model_type: str = "sam") -> str | None:
    """The HF name of an official key of `model_type` ("sam", "sam_hq" or "sam2"; None for a key outside both
    layouts, and for SAM 2's point embeddings, which `to_hf_state_dict` stacks)."""
    return _rename(key, _OFFICIAL[model_type])


def from_hf_key(key: str, model_type: str = "sam") -> str | None:
    """The official name of an HF `SamModel` / `SamHQModel` (or, with "sam2", `Sam2Model`) key (None for a key
    outside both layouts, and for `Sam2Model`'s stacked point embeddings)."""
    return _rename(key, _HF[model_type])


def to_hf_state_dict(official: Mapping[str, Tensor], model_type: str = "sam") -> dict[str, Tensor]:
    """An official SAM / HQ-SAM / SAM 2 (`model_type` "sam2") `state_dict` under HF's names, with the positional
    matrix HF keeps twice. SAM 2: the four point embeddings stacked into HF's one, and the video memory's tensors
    left out (HF's `Sam2Model` is the image model; its `Sam2VideoModel` is not read or written here).

    Raises:
        KeyError: a key that has no HF name.
    """
    renamed: dict[str, Tensor] = {}
    points: dict[int, Tensor] = {}
    for key, value in official.items():
        if model_type == SAM2 and is_memory_key(key):
            continue
        if model_type == SAM2 and (match := _POINT_EMBEDDING.match(key)):
            points[int(match.group(1))] = value
            continue
        if (hf := to_hf_key(key, model_type)) is None:
            raise KeyError(f"{key}: no HF name")
        renamed[hf] = value
    if points:
        if sorted(points) != list(range(len(points))):
            raise KeyError(f"{SAM2_POINT_EMBEDDINGS}: numbered {sorted(points)}, not 0..{len(points) - 1}")
        renamed[HF_POINT_EMBED] = torch.cat([points[i].reshape(1, -1) for i in range(len(points))])
    renamed[HF_SHARED_POSITIONAL] = renamed[_PROMPT_POSITIONAL]
    return renamed


def _split_point_embed(path: Path, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """`Sam2Model`'s (4, dim) point embedding as the official four (1, dim) ones (views: no copy)."""
    if HF_POINT_EMBED not in tensors:
        return {}  # the missing official keys are named later, by the layout
    stacked = tensors.pop(HF_POINT_EMBED)
    if stacked.dim() != 2:
        raise CheckpointError(f"{path}: {HF_POINT_EMBED} has shape {tuple(stacked.shape)}, not (4, dim)")
    return {SAM2_POINT_EMBEDDINGS.format(i=i): stacked[i : i + 1] for i in range(stacked.shape[0])}


@dataclass(frozen=True)
class HFCheckpoint:
    """An HF checkpoint in the official layout: what the official path needs, and what was left out."""

    state_dict: dict[str, Tensor]  # official keys
    decoder_heads: int  # `mask_decoder_config.num_attention_heads`: not visible in the shapes
    dropped: list[str]  # HF keys the official layout lacks, checked and left out
    model_type: str  # "sam", "sam_hq" or "sam2"


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
    """The `config.json` of an HF `SamModel` / `SamHQModel` / `Sam2Model` checkpoint (a folder or a file in it).

    Raises:
        CheckpointError: no `config.json`, or one of another model (`sam3`, `edgetam`, ...).
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
            f"{config_path}: {found}; finesam reads Hugging Face SAM checkpoints of model_type 'sam' (SamModel), "
            "'sam_hq' (SamHQModel) or 'sam2' (Sam2Model)"
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


def _sam2_settings(encoder: HieraConfig, image_size: int) -> list[tuple[tuple[str, ...], Any, Any]]:
    """(where in `config.json`, HF's default, the value finesam's SAM 2 has) for every setting of a `Sam2Model`
    that its weights do not show (or that finesam would take from elsewhere): the Hiera's heads, windows and
    global blocks are those of the release whose shapes the weights have (`infer_encoder`), the rest is what every
    release has. HF's `mask_decoder_config.hidden_act` is left out: its decoder does not read it."""
    decoder = SAM2DecoderConfig()
    stages = len(encoder.stages)
    backbone = ("vision_config", "backbone_config")
    vision, prompt, mask = ("vision_config",), ("prompt_encoder_config",), ("mask_decoder_config",)
    size = image_size
    return [
        ((*backbone, "num_attention_heads"), 1, encoder.heads),
        ((*backbone, "num_attention_heads_per_stage"), [1, 2, 4, 8], [encoder.heads * 2**i for i in range(stages)]),
        ((*backbone, "window_size_per_stage"), [8, 4, 14, 7], list(encoder.window_spec)),
        ((*backbone, "global_attention_blocks"), [5, 7, 9], list(encoder.global_attention_blocks)),
        ((*backbone, "blocks_per_stage"), [1, 2, 7, 2], list(encoder.stages)),
        ((*backbone, "embed_dim_per_stage"), [96, 192, 384, 768], list(encoder.dims)),
        ((*backbone, "hidden_size"), 96, encoder.embed_dim),
        ((*backbone, "mlp_ratio"), 4.0, encoder.mlp_ratio),
        ((*backbone, "window_positional_embedding_background_size"), [7, 7], list(encoder.position_embedding_size)),
        ((*backbone, "image_size"), [1024, 1024], [size, size]),
        ((*backbone, "patch_kernel_size"), [7, 7], [7, 7]),
        ((*backbone, "patch_stride"), [4, 4], [4, 4]),
        ((*backbone, "patch_padding"), [3, 3], [3, 3]),
        ((*backbone, "query_stride"), [2, 2], [2, 2]),
        ((*backbone, "num_query_pool_stages"), 3, stages - 1),
        ((*backbone, "hidden_act"), "gelu", "gelu"),
        ((*backbone, "layer_norm_eps"), 1e-6, 1e-6),
        ((*vision, "backbone_channel_list"), [768, 384, 192, 96], list(reversed(encoder.dims))),
        ((*vision, "backbone_feature_sizes"), [[256] * 2, [128] * 2, [64] * 2], [[size // s] * 2 for s in (4, 8, 16)]),
        ((*vision, "fpn_hidden_size"), 256, decoder.prompt_dim),
        ((*vision, "fpn_kernel_size"), 1, 1),
        ((*vision, "fpn_stride"), 1, 1),
        ((*vision, "fpn_padding"), 0, 0),
        ((*vision, "fpn_top_down_levels"), [2, 3], [2, 3]),
        ((*vision, "num_feature_levels"), 3, 3),
        ((*prompt, "image_size"), 1024, size),
        ((*prompt, "patch_size"), 16, 16),
        ((*prompt, "hidden_act"), "gelu", "gelu"),
        ((*prompt, "layer_norm_eps"), 1e-6, 1e-6),
        ((*mask, "num_hidden_layers"), 2, decoder.depth),  # HF also makes it the two-way MLPs' layer count
        ((*mask, "num_attention_heads"), 8, decoder.heads),
        ((*mask, "attention_downsample_rate"), 2, 2),
        ((*mask, "iou_head_depth"), 3, decoder.iou_head_depth),
        ((*mask, "dynamic_multimask_via_stability"), True, decoder.dynamic_multimask),
        ((*mask, "dynamic_multimask_stability_delta"), 0.05, decoder.stability_delta),
        ((*mask, "dynamic_multimask_stability_thresh"), 0.98, decoder.stability_threshold),
    ]


def _check_sam2_config(config_path: Path, config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> int:
    """The decoder's head count (8), after refusing a `Sam2Model` configuration that the official SAM 2 layout
    cannot express: a Hiera of no released shape, or any setting the weights do not show that differs from the
    release the shapes name.

    Raises:
        CheckpointError: the settings that differ, each with finesam's value.
    """
    try:
        encoder, image_size = infer_hiera(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{config_path}: {e}") from None
    wrong = []
    for where, default, ours in _sam2_settings(encoder, image_size):
        section: Any = config
        for part in where[:-1]:
            section = section.get(part) if isinstance(section, Mapping) else None
        value = section.get(where[-1], default) if isinstance(section, Mapping) else default
        if isinstance(value, tuple):
            value = list(value)
        if value != ours:
            wrong.append(f"{'.'.join(where)} = {value!r} (finesam's SAM 2: {ours!r})")
    if wrong:
        raise CheckpointError(
            f"{config_path}: settings of this Sam2Model that the official SAM 2 layout cannot express (the weights "
            f"have the shapes of a Hiera with embed_dim {encoder.embed_dim}, stages {list(encoder.stages)}): "
            f"{listing(wrong)}"
        )
    return SAM2DecoderConfig().heads


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
    """An HF `SamModel` / `SamHQModel` / `Sam2Model` checkpoint as an official `state_dict`, memory-mapped
    (safetensors only).

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
    model_type = config["model_type"]
    config_path = _folder(path) / CONFIG_FILE
    heads = DEFAULT_DECODER_HEADS if model_type == SAM2 else _check_config(config_path, config)
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
    official: dict[str, Tensor] = _split_point_embed(path, tensors) if model_type == SAM2 else {}
    unknown, clashes = [], []
    for key, tensor in tensors.items():
        name = from_hf_key(key, model_type)
        if name is None:
            unknown.append(key)
        elif name in official:
            clashes.append(f"{key} -> {name}")
        else:
            official[name] = tensor
    if unknown or clashes:
        layout = "Sam2Model" if model_type == SAM2 else "SAM"
        problems = [f"keys outside HF's {layout} layout: {listing(sorted(unknown))}"] if unknown else []
        problems += [f"keys that fill the same official key: {listing(sorted(clashes))}"] if clashes else []
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    if model_type == SAM2:
        heads = _check_sam2_config(config_path, config, official)
    return HFCheckpoint(official, heads, dropped, model_type)


def with_hf_names(message: str, model_type: str = "sam") -> str:
    """`message` with each official key in it followed by its HF name: errors about an HF file name its keys."""

    def annotate(match: re.Match[str]) -> str:
        key = match.group(0)
        hf = HF_POINT_EMBED if _POINT_EMBEDDING.match(key) else to_hf_key(key, model_type)
        return key if hf is None or hf == key else f"{key} (HF: {hf})"

    pattern = r"\b(?:image_encoder|sam_prompt_encoder|prompt_encoder|sam_mask_decoder|mask_decoder)\.[\w.]*\w"
    return re.sub(pattern + r"|\bno_mem_embed\b", annotate, message)


@dataclass(frozen=True)
class OfficialCheckpoint:
    """A checkpoint in the official layout, read from an official `.pth` or a Hugging Face checkpoint."""

    state_dict: dict[str, Tensor]  # official keys
    decoder_heads: int
    dropped: list[str]  # keys the official layout lacks, checked and left out (HF's second positional matrix)
    hf: bool = False
    model_type: str = "sam"  # an HF checkpoint's: its renames name the keys in errors

    @contextlib.contextmanager
    def own_names(self) -> Iterator[None]:
        """Errors raised inside (a missing or mis-shaped key) name the keys as the file does, HF's too."""
        try:
            yield
        except CheckpointError as e:
            if not self.hf:
                raise
            raise CheckpointError(with_hf_names(str(e), self.model_type)) from None


def read_official(path: str | Path) -> OfficialCheckpoint | None:
    """The official-layout tensors of an official checkpoint or a Hugging Face one; None for any other file (a
    finesam file). The one place where the readers of those layouts are chosen.

    Raises:
        CheckpointError: the checkpoint is unreadable, unsafe to unpickle, or not a SAM / HQ-SAM / SAM 2
            checkpoint.
    """
    if is_hf_checkpoint(path):
        hf = read_hf_checkpoint(path)
        return OfficialCheckpoint(hf.state_dict, hf.decoder_heads, hf.dropped, hf=True, model_type=hf.model_type)
    if is_official(path):
        return OfficialCheckpoint(read_plain_weights(path), DEFAULT_DECODER_HEADS, [])
    return None
