"""Hyper-parameters of a Segment Anything model: one config per encoder family, one for the prompt side, and
the official presets."""

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Protocol, get_args, get_origin

from finesam.model.registry import PRESETS, EncoderConfig, families, family_named


def check_config(
    config: object, checks: Callable[[], list[tuple[bool, str]]], limits: dict[str, tuple[float, float]]
) -> None:
    """Raises `ValueError` naming every field of the wrong type or out of `limits` (inclusive), else every failed
    check. Types come first: the checks compute with the fields. Every family's config checks itself with it.

    Args:
        config: a config dataclass (its fields' annotations give the types).
        checks: (holds, message) pairs, computed after the types passed.
        limits: inclusive (low, high) per numeric field; (0, 65536) by default.
    """
    failed = _type_and_range_problems(config, limits)
    if not failed:
        failed = [message for ok, message in checks() if not ok]
    if failed:
        raise ValueError(f"invalid {type(config).__name__}: " + "; ".join(failed))


def _type_and_range_problems(config: object, limits: dict[str, tuple[float, float]]) -> list[str]:
    # the limits are far beyond every released model; they stop a crafted file from building a huge one
    problems = []
    for f in fields(config):  # type: ignore[arg-type]
        value, kind = getattr(config, f.name), f.type
        element = get_args(kind)[0] if get_origin(kind) is tuple else kind
        values = value if get_origin(kind) is tuple else (value,)
        if get_origin(kind) is tuple and not isinstance(value, tuple):
            problems.append(f"{f.name} must be a list of {getattr(element, '__name__', element)}, got {value!r}")
            continue
        if element not in (int, float, str):
            continue  # nested configs check themselves
        if element is str:
            if not all(isinstance(v, str) for v in values):
                noun = "a list of strings" if get_origin(kind) is tuple else "a string"
                problems.append(f"{f.name} must be {noun}, got {value!r}")
            continue
        number = (int,) if element is int else (int, float)
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
            noun = ("integers" if element is int else "numbers") if get_origin(kind) is tuple else None
            noun = noun or ("an integer" if element is int else "a number")
            problems.append(f"{f.name} must be {noun}, got {value!r}")
            continue
        low, high = limits.get(f.name, (0, 1 << 16))
        if not all(low <= v <= high for v in values):
            problems.append(f"{f.name} {value!r} is out of range ({low:g}..{high:g})")
    return problems


# the limits of the ViT chain's fields, far beyond every released model (see `_type_and_range_problems`)
VIT_LIMITS: dict[str, tuple[float, float]] = {
    "dim": (1, 8192),
    "depth": (1, 128),
    "heads": (1, 256),
    "window_size": (1, 256),
    "patch_size": (1, 256),
}


def vit_shape_checks(config: "ViTShape") -> list[tuple[bool, str]]:
    """The checks every configuration of the ViT chain passes (SAM's ViT and its variants)."""
    return [
        (config.dim % config.heads == 0, f"dim {config.dim} is not divisible by heads {config.heads}"),
        (
            all(0 <= i < config.depth for i in config.global_attention_blocks),
            f"global_attention_blocks {config.global_attention_blocks} must be in 0..{config.depth - 1}",
        ),
    ]


@dataclass(frozen=True)
class ViTConfig:
    """The plain ViT of SAM ViT-B/L/H: windowed attention blocks with a few global ones. Defaults: ViT-B."""

    family: ClassVar[str] = "vit"
    dim: int = 768
    depth: int = 12
    heads: int = 12
    global_attention_blocks: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    patch_size: int = 16

    def __post_init__(self) -> None:
        check_config(self, lambda: vit_shape_checks(self), {**VIT_LIMITS, "mlp_ratio": (0.01, 64)})

    @property
    def mlp_dim(self) -> int:
        """Hidden width of each block's MLP."""
        return int(self.dim * self.mlp_ratio)

    @property
    def early_embedding_block(self) -> int:
        """Index of the first global-attention block, whose output HQ-SAM fuses with the final embedding."""
        return min(self.global_attention_blocks)

    @property
    def early_embedding_dim(self) -> int:
        return self.dim

    def describe(self) -> str:
        return f"ViT {self.dim}x{self.depth}"


class ViTShape(EncoderConfig, Protocol):
    """What the ViT chain (`ImageEncoder`) reads of a config: `ViTConfig`, and the configs of ViT variants
    (SlimSAM's pruned ViT, with an explicit MLP width)."""

    @property
    def dim(self) -> int: ...
    @property
    def depth(self) -> int: ...
    @property
    def heads(self) -> int: ...
    @property
    def global_attention_blocks(self) -> tuple[int, ...]: ...
    @property
    def window_size(self) -> int: ...
    @property
    def patch_size(self) -> int: ...
    @property
    def mlp_dim(self) -> int: ...
    @property
    def early_embedding_block(self) -> int: ...


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT (MobileSAM, Light HQ-SAM): a convolutional stage, then three attention stages.

    `dims` and `depths` cover the four stages; `heads` and `windows` the three attention stages.
    """

    family: ClassVar[str] = "tiny_vit"
    dims: tuple[int, int, int, int] = (64, 128, 160, 320)
    depths: tuple[int, int, int, int] = (2, 2, 6, 2)
    heads: tuple[int, int, int] = (4, 5, 10)
    windows: tuple[int, int, int] = (7, 14, 7)
    mbconv_expand: float = 4.0

    def __post_init__(self) -> None:
        check_config(
            self,
            lambda: [
                (len(self.dims) == len(self.depths) == 4, "dims and depths need 4 entries (one per stage)"),
                (len(self.heads) == len(self.windows) == 3, "heads and windows need 3 entries (attention stages)"),
                (
                    all(d % h == 0 for d, h in zip(self.dims[1:], self.heads, strict=False)),
                    f"dims {self.dims[1:]} are not divisible by heads {self.heads}",
                ),
            ],
            {
                "dims": (1, 8192),
                "depths": (1, 128),
                "heads": (1, 256),
                "windows": (1, 256),
                "mbconv_expand": (0.01, 64),
            },
        )

    @property
    def patch_size(self) -> int:
        """16: the stem divides the input by 4 and two patch mergings by 2 each."""
        return 16

    @property
    def dim(self) -> int:
        """Width of the last stage, which the neck projects to the prompt dimension."""
        return self.dims[3]

    @property
    def early_embedding_dim(self) -> int:
        """HQ-SAM fuses the output of stage 1 (after its patch merging): `dims[2]` channels."""
        return self.dims[2]

    def describe(self) -> str:
        return f"TinyViT {'/'.join(map(str, self.dims))}"


@dataclass(frozen=True)
class DecoderConfig:
    """The prompt encoder and the mask decoder (the same in every official release)."""

    prompt_dim: int = 256
    mask_in_channels: int = 16
    depth: int = 2
    heads: int = 8
    mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def __post_init__(self) -> None:
        check_config(
            self,
            lambda: [
                (self.prompt_dim % 8 == 0, f"prompt_dim {self.prompt_dim} must be a multiple of 8 (mask features)"),
                (self.mask_in_channels % 4 == 0, f"mask_in_channels {self.mask_in_channels} must be a multiple of 4"),
                (self.prompt_dim % self.heads == 0, f"prompt_dim {self.prompt_dim} is not divisible by {self.heads}"),
            ],
            {
                "prompt_dim": (8, 8192),
                "mask_in_channels": (4, 1024),
                "depth": (1, 64),
                "heads": (1, 256),
                "mlp_dim": (1, 65536),
                "num_multimask_outputs": (1, 64),
                "iou_head_depth": (1, 64),
                "iou_head_hidden_dim": (1, 65536),
            },
        )

    @property
    def num_mask_tokens(self) -> int:
        return self.num_multimask_outputs + 1

    @property
    def iou_token(self) -> int:
        """Position of the IoU token among the output tokens; the mask tokens follow it."""
        return 0

    @property
    def num_output_tokens(self) -> int:
        """The learned tokens the decoder puts before the prompt tokens."""
        return self.iou_token + 1 + self.num_mask_tokens


@dataclass(frozen=True)
class SAMConfig:
    """Everything needed to build a `SegmentAnything`: the encoder of one family, the decoder, the input size.

    `PRESETS` holds the official releases of every registered encoder family (`SAM_VIT_B`, `SAM_VIT_L`,
    `SAM_VIT_H`, `SAM_VIT_TINY`, ...); smaller configurations (tests, experiments) change the fields freely.
    """

    encoder: EncoderConfig = field(default_factory=ViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_size: int = 1024
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        # the encoder's family is looked up when a model is built (presets are made before families register)
        if not is_dataclass(self.encoder) or not isinstance(getattr(self.encoder, "family", None), str):
            raise ValueError(f"invalid SAMConfig: encoder must be an encoder family's config, got {self.encoder!r}")
        if not isinstance(self.decoder, DecoderConfig):
            raise ValueError(f"invalid SAMConfig: decoder must be a DecoderConfig, got {self.decoder!r}")
        patch = self.encoder.patch_size
        check_config(
            self,
            lambda: [(self.image_size % patch == 0, f"image_size {self.image_size} is not a multiple of {patch}")],
            {"image_size": (patch, 16384)},
        )

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for the official models)."""
        return self.image_size // self.encoder.patch_size

    @property
    def mask_input_size(self) -> int:
        """Side of the low-resolution masks (256 for the official models)."""
        return 4 * self.embedding_size

    def to_dict(self) -> dict[str, Any]:
        return {
            "encoder": {"family": self.encoder.family, **asdict(self.encoder)},
            "decoder": asdict(self.decoder),
            "image_size": self.image_size,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SAMConfig":
        """The inverse of `to_dict`; also reads the flat layout of files written before configs were nested."""
        if not isinstance(values, dict):
            raise ValueError(f"a configuration is a JSON object, got {type(values).__name__}")
        values = dict(values)
        if "encoder" not in values:
            values = _nested(values)
        encoder, decoder = values.pop("encoder"), values.pop("decoder", {})
        for what, section in (("encoder", encoder), ("decoder", decoder)):
            if not isinstance(section, dict):
                raise ValueError(f"the {what} configuration is a JSON object, got {section!r}")
        encoder, decoder = dict(encoder), dict(decoder)
        family = family_named(encoder.pop("family", None))
        kind, decoder_kind = family.config, family.decoder_config or DecoderConfig
        _check_fields(cls, values, "SAMConfig")
        _check_fields(kind, encoder, kind.__name__)
        _check_fields(decoder_kind, decoder, decoder_kind.__name__)
        tuples = {k: tuple(v) for k, v in encoder.items() if isinstance(v, list)}  # JSON has lists, not tuples
        return cls(encoder=kind(**{**encoder, **tuples}), decoder=decoder_kind(**decoder), **values)


def _check_fields(kind: type, values: dict[str, Any], what: str) -> None:
    unknown = sorted(set(values) - {f.name for f in fields(kind)})
    if unknown:
        raise ValueError(f"unknown {what} fields: {unknown}")


_FLAT_DECODER = {
    "prompt_dim": "prompt_dim",
    "mask_in_channels": "mask_in_channels",
    "decoder_depth": "depth",
    "decoder_heads": "heads",
    "decoder_mlp_dim": "mlp_dim",
    "num_multimask_outputs": "num_multimask_outputs",
    "iou_head_depth": "iou_head_depth",
    "iou_head_hidden_dim": "iou_head_hidden_dim",
}
_FLAT_DEFAULT_FAMILY = "vit"  # finesam 0.1 wrote no `encoder_type` for its ViTs


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """The flat configuration of finesam 0.1 files (`encoder_type` plus the encoders' fields) as nested values;
    each family that existed then reads its own fields (`EncoderFamily.from_flat`)."""
    name = flat.pop("encoder_type", _FLAT_DEFAULT_FAMILY)
    family = family_named(name)
    if family.from_flat is None:
        raise ValueError(f"the {name} family did not exist in finesam 0.1: a flat configuration cannot name it")
    decoder = {new: flat.pop(old) for old, new in _FLAT_DECODER.items() if old in flat}
    encoder = {"family": name, **family.from_flat(flat)}
    for key in {k for f in families().values() for k in f.legacy_keys}:
        flat.pop(key, None)  # the fields of the other families: 0.1 wrote them all
    return {**flat, "encoder": encoder, "decoder": decoder}


SAM_VIT_B = SAMConfig(name="vit_b")
SAM_VIT_L = SAMConfig(ViTConfig(dim=1024, depth=24, heads=16, global_attention_blocks=(5, 11, 17, 23)), name="vit_l")
SAM_VIT_H = SAMConfig(ViTConfig(dim=1280, depth=32, heads=16, global_attention_blocks=(7, 15, 23, 31)), name="vit_h")
# MobileSAM and Light HQ-SAM (`vit_t` / `vit_tiny`): TinyViT-5M at 1024, the same prompt encoder and decoder
SAM_VIT_TINY = SAMConfig(TinyViTConfig(), name="vit_tiny")


def preset_name(config: SAMConfig) -> str:
    """The official name (`vit_b`, `vit_l`, `vit_h`, `vit_tiny`, ...: `PRESETS`) of a configuration, or `custom`.
    Its own name first: releases with the same image model (SAM 2 and SAM 2.1) keep theirs."""
    if config.name in PRESETS and PRESETS[config.name] == config:
        return config.name
    return next((name for name, preset in PRESETS.items() if preset == config), "custom")


def describe(config: SAMConfig) -> str:
    """One line for people: `SAM vit_b (ViT 768x12, input 1024)`."""
    return f"SAM {preset_name(config)} ({config.encoder.describe()}, input {config.image_size})"


__all__ = [
    "PRESETS",
    "SAM_VIT_B",
    "SAM_VIT_H",
    "SAM_VIT_L",
    "SAM_VIT_TINY",
    "DecoderConfig",
    "EncoderConfig",
    "SAMConfig",
    "TinyViTConfig",
    "ViTConfig",
    "ViTShape",
    "check_config",
    "describe",
    "preset_name",
]
