"""The official SAM 2 keys of the Hiera image encoder: trunk, FPN neck, the decoder's high-resolution skip
projections (`sam_mask_decoder.conv_s0` / `conv_s1`) and `no_mem_embed`."""

from refiners.fluxion import layers as fl

from finesam.model.image_encoder import FeedForward
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
from finesam.weights.key_map import Rule
from finesam.weights.layouts import KeyOf

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
