"""The official checkpoint layout of the `efficientvit` family: mit-han-lab's EfficientViT-SAM keys
(`image_encoder.backbone.stages.{i}.op_list.{j}`, `image_encoder.neck.{input_ops,middle,output_ops}`,
`image_encoder.norm`), then SAM's prompt encoder and mask decoder keys."""

import re
from collections.abc import Iterator, Mapping
from typing import Any

from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import SAMConfig
from finesam.model.efficientvit.config import ATTENTION_BLOCKS, EFFICIENTVIT_PRESETS, EfficientViTConfig, input_size_for
from finesam.model.efficientvit.encoder import (
    Aggregation,
    ConvLayer,
    DownsamplingBlock,
    EfficientViTBlock,
    EfficientViTEncoder,
    FusedMBConv,
    LiteMLA,
    LocalBlock,
    MBConv,
    NeckBlocks,
    NeckInput,
    Pointwise,
    ResBlock,
    SamNeck,
)
from finesam.model.registry import EncoderChain
from finesam.model.tiny_vit import BatchNorm2d
from finesam.weights.io import CheckpointError
from finesam.weights.key_map import Rule
from finesam.weights.layouts import Checkpoint, CheckpointLayout, KeyOf, count, shape_of

_BACKBONE = "image_encoder.backbone.stages"
_NECK = "image_encoder.neck"
# the official names of the convolutions of each local block kind, in order
_CONVS = {
    ResBlock: ("conv1", "conv2"),
    FusedMBConv: ("spatial_conv", "point_conv"),
    MBConv: ("inverted_conv", "depth_conv", "point_conv"),
}
_KINDS = {"conv1": "res", "spatial_conv": "fmb", "inverted_conv": "mb"}


def recognises(state_dict: Mapping[str, Tensor]) -> bool:
    """EfficientViT's stages and SamNeck's inputs."""
    return any(k.startswith(f"{_BACKBONE}.") for k in state_dict) and any(
        k.startswith(f"{_NECK}.input_ops.") for k in state_dict
    )


def _first_conv(state_dict: Mapping[str, Tensor], prefix: str) -> str | None:
    """The first convolution's official name in a block's `main` (which says the block kind), if any."""
    return next((name for name in _KINDS if f"{prefix}.main.{name}.conv.weight" in state_dict), None)


def _stage(state_dict: Mapping[str, Tensor], i: int, in_channels: int) -> tuple[int, int, str, float, bool]:
    """Width, depth, block kind, expansion and fewer-norm of stage `i`, read off its keys and shapes."""
    prefix = f"{_BACKBONE}.{i}.op_list"
    blocks = count(state_dict, rf"{re.escape(prefix)}\.(\d+)\..*")
    if blocks == 0:
        raise CheckpointError(f"not an EfficientViT-SAM checkpoint: stage {i} has no blocks")
    depth = blocks - 1
    if i == 0:
        width = shape_of(state_dict, f"{prefix}.0.conv.weight")[0]
        block, expand, fewer = "res", 1.0, False  # a stem without blocks (XL0): the values are not used
        if depth:
            first = _first_conv(state_dict, f"{prefix}.1")
            if first is None:
                raise CheckpointError(f"not an EfficientViT-SAM checkpoint: unknown block at {prefix}.1")
            block = _KINDS[first]
            expand = shape_of(state_dict, f"{prefix}.1.main.{first}.conv.weight")[0] / width
            fewer = f"{prefix}.1.main.{first}.norm.weight" not in state_dict
        return width, depth, block, expand, fewer
    first = _first_conv(state_dict, f"{prefix}.0")
    if first is None:
        raise CheckpointError(f"not an EfficientViT-SAM checkpoint: unknown block at {prefix}.0")
    last = _CONVS[{"res": ResBlock, "fmb": FusedMBConv, "mb": MBConv}[_KINDS[first]]][-1]
    width = shape_of(state_dict, f"{prefix}.0.main.{last}.conv.weight")[0]
    fewer = f"{prefix}.0.main.{first}.norm.weight" not in state_dict
    expand = shape_of(state_dict, f"{prefix}.0.main.{first}.conv.weight")[0] / in_channels / 4
    block = _KINDS[first]
    if depth and f"{prefix}.1.context_module.main.qkv.conv.weight" in state_dict:
        scale = shape_of(state_dict, f"{prefix}.1.context_module.main.aggreg.0.0.weight")[-1]
        block = next(name for name, s in ATTENTION_BLOCKS.items() if s == scale)
        expand = shape_of(state_dict, f"{prefix}.1.local_module.main.inverted_conv.conv.weight")[0] / width
    elif depth:
        inner = _first_conv(state_dict, f"{prefix}.1")
        if inner is None:
            raise CheckpointError(f"not an EfficientViT-SAM checkpoint: unknown block at {prefix}.1")
        block = _KINDS[inner]
        expand = shape_of(state_dict, f"{prefix}.1.main.{inner}.conv.weight")[0] / width
    return width, depth, block, expand, fewer


def infer_encoder(state_dict: Mapping[str, Tensor]) -> tuple[EfficientViTConfig, int]:
    """The encoder configuration off the shapes; the input size is not in them: the releases' rule (the finest
    stage the neck reads lies on the 64 x 64 embedding grid: 512 for L, 1024 for XL), which a release with the
    same shapes confirms. Prompt frame 1024."""
    stages = count(state_dict, rf"{re.escape(_BACKBONE)}\.(\d+)\..*")
    widths: list[int] = []
    depths: list[int] = []
    blocks: list[str] = []
    expands: list[float] = []
    fewer_norms: list[bool] = []
    for i in range(stages):
        width, depth, block, expand, fewer = _stage(state_dict, i, widths[-1] if widths else 3)
        widths.append(width)
        depths.append(depth)
        blocks.append(block)
        expands.append(round(expand, 6))
        fewer_norms.append(fewer)
    head_dim = 32
    for i, block in enumerate(blocks):
        if block in ATTENTION_BLOCKS and depths[i]:
            head_dim = shape_of(state_dict, f"{_BACKBONE}.{i}.op_list.1.context_module.main.aggreg.0.1.weight")[1]
            break
    inputs = count(state_dict, rf"{re.escape(_NECK)}\.input_ops\.(\d+)\..*")
    neck_stages = []
    for k in range(inputs):
        channels = shape_of(state_dict, f"{_NECK}.input_ops.{k}.op_list.0.conv.weight")[1]
        candidates = [i for i, w in enumerate(widths) if w == channels and i not in neck_stages]
        if not candidates:
            raise CheckpointError(
                f"not an EfficientViT-SAM checkpoint: no stage has the {channels} channels of neck input {k}"
            )
        neck_stages.append(candidates[-1])  # the latest stage of that width (widths grow in every release)
    neck_width = shape_of(state_dict, f"{_NECK}.input_ops.0.op_list.0.conv.weight")[0]
    neck_depth = count(state_dict, rf"{re.escape(_NECK)}\.middle\.op_list\.(\d+)\..*")
    neck_block, neck_expand = "fmb", 1.0
    if neck_depth:
        first = _first_conv(state_dict, f"{_NECK}.middle.op_list.0")
        if first is None:
            raise CheckpointError("not an EfficientViT-SAM checkpoint: unknown neck block")
        neck_block = _KINDS[first]
        neck_expand = shape_of(state_dict, f"{_NECK}.middle.op_list.0.main.{first}.conv.weight")[0] / neck_width
    config = EfficientViTConfig(
        widths=tuple(widths),
        depths=tuple(depths),
        blocks=tuple(blocks),
        expands=tuple(expands),
        fewer_norms=tuple(fewer_norms),
        head_dim=head_dim,
        neck_stages=tuple(neck_stages),
        neck_width=neck_width,
        neck_depth=neck_depth,
        neck_expand=round(neck_expand, 6),
        neck_block=neck_block,
        input_size=input_size_for(tuple(neck_stages)),
    )
    return _as_release(config), 1024


def _as_release(config: EfficientViTConfig) -> EfficientViTConfig:
    """The release with these shapes, field for field (expansions compare as numbers), else `config`."""
    for preset in EFFICIENTVIT_PRESETS:
        release = preset.encoder
        assert isinstance(release, EfficientViTConfig)
        if release == config:
            return release
    return config


def infer_config(state_dict: Mapping[str, Tensor]) -> SAMConfig:
    """The whole configuration: the encoder off its shapes, SAM's prompt encoder and decoder (the prompt width
    is the encoder's final norm's)."""
    from finesam.weights.sam_keys import decoder_config  # sam_keys imports the layouts package

    encoder, image_size = infer_encoder(state_dict)
    decoder = decoder_config(state_dict, shape_of(state_dict, "image_encoder.norm.weight")[0])
    config = SAMConfig(encoder, decoder, image_size=image_size)
    return next((preset for preset in EFFICIENTVIT_PRESETS if preset == config), config)


def _conv_layer(prefix: str, layer: ConvLayer) -> list[tuple[str, fl.Module]]:
    pairs: list[tuple[str, fl.Module]] = [(f"{prefix}.conv", layer.ensure_find(fl.Conv2d))]
    norm = layer.find(BatchNorm2d)
    return pairs + ([(f"{prefix}.norm", norm)] if norm is not None else [])


def _local(prefix: str, block: fl.Chain) -> list[tuple[str, fl.Module]]:
    names = _CONVS[type(block)]  # type: ignore[index]
    convs = [m for m in block if isinstance(m, ConvLayer)]
    return [pair for name, conv in zip(names, convs, strict=True) for pair in _conv_layer(f"{prefix}.{name}", conv)]


def _attention(prefix: str, attention: LiteMLA) -> Iterator[tuple[str, fl.Module]]:
    qkv, proj = attention.layers(Pointwise)
    yield f"{prefix}.qkv", qkv
    for k, (aggregation, _) in enumerate(attention.walk(Aggregation)):
        depthwise, grouped = aggregation.layers(fl.Conv2d)
        yield f"{prefix}.aggreg.{k}.0", depthwise
        yield f"{prefix}.aggreg.{k}.1", grouped
    yield f"{prefix}.proj", proj
    yield f"{prefix}.proj.norm", attention.ensure_find(BatchNorm2d)


def _pairs(encoder: EncoderChain[Any]) -> Iterator[tuple[str, fl.Module]]:
    """Every (official prefix, module) of the encoder, `Pointwise` layers included (their prefix names the
    official 1x1 ConvLayer)."""
    assert isinstance(encoder, EfficientViTEncoder)
    for i, stage in enumerate(encoder.stages()):
        for j, block in enumerate(stage):
            prefix = f"{_BACKBONE}.{i}.op_list.{j}"
            if isinstance(block, ConvLayer):
                yield from _conv_layer(prefix, block)
            elif isinstance(block, DownsamplingBlock | LocalBlock):
                yield from _local(f"{prefix}.main", block[0])  # type: ignore[arg-type]
            elif isinstance(block, EfficientViTBlock):
                context, local = block
                yield from _attention(f"{prefix}.context_module.main", context.ensure_find(LiteMLA))  # type: ignore[union-attr]
                yield from _local(f"{prefix}.local_module.main", local[0])  # type: ignore[index,arg-type]
    neck = encoder.ensure_find(SamNeck)
    for k, (neck_input, _) in enumerate(neck.walk(NeckInput)):
        yield from _conv_layer(f"{_NECK}.input_ops.{k}.op_list.0", neck_input.ensure_find(ConvLayer))
    for j, block in enumerate(neck.ensure_find(NeckBlocks)):
        yield from _local(f"{_NECK}.middle.op_list.{j}.main", block[0])  # type: ignore[index,arg-type]
    yield f"{_NECK}.output_ops.0.op_list.0", neck.ensure_find(Pointwise)
    yield "image_encoder.norm", encoder.layer(-1, fl.Module)


def modules(encoder: EncoderChain[Any]) -> list[tuple[str, fl.Module]]:
    """Convolutions, BatchNorms and the final norm: the same tensor names as the official modules."""
    return [(prefix, module) for prefix, module in _pairs(encoder) if not isinstance(module, Pointwise)]


def rules(encoder: EncoderChain[Any], key: KeyOf) -> dict[str, Rule]:
    """The 1x1 ConvLayers written as linear layers: (out, in, 1, 1) kernels as (out, in) weights."""
    found: dict[str, Rule] = {}
    for prefix, module in _pairs(encoder):
        if not isinstance(module, Pointwise):
            continue
        linear = module.ensure_find(fl.Linear)
        found[key(linear, "weight")] = Rule((f"{prefix}.conv.weight",), lambda t: t.reshape(t.shape[0], -1))
        if linear.bias is not None:
            found[key(linear, "bias")] = Rule((f"{prefix}.conv.bias",))
    return found


def whole_model_hint(global_name: str) -> str | None:
    if global_name.startswith(("efficientvit.", "efficientsam.")):
        return "convert the state_dict of EfficientViT-SAM (the efficientvit_sam_*.pt files) instead"
    return None


_REPO = "mit-han-lab/efficientvit-sam"

LAYOUT = CheckpointLayout(
    family="efficientvit",
    recognises=recognises,
    infer_encoder=infer_encoder,
    modules=modules,
    rules=rules,
    whole_model_hint=whole_model_hint,
    infer_config=infer_config,
    checkpoints=tuple(
        Checkpoint(
            f"efficientvit_sam_{size}",
            f"https://huggingface.co/{_REPO}/resolve/main/efficientvit_sam_{size}.pt",
            None,
            None,
            f"EfficientViT-SAM-{size.upper()} ({'512' if size.startswith('l') else '1024'} px input)",
            _REPO,
            f"efficientvit_sam_{size}",
            licence="Apache-2.0",
        )
        for size in ("l0", "l1", "l2", "xl0", "xl1")
    ),
)
