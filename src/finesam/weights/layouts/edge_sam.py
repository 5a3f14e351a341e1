"""The official checkpoint layout of the `edge_sam` family: EdgeSAM's RepViT keys (`image_encoder.features.*`,
`fuse_stage2`, `fuse_stage3.op_list.0`, `neck.*`) plus SAM's prompt encoder and mask decoder keys.

`features.0` is the stem; `features.{i}` (i >= 1) is the i-th block: `token_mixer.0` the re-parameterisable
depthwise pair (`conv`, `conv1`) or, in a downsampling block, the stride-2 depthwise unit with the pointwise one
at `token_mixer.2`; `token_mixer.1` squeeze-and-excitation (`fc1`, `fc2`, 1x1 convolutions) where the block
has it; `channel_mixer.m.{0,2}` the MLP. The 1x1 convolutions that act on pooled or channels-last maps here are
linear layers (the same weights without their 1x1 kernel dimensions).
"""

from collections.abc import Mapping
from typing import Any

from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.registry import EncoderChain
from finesam.model.rep_vit import (
    ChannelMixer,
    DownsamplingTokenMixer,
    LowResolutionPath,
    RepVGGDW,
    RepViTBlock,
    RepViTConfig,
    RepViTEncoder,
    SqueezeExcite,
    StageFusion,
)
from finesam.model.tiny_vit import BatchNorm2d, Conv2dBN, ConvStem
from finesam.weights.io import CheckpointError
from finesam.weights.key_map import Rule
from finesam.weights.layouts import Checkpoint, CheckpointLayout, KeyOf, count, neck_modules, shape_of

_PREFIX = "image_encoder.features"


def recognises(state_dict: Mapping[str, Tensor]) -> bool:
    """RepViT's blocks (`image_encoder.features`) or EdgeSAM's stage fusion."""
    return any(key.startswith((f"{_PREFIX}.", "image_encoder.fuse_stage2.")) for key in state_dict)


def infer_encoder(state_dict: Mapping[str, Tensor]) -> tuple[RepViTConfig, int]:
    """Stage widths and depths (a new stage starts at each downsampling block), the blocks with
    squeeze-and-excitation and the fusion width; input size 1024 (the weights do not depend on it)."""
    num_blocks = count(state_dict, rf"{_PREFIX}\.(\d+)\..*") - 1  # features.0 is the stem
    widths = [shape_of(state_dict, f"{_PREFIX}.0.2.c.weight")[0]]
    depths = [0]
    se_blocks = []
    for i in range(1, num_blocks + 1):
        if f"{_PREFIX}.{i}.token_mixer.2.c.weight" in state_dict:  # a downsampling block starts a stage
            widths.append(shape_of(state_dict, f"{_PREFIX}.{i}.token_mixer.2.c.weight")[0])
            depths.append(0)
        depths[-1] += 1
        if f"{_PREFIX}.{i}.token_mixer.1.fc1.weight" in state_dict:
            se_blocks.append(i - 1)
    if len(widths) != 4 or depths[0] == 0:
        raise CheckpointError(
            f"not an EdgeSAM checkpoint: its RepViT has {len(widths)} stages of {depths} blocks (expected 4, "
            "the first without downsampling)"
        )
    try:
        config = RepViTConfig(
            widths=tuple(widths),
            depths=tuple(depths),
            se_blocks=tuple(se_blocks),
            fusion_dim=shape_of(state_dict, "image_encoder.fuse_stage2.weight")[0],
        )
    except ValueError as e:
        raise CheckpointError(f"not an EdgeSAM checkpoint: {e}") from None
    return config, 1024


def _conv_bn(prefix: str, layer: Conv2dBN) -> list[tuple[str, fl.Module]]:
    return [(f"{prefix}.c", layer.ensure_find(fl.Conv2d)), (f"{prefix}.bn", layer.ensure_find(BatchNorm2d))]


def _blocks(encoder: EncoderChain[Any]) -> list[RepViTBlock]:
    assert isinstance(encoder, RepViTEncoder)
    return [block for stage in encoder.stages() for block in stage if isinstance(block, RepViTBlock)]


def modules(encoder: EncoderChain[Any]) -> list[tuple[str, fl.Module]]:
    """Stem, blocks and neck by the chain's structure (squeeze-and-excitation and the fusion: `rules`)."""
    stem = list(encoder.ensure_find(ConvStem).layers(Conv2dBN))
    pairs = _conv_bn(f"{_PREFIX}.0.0", stem[0]) + _conv_bn(f"{_PREFIX}.0.2", stem[1])
    for i, block in enumerate(_blocks(encoder), start=1):
        prefix = f"{_PREFIX}.{i}"
        if (mixer := block.find(DownsamplingTokenMixer)) is not None:
            depthwise, pointwise = mixer.layers(Conv2dBN)
            pairs += _conv_bn(f"{prefix}.token_mixer.0", depthwise) + _conv_bn(f"{prefix}.token_mixer.2", pointwise)
        else:
            conv, conv1 = block.ensure_find(RepVGGDW).layers(Conv2dBN)
            pairs += _conv_bn(f"{prefix}.token_mixer.0.conv", conv) + _conv_bn(f"{prefix}.token_mixer.0.conv1", conv1)
        expand, project = block.ensure_find(ChannelMixer).layers(Conv2dBN)
        pairs += _conv_bn(f"{prefix}.channel_mixer.m.0", expand) + _conv_bn(f"{prefix}.channel_mixer.m.2", project)
    return pairs + neck_modules(encoder)


def _pointwise(weight: Tensor) -> Tensor:
    """A 1x1 convolution's weight (out, in, 1, 1) as a linear layer's (out, in)."""
    if weight.shape[2:] != (1, 1):
        raise RuntimeError(f"expected a 1x1 convolution, got a kernel of {tuple(weight.shape[2:])}")
    return weight.flatten(1)


def rules(encoder: EncoderChain[Any], key: KeyOf) -> dict[str, Rule]:
    """Squeeze-and-excitation's 1x1 convolutions and the fusion's projections, as linear layers."""
    out: dict[str, Rule] = {}
    for i, block in enumerate(_blocks(encoder), start=1):
        if (se := block.find(SqueezeExcite)) is None:
            continue
        for name, linear in zip(("fc1", "fc2"), se.layers(fl.Linear), strict=True):
            source = f"{_PREFIX}.{i}.token_mixer.1.{name}"
            out[key(linear, "weight")] = Rule((f"{source}.weight",), _pointwise)
            out[key(linear, "bias")] = Rule((f"{source}.bias",))
    fusion = encoder.ensure_find(StageFusion)
    # the projections are children of the fusion and of its low-resolution path (stage 3 has linear layers too)
    stage2 = next(m for m in fusion if isinstance(m, fl.Linear))
    stage3 = next(m for m in fusion.ensure_find(LowResolutionPath) if isinstance(m, fl.Linear))
    out[key(stage2, "weight")] = Rule(("image_encoder.fuse_stage2.weight",), _pointwise)
    out[key(stage3, "weight")] = Rule(("image_encoder.fuse_stage3.op_list.0.weight",), _pointwise)
    return out


_SPACE = "https://huggingface.co/spaces/chongzhou/EdgeSAM/resolve/main/weights/"
_LICENCE = "S-Lab-1.0 (non-commercial)"

LAYOUT = CheckpointLayout(
    family="edge_sam",
    recognises=recognises,
    infer_encoder=infer_encoder,
    modules=modules,
    rules=rules,
    # the links of EdgeSAM's README (its Hugging Face Space); no size or SHA-256 is published
    checkpoints=(
        Checkpoint("edge_sam", _SPACE + "edge_sam.pth", None, None, "EdgeSAM", preset="edge_sam", licence=_LICENCE),
        Checkpoint(
            "edge_sam_3x",
            _SPACE + "edge_sam_3x.pth",
            None,
            None,
            "EdgeSAM-3x (trained 3x longer)",
            preset="edge_sam_3x",
            licence=_LICENCE,
        ),
    ),
)
