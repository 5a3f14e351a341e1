"""The registry of image-encoder families: what every family declares, and the one place they are looked up.

A family is its config (a frozen dataclass with a `family` name), its encoder chain (an `EncoderChain`), its
presets and its LoRA target presets. It registers itself with `register_family` in its own module under
`finesam.model.families`, which the package imports once (the registration line). Its checkpoint layout lives
in `finesam.weights.layouts.<family name>` (the weights layer reads files; this one does not). Nothing outside
a family's own files switches on its types or names: configs, `SegmentAnything`, conversion, loading, LoRA and
the CLI go through `family_of` / `family_named` / `families`.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar, cast

from refiners.fluxion import layers as fl
from torch import device as Device
from torch import dtype as DType

if TYPE_CHECKING:
    from finesam.model.config import SAMConfig

# LoRA target presets every family resolves to its own layer classes (the decoder ones are the same everywhere)
ENCODER_LORA_TARGETS = ("encoder_attention", "encoder")


class EncoderConfig(Protocol):
    """What the config of every family provides (a frozen dataclass; `SAMConfig.encoder` is one)."""

    family: ClassVar[str]  # the registered name, written into files
    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def patch_size(self) -> int:
        """Input pixels per embedding cell along each side (the embedding is S / patch_size wide)."""
        ...

    @property
    def early_embedding_dim(self) -> int:
        """Channels of the early feature map HQ-SAM fuses (`EncoderChain.early_embedding_layer`'s output)."""
        ...

    def describe(self) -> str:
        """A few words for people, e.g. `ViT 768x12`."""
        ...


C = TypeVar("C", bound=EncoderConfig)


class EncoderChain(fl.Chain, Generic[C]):
    """The contract of every family's image encoder.

    Built as `cls(config, image_size, out_dim, device=None, dtype=None)`, it maps a normalised, padded image
    (B, 3, S, S) to the image embedding (B, out_dim, S / p, S / p), p = `config.patch_size`. Subclasses set
    `self.config` and name the layer whose output HQ-SAM fuses (`early_embedding_layer`, channels-last,
    `early_embedding_dim` channels); `rebuild_buffers` recomputes what checkpoints do not store.
    """

    config: C

    @property
    def early_embedding_layer(self) -> fl.Module:
        """The layer whose output HQ-SAM fuses with the final embedding (a (B, S/p, S/p, C) map)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its early embedding layer")

    @property
    def early_embedding_dim(self) -> int:
        """Channels of `early_embedding_layer`'s output."""
        return self.config.early_embedding_dim

    def rebuild_buffers(self, device: Device | str | None = None) -> None:
        """Recomputes the non-persistent buffers after weights were assigned to a model built on `meta`
        (checkpoints do not store them). Nothing by default."""
        del device


@dataclass(frozen=True)
class EncoderFamily:
    """One registered encoder family.

    Attributes:
        name: the name written into files (`SAMConfig.to_dict()["encoder"]["family"]`); equals `config.family`.
        title: the family in a few words for people (`finesam models`).
        config: its config class.
        encoder: its encoder chain, built as the `EncoderChain` contract says.
        presets: the official releases, each a `SAMConfig` with the official name.
        lora_targets: for each name of `ENCODER_LORA_TARGETS`, the ancestor class names of the linear layers
            it adapts (see `finesam.adapters.lora`).
        from_flat: reads this family's fields from the flat configuration of finesam 0.1 files, if it existed
            then; `legacy_keys` are every flat key it owns (dropped when another family is read).
        model: the model chain class of a family that brings its own decoder and processing (SAM 2's
            `SegmentAnything2`, a subclass of `SegmentAnything`); None for `SegmentAnything`.
        decoder_config: that model's decoder config class (a subclass of `DecoderConfig`); None for
            `DecoderConfig`.
    """

    name: str
    title: str
    config: type[Any]
    encoder: type[EncoderChain[Any]]
    presets: tuple["SAMConfig", ...]
    lora_targets: Mapping[str, tuple[str, ...]]
    from_flat: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    legacy_keys: frozenset[str] = field(default_factory=frozenset)
    model: type[Any] | None = None
    decoder_config: type[Any] | None = None

    def build(
        self,
        config: EncoderConfig,
        image_size: int,
        out_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> EncoderChain[Any]:
        """The encoder chain for `config` (a config of this family)."""
        if type(config) is not self.config:
            raise ValueError(f"the {self.name} family builds from a {self.config.__name__}, got {config!r}")
        # the constructor the contract states (a class's own __init__ signature is not part of its type; every
        # family is built this way in tests/test_families.py)
        build = cast(Callable[..., EncoderChain[Any]], self.encoder)
        return build(config, image_size, out_dim, device=device, dtype=dtype)


_FAMILIES: dict[str, EncoderFamily] = {}


def register_family(family: EncoderFamily) -> EncoderFamily:
    """Adds a family to the registry (called once, by the family's own module).

    Raises:
        ValueError: the name, config class or a preset name is taken, or the family is inconsistent.
    """
    problems = []
    if family.name in _FAMILIES:
        problems.append(f"the name {family.name!r} is registered already")
    if getattr(family.config, "family", None) != family.name:
        problems.append(f"{family.config.__name__}.family must be {family.name!r}")
    if any(other.config is family.config for other in _FAMILIES.values()):
        problems.append(f"{family.config.__name__} belongs to another family")
    if sorted(family.lora_targets) != sorted(ENCODER_LORA_TARGETS):
        problems.append(f"lora_targets must name exactly {list(ENCODER_LORA_TARGETS)}")
    taken = {preset.name for other in _FAMILIES.values() for preset in other.presets}
    problems += [f"preset {p.name!r} exists already" for p in family.presets if p.name in taken]
    name = family.config.__name__
    problems += [f"preset {p.name!r} is not a {name}" for p in family.presets if type(p.encoder) is not family.config]
    if problems:
        raise ValueError(f"cannot register encoder family {family.name!r}: " + "; ".join(problems))
    _FAMILIES[family.name] = family
    return family


def families() -> Mapping[str, EncoderFamily]:
    """Every registered family by name, in registration order (read-only)."""
    return MappingProxyType(_FAMILIES)


def family_named(name: object) -> EncoderFamily:
    """The family registered as `name`.

    Raises:
        ValueError: no such family (the message lists the registered ones).
    """
    if not isinstance(name, str) or name not in _FAMILIES:
        raise ValueError(f"unknown encoder family {name!r} (one of {', '.join(_FAMILIES)})")
    return _FAMILIES[name]


def family_of(config: object) -> EncoderFamily:
    """The family whose config class `config` is (exactly: a subclass is not its parent's family).

    Raises:
        ValueError: `config` is not the config of a registered family.
    """
    for family in _FAMILIES.values():
        if type(config) is family.config:
            return family
    known = ", ".join(f.config.__name__ for f in _FAMILIES.values())
    raise ValueError(f"the encoder config must be one of the registered families' ({known}), got {config!r}")


class _Presets(Mapping[str, "SAMConfig"]):
    """Every family's presets by name, read from the registry at each access (families register on import)."""

    def _all(self) -> dict[str, "SAMConfig"]:
        return {preset.name: preset for family in _FAMILIES.values() for preset in family.presets}

    def __getitem__(self, name: str) -> "SAMConfig":
        return self._all()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())

    def __repr__(self) -> str:
        return f"PRESETS({list(self)})"


PRESETS: Mapping[str, "SAMConfig"] = _Presets()
