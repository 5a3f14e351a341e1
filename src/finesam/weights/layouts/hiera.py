"""The official checkpoint layout of the `hiera` family: SAM 2 / SAM 2.1 (`sam2.1_hiera_*.pt`, `sam2_hiera_*.pt`).

A checkpoint is `{"model": state_dict}` with the Hiera trunk and FPN neck (`image_encoder.trunk.*`,
`image_encoder.neck.*`), SAM's prompt encoder and decoder under other prefixes (`sam_prompt_encoder.*`,
`sam_mask_decoder.*`, with the object-score token and head and the skip projections `conv_s0` / `conv_s1`),
`no_mem_embed`, and the video memory's modules, which the image model does not build.
HQ-SAM 2's `sam2.1_hq_hiera_large.pt` is the same, plus 13 HQ tensors under `sam_mask_decoder.` (`hf_token`,
`hf_mlp`, `embedding_maskfeature`), which `finesam.weights.hq` reads.
"""

from collections.abc import Mapping
from typing import Any

from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import SAMConfig
from finesam.model.image_encoder import FeedForward
from finesam.model.sam2.config import SAM2_PRESETS, HieraConfig, SAM2DecoderConfig
from finesam.model.sam2.hiera import (
    FpnLateral,
    HieraBlock,
    HieraEncoder,
    HighResolutionFeature,
    MultiScaleAttention,
    NoMemoryEmbedding,
    PatchEmbedding,
    PooledShortcut,
    PoolingBlock,
    WindowedPositionEmbedding,
)
from finesam.model.sam2.mask_decoder import ObjectScoreHead, UpscaledWithSkips
from finesam.weights.io import CheckpointError
from finesam.weights.key_map import Rule, rules_for
from finesam.weights.layouts import Checkpoint, CheckpointLayout, KeyOf, count, shape_of
from finesam.weights.sam_keys import DecoderKeys, decoder_modules, decoder_rules

TRUNK = "image_encoder.trunk"
NECK = "image_encoder.neck"


def _block_modules(prefix: str, block: HieraBlock | PoolingBlock) -> list[tuple[str, fl.Module]]:
    norm1, norm2 = block.layers(fl.LayerNorm)
    qkv, proj = block.ensure_find(MultiScaleAttention).layers(fl.Linear)
    fc1, fc2 = block.ensure_find(FeedForward).layers(fl.Linear)
    pairs: list[tuple[str, fl.Module]] = [
        (f"{prefix}.norm1", norm1),
        (f"{prefix}.attn.qkv", qkv),
        (f"{prefix}.attn.proj", proj),
        (f"{prefix}.norm2", norm2),
        (f"{prefix}.mlp.layers.0", fc1),
        (f"{prefix}.mlp.layers.1", fc2),
    ]
    if shortcut := block.find(PooledShortcut):  # the stage change projects its shortcut to the new width
        pairs.append((f"{prefix}.proj", shortcut.ensure_find(fl.Linear)))
    return pairs


def hiera_modules(encoder: HieraEncoder) -> list[tuple[str, fl.Module]]:
    """(official module prefix, module of `encoder`) pairs whose tensors have the same names and shapes, found by
    the chain's structure.

    Args:
        encoder: the encoder whose modules are named.

    Returns:
        The pairs: patch embedding, every block (in order), the neck's laterals (`convs[0]` is the stride-32 level),
        the decoder's skip projections.
    """
    pairs: list[tuple[str, fl.Module]] = [
        (f"{TRUNK}.patch_embed.proj", encoder.ensure_find(PatchEmbedding).ensure_find(fl.Conv2d))
    ]
    blocks = [block for block, _ in encoder.walk(lambda m, _: isinstance(m, HieraBlock | PoolingBlock))]
    for i, block in enumerate(blocks):
        assert isinstance(block, HieraBlock | PoolingBlock)
        pairs += _block_modules(f"{TRUNK}.blocks.{i}", block)
    last = len(encoder.config.dims) - 1
    for lateral, _ in encoder.walk(FpnLateral):
        pairs.append((f"{NECK}.convs.{last - lateral.level}.conv", lateral.ensure_find(fl.Conv2d)))
    for feature, _ in encoder.walk(HighResolutionFeature):
        level = feature.ensure_find(FpnLateral).level
        pairs.append((f"sam_mask_decoder.conv_s{level}", feature.layer("Conv2d", fl.Conv2d)))
    return pairs


def hiera_rules(encoder: HieraEncoder, key: KeyOf) -> dict[str, Rule]:
    """The tensors that are not one-to-one: the position embeddings and `no_mem_embed` lose their leading
    singleton dimensions (stored channels-first, per channel).

    Args:
        encoder: the encoder whose tensors are made.
        key: our `state_dict` key of a module's tensor.

    Returns:
        Rules keyed by our `state_dict` key.
    """
    positions = encoder.ensure_find(WindowedPositionEmbedding)
    no_memory = encoder.ensure_find(NoMemoryEmbedding).ensure_find(fl.Parameter)
    return {
        key(positions, "background"): Rule((f"{TRUNK}.pos_embed",), lambda t: t[0]),
        key(positions, "window"): Rule((f"{TRUNK}.pos_embed_window",), lambda t: t[0]),
        key(no_memory, "weight"): Rule(("no_mem_embed",), lambda t: t.reshape(-1, 1, 1)),
    }


SAM2_KEYS = DecoderKeys(
    prompt_encoder="sam_prompt_encoder",
    mask_decoder="sam_mask_decoder",
    mlp=("mlp.layers.0", "mlp.layers.1"),
    output_tokens=("obj_score_token.weight", "iou_token.weight", "mask_tokens.weight"),
    upscaling=UpscaledWithSkips,
)

# the video memory (memory attention and encoder, object pointers, their embeddings): not part of the image model
MEMORY_PREFIXES = ("memory_attention.", "memory_encoder.", "mask_downsample.", "obj_ptr_proj.", "obj_ptr_tpos_proj.")
MEMORY_KEYS = ("maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial")


def is_memory_key(key: str) -> bool:
    """A tensor of SAM 2's video memory."""
    return key.startswith(MEMORY_PREFIXES) or key in MEMORY_KEYS


def recognises(state_dict: Mapping[str, Tensor]) -> bool:
    """The Hiera trunk (`image_encoder.trunk.*`)."""
    return any(key.startswith(f"{TRUNK}.") for key in state_dict)


def _visible_shape(state_dict: Mapping[str, Tensor]) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """What the weights show of a Hiera: width, blocks per stage, background embedding size, first window."""
    depth = count(state_dict, r"image_encoder\.trunk\.blocks\.(\d+)\..*")
    widths = [shape_of(state_dict, f"{TRUNK}.blocks.{i}.norm2.weight")[0] for i in range(depth)]
    stages = tuple(widths.count(width) for width in dict.fromkeys(widths))
    _, _, *background = shape_of(state_dict, f"{TRUNK}.pos_embed")
    window = shape_of(state_dict, f"{TRUNK}.pos_embed_window")[-1]
    return widths[0], stages, tuple(background), window


def infer_encoder(state_dict: Mapping[str, Tensor]) -> tuple[HieraConfig, int]:
    """The Hiera of a released size: the heads, global blocks and later windows are not in the weights, so the
    visible shapes must be those of a release, whose values are taken.

    Raises:
        CheckpointError: the shapes are those of no release.
    """
    width, stages, background, window = _visible_shape(state_dict)
    for preset in SAM2_PRESETS:
        encoder = preset.encoder
        assert isinstance(encoder, HieraConfig)
        seen = (encoder.embed_dim, encoder.stages, encoder.position_embedding_size, encoder.window_spec[0])
        if seen == (width, stages, background, window):
            return encoder, preset.image_size
    raise CheckpointError(
        f"a Hiera of no released size (width {width}, stages {list(stages)}): its heads, global attention blocks "
        "and windows are not in the weights; build `SegmentAnything2` with its HieraConfig and convert with "
        "`finesam.weights.sam_keys.convert_state_dict`"
    )


def infer_config(state_dict: Mapping[str, Tensor]) -> SAMConfig:
    """The configuration of an official SAM 2 / 2.1 `state_dict`; the release's name when it is one (2.1 files
    hold the 2.1-only `no_obj_embed_spatial`)."""
    encoder, image_size = infer_encoder(state_dict)
    decoder, prompt = SAM2_KEYS.mask_decoder, SAM2_KEYS.prompt_encoder
    config = SAMConfig(
        encoder,
        SAM2DecoderConfig(
            prompt_dim=shape_of(state_dict, f"{decoder}.iou_token.weight")[1],
            mask_in_channels=shape_of(state_dict, f"{prompt}.mask_downscaling.3.weight")[0],
            depth=count(state_dict, r"sam_mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight"),
            mlp_dim=shape_of(state_dict, f"{decoder}.transformer.layers.0.mlp.layers.0.weight")[0],
            num_multimask_outputs=shape_of(state_dict, f"{decoder}.mask_tokens.weight")[0] - 1,
            iou_head_depth=count(state_dict, r"sam_mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
            iou_head_hidden_dim=shape_of(state_dict, f"{SAM2_KEYS.mask_decoder}.iou_prediction_head.layers.0.weight")[
                0
            ],
        ),
        image_size=image_size,
    )
    release = "sam2.1" if "no_obj_embed_spatial" in state_dict else "sam2"
    name = next((p.name for p in SAM2_PRESETS if p == config and p.name.startswith(f"{release}_")), "custom")
    return SAMConfig(config.encoder, config.decoder, config.image_size, name=name)


def model_rules(model: Any, key: KeyOf) -> dict[str, Rule]:
    """Every tensor of a `SegmentAnything2`: the encoder's, then the prompt encoder's and decoder's under SAM 2's
    names, with the object-score head."""
    encoder = model.image_encoder
    pairs = hiera_modules(encoder) + decoder_modules(model, SAM2_KEYS)
    head = model.ensure_find(ObjectScoreHead)
    pairs += [
        (f"{SAM2_KEYS.mask_decoder}.pred_obj_score_head.layers.{j}", linear)
        for j, linear in enumerate(head.layers(fl.Linear))
    ]
    return rules_for(model, pairs) | hiera_rules(encoder, key) | decoder_rules(model, key, SAM2_KEYS)


_URL = "https://dl.fbaipublicfiles.com/segment_anything_2"
_SIZES = ("tiny", "small", "base_plus", "large")
_HQ_REPO = "lkeab/hq-sam"

LAYOUT = CheckpointLayout(
    family="hiera",
    recognises=recognises,
    infer_encoder=infer_encoder,
    modules=hiera_modules,  # type: ignore[arg-type]  # the layout's contract takes any family's chain
    rules=hiera_rules,  # type: ignore[arg-type]
    unused=is_memory_key,
    kept=is_memory_key,  # the video model's (SAM 2 tracking) in the same file
    checkpoints=tuple(
        Checkpoint(
            f"sam2.1_hiera_{size}",
            f"{_URL}/092824/sam2.1_hiera_{size}.pt",
            None,
            None,
            f"SAM 2.1 Hiera-{size}",
            preset=f"sam2.1_hiera_{size}",
        )
        for size in _SIZES
    )
    + tuple(
        Checkpoint(
            f"sam2_hiera_{size}",
            f"{_URL}/072824/sam2_hiera_{size}.pt",
            None,
            None,
            f"SAM 2 Hiera-{size}",
            preset=f"sam2_hiera_{size}",
        )
        for size in _SIZES
    )
    + (
        # HQ-SAM 2 (SysCV sam-hq2): the SAM 2.1 large keys plus its 13 HQ tensors (`finesam.weights.hq`)
        Checkpoint(
            "sam2.1_hq_hiera_large",
            f"https://huggingface.co/{_HQ_REPO}/resolve/main/sam2.1_hq_hiera_large.pt",
            None,
            None,
            "HQ-SAM 2 on SAM 2.1 Hiera-large",
            _HQ_REPO,
            preset="sam2.1_hiera_large",
        ),
    ),
    infer_config=infer_config,
    model_rules=model_rules,
)
