"""MobileSAMv2's prompt-guided mask decoder (Zhang et al., 2023; github.com/ChaoningZhang/MobileSAM, folder
MobileSAMv2) paired with the image encoder of another release, as one SAM.

MobileSAMv2 re-trains SAM 1's prompt encoder and mask decoder (the same modules, the same key names) for the boxes
of its object-aware prompter, and saves them alone: `Prompt_guided_Mask_Decoder.pt` is a dict of two state dicts,
`PromtEncoder` (spelled so) and `MaskDecoder`. Its code pairs them with the image encoder of MobileSAM (TinyViT),
EfficientViT-SAM L2 or SAM ViT-H. Here a pair is the encoder checkpoint's `image_encoder.*` tensors plus the decoder
file's under SAM's `prompt_encoder.` / `mask_decoder.` prefixes: an official checkpoint of the encoder's family,
read by that family's layout like any other (`finesam.weights.loading.convert_checkpoint(..., decoder=)`).

Its prompter (`ObjectAwareModel.pt`, a YOLOv8 detector) is a pickled ultralytics model, which finesam never
unpickles (`finesam.weights.io.KNOWN_PICKLES` says so when it is given); its boxes go to `finesam segment --manifest`.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from finesam.model.mask_decoder import MaskDecoder
from finesam.model.registry import EncoderFamily, families, family_named
from finesam.model.sam import SegmentAnything
from finesam.text import listing
from finesam.weights.io import CheckpointError, load_pickled_weights
from finesam.weights.layouts import Checkpoint, layout_for

# the file's two sections (the official spelling) and SAM's prefix of each
SECTIONS = {"PromtEncoder": "prompt_encoder", "MaskDecoder": "mask_decoder"}
ENCODER_PREFIX = "image_encoder."
# the official model's embedding grid (1024 px input, 16 px per cell): what the decoder was trained on
TRAINED_GRID = 64

CHECKPOINT = Checkpoint(
    "mobilesamv2_decoder",
    "https://github.com/ChaoningZhang/MobileSAM/raw/master/MobileSAMv2/PromptGuidedDecoder/Prompt_guided_Mask_Decoder.pt",
    None,
    None,
    "MobileSAMv2's prompt-guided decoder (SAM 1's, re-trained for detector boxes)",
    licence="Apache-2.0",
    decoder=True,
)


def read_prompt_guided_decoder(path: str | Path) -> dict[str, Tensor]:
    """The tensors of MobileSAMv2's `Prompt_guided_Mask_Decoder.pt` under SAM's official keys
    (`prompt_encoder.*`, `mask_decoder.*`), read with `torch.load(weights_only=True)`. MobileSAMv2's own loader reads
    the two sections alone; anything else in the file is not used here either.

    Raises:
        CheckpointError: the file is unreadable, holds Python objects (a pickled model, e.g. the YOLOv8 prompter),
            or is not a dict of the two state dicts.
    """
    loaded = load_pickled_weights(path)
    expected = " and ".join(f"'{name}'" for name in SECTIONS)
    if not isinstance(loaded, Mapping) or not all(section in loaded for section in SECTIONS):
        found = f"the keys {listing(sorted(map(str, loaded)), 5)}" if isinstance(loaded, Mapping) else "no dict"
        hint = " (a SAM checkpoint: give it as the encoder)" if isinstance(loaded, Mapping) and _is_sam(loaded) else ""
        raise CheckpointError(
            f"{path}: not MobileSAMv2's prompt-guided decoder: it holds {found}{hint}; the decoder file "
            f"(Prompt_guided_Mask_Decoder.pt) is a dict of two state dicts, {expected}"
        )
    tensors: dict[str, Tensor] = {}
    for section, prefix in SECTIONS.items():
        state_dict = loaded[section]
        if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
            raise CheckpointError(f"{path}: not MobileSAMv2's prompt-guided decoder: '{section}' is not a state dict")
        tensors |= {f"{prefix}.{key}": tensor for key, tensor in state_dict.items()}
    return tensors


def _is_sam(loaded: Mapping[object, object]) -> bool:
    return any(isinstance(key, str) and key.startswith(ENCODER_PREFIX) for key in loaded)


@dataclass(frozen=True)
class Pairing:
    """An encoder checkpoint and MobileSAMv2's decoder as one official-layout `state_dict`."""

    state_dict: dict[str, Tensor]
    replaced: list[str]  # the encoder checkpoint's own prompt encoder and decoder keys (HQ-SAM's too), left out


def takes_the_decoder(family: EncoderFamily) -> bool:
    """Whether `family`'s model has SAM 1's mask decoder, the one MobileSAMv2's file holds (and its key names)."""
    return (family.model or SegmentAnything).decoder_class is MaskDecoder


def sam1_decoder_families() -> list[str]:
    """The registered families whose encoders pair with MobileSAMv2's decoder, in registration order."""
    return [name for name, family in families().items() if takes_the_decoder(family)]


def pair_with_decoder(encoder: Mapping[str, Tensor], decoder: Mapping[str, Tensor]) -> Pairing:
    """The official `state_dict` of a SAM made of `encoder`'s image encoder and MobileSAMv2's decoder.

    Args:
        encoder: an official checkpoint of a registered family with SAM 1's decoder (SAM, MobileSAM, ...), or its
            image encoder alone, with or without the `image_encoder.` prefix (MobileSAMv2's own encoder files
            have none).
        decoder: `read_prompt_guided_decoder`'s tensors.

    Returns:
        The pair's tensors and the replaced keys.

    Raises:
        CheckpointError: no registered family recognises the encoder, its family has another decoder (SAM 2), or its
            embedding width is not the decoder's.
    """
    if not any(key.startswith(ENCODER_PREFIX) for key in encoder):
        encoder = {f"{ENCODER_PREFIX}{key}": tensor for key, tensor in encoder.items()}
    replaced = sorted(k for k in encoder if k.startswith(tuple(f"{p}." for p in SECTIONS.values())))
    state_dict = {k: v for k, v in encoder.items() if k not in replaced} | dict(decoder)
    family = family_named(layout_for(state_dict).family)
    if not takes_the_decoder(family):
        raise CheckpointError(
            f"the encoder is of the {family.name} family ({family.title}), which has a mask decoder of its own; "
            f"MobileSAMv2's decoder is SAM 1's and pairs with the encoders of {', '.join(sam1_decoder_families())}"
        )
    width = decoder.get("prompt_encoder.no_mask_embed.weight")
    neck = encoder.get(f"{ENCODER_PREFIX}neck.0.weight")  # SAM's neck, where the family ends with it
    if width is not None and neck is not None and neck.shape[0] != width.shape[-1]:
        raise CheckpointError(
            f"the encoder does not fit MobileSAMv2's decoder: its embedding has {neck.shape[0]} channels "
            f"({ENCODER_PREFIX}neck.0.weight {tuple(neck.shape)}), the decoder takes {width.shape[-1]}"
        )
    return Pairing(state_dict, replaced)


def grid_note(embedding_size: int) -> list[str]:
    """A note when the pair's embedding grid is not the one the decoder was trained on."""
    if embedding_size == TRAINED_GRID:
        return []
    return [
        f"the encoder gives a {embedding_size} x {embedding_size} embedding; MobileSAMv2's decoder was trained on "
        f"{TRAINED_GRID} x {TRAINED_GRID} (1024 px input)"
    ]
