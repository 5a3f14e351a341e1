"""Checkpoint layouts of the encoder families: how an official checkpoint of each family is laid out.

The layout of the family registered as NAME (`finesam.model.registry`) is the `LAYOUT` of the module
`finesam.weights.layouts.NAME`: no second registration. A layout says how to recognise an official
`state_dict` of its family, how to read its encoder config off the tensor shapes, which official prefix fills
which encoder module (plus any rule that reshapes or combines tensors), which keys it does not use, how to
name a pickled whole model of its code, and which files the download catalogue offers. The decoder and prompt
encoder keys are the same in every SAM-1-style checkpoint (`finesam.weights.sam_keys`).
"""

import importlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import SAMConfig
from finesam.model.image_encoder import Neck
from finesam.model.registry import EncoderChain, EncoderConfig, families, family_named
from finesam.weights.io import CheckpointError, PickledObjectError, load_official_state_dict
from finesam.weights.key_map import Rule

# the finesam key of one tensor of a module: `key(module, "weight")`
KeyOf = Callable[[torch.nn.Module, str], str]


@dataclass(frozen=True)
class Checkpoint:
    """An official file of the download catalogue."""

    name: str
    url: str
    size: int | None  # bytes, where published
    sha256: str | None  # where published
    description: str
    hub_repo: str | None = None  # a Hugging Face Hub repository: size and SHA-256 come from its LFS metadata
    preset: str | None = None  # the preset (`PRESETS`) whose weights it holds
    file: str | None = None  # the file name, where the URL does not end with it (a download link with a query)
    licence: str = "Apache-2.0"  # the weights' licence, as their publisher states it (shown by `finesam models`)
    decoder: bool = False  # a decoder alone (MobileSAMv2's): converted with an encoder (`convert ENC --decoder FILE`)

    @property
    def filename(self) -> str:
        return self.file or self.url.rsplit("/", 1)[-1]


def _no_rules(encoder: EncoderChain[Any], key: KeyOf) -> dict[str, Rule]:
    return {}


def _no_hint(global_name: str) -> str | None:
    return None


@dataclass(frozen=True)
class CheckpointLayout:
    """The official checkpoint layout of one encoder family.

    Attributes:
        family: the registered family name.
        recognises: whether an official `state_dict` holds an image encoder of this family.
        infer_encoder: its encoder config and input size, from the tensor shapes (raises `CheckpointError`).
        modules: (official module prefix, finesam module) pairs whose tensors have the same names and shapes.
        rules: the encoder tensors that are not one-to-one (e.g. the ViT's position embedding without its
            batch dimension), keyed by finesam key.
        unused: official keys the model never uses (TinyViT's ImageNet classifier), dropped with a note.
        whole_model_hint: for a pickled whole model (refused) whose first class is `global_name`, a sentence
            that says which file to use instead, when it is this family's.
        checkpoints: the official files of the download catalogue.
        priority: layouts are asked highest first: a family that refines another (a pruned ViT is also a ViT)
            comes before it.
        infer_config: the whole configuration from the shapes, for a family whose checkpoints do not have
            SAM 1's prompt encoder and decoder keys (SAM 2); None reads those the SAM 1 way.
        model_rules: the whole model's key map for such a family (`modules` and `rules` then serve it alone).
        kept: unused keys that a converted file keeps all the same, as they are (SAM 2's video memory, which a
            later model reads: `finesam.weights.loading.read_kept`).
    """

    family: str
    recognises: Callable[[Mapping[str, Tensor]], bool]
    infer_encoder: Callable[[Mapping[str, Tensor]], tuple[EncoderConfig, int]]
    modules: Callable[[EncoderChain[Any]], list[tuple[str, fl.Module]]]
    rules: Callable[[EncoderChain[Any], KeyOf], dict[str, Rule]] = _no_rules
    unused: Callable[[str], bool] = lambda _: False
    whole_model_hint: Callable[[str], str | None] = _no_hint
    checkpoints: tuple[Checkpoint, ...] = ()
    priority: int = 0
    infer_config: Callable[[Mapping[str, Tensor]], SAMConfig] | None = None
    model_rules: Callable[[Any, KeyOf], dict[str, Rule]] | None = None
    kept: Callable[[str], bool] = lambda _: False


def layout_of(family: str) -> CheckpointLayout:
    """The checkpoint layout of the registered family `family`.

    Raises:
        ValueError: no such family, or its layout module is missing or names another family.
    """
    family_named(family)
    try:
        module = importlib.import_module(f"{__name__}.{family}")
    except ModuleNotFoundError as e:
        raise ValueError(f"encoder family {family!r} has no checkpoint layout ({__name__}.{family})") from e
    layout = getattr(module, "LAYOUT", None)
    if not isinstance(layout, CheckpointLayout) or layout.family != family:
        raise ValueError(f"{module.__name__}.LAYOUT must be the CheckpointLayout of {family!r}")
    return layout


def layouts() -> list[CheckpointLayout]:
    """Every registered family's layout, in registration order."""
    return [layout_of(name) for name in families()]


def layout_for(state_dict: Mapping[str, Tensor]) -> CheckpointLayout:
    """The layout of the family whose image encoder an official `state_dict` holds.

    Raises:
        CheckpointError: no registered family recognises it.
    """
    for layout in sorted(layouts(), key=lambda layout: -layout.priority):
        if layout.recognises(state_dict):
            return layout
    raise CheckpointError(
        "not a SAM checkpoint: no registered encoder family recognises its image_encoder keys "
        f"(families: {', '.join(families())})"
    )


def shape_of(state_dict: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    """The shape of `state_dict[key]`.

    Raises:
        CheckpointError: the key is missing.
    """
    if key not in state_dict:
        raise CheckpointError(f"not a SAM checkpoint: key {key!r} is missing")
    return tuple(state_dict[key].shape)


def count(state_dict: Mapping[str, Tensor], pattern: str) -> int:
    """1 + the largest index that the first group of `pattern` matches in the keys (0 when none does)."""
    indices = {int(m.group(1)) for key in state_dict if (m := re.fullmatch(pattern, key))}
    return max(indices) + 1 if indices else 0


def neck_modules(encoder: EncoderChain[Any]) -> list[tuple[str, fl.Module]]:
    """SAM's neck (`image_encoder.neck.{0,1,2,3}`), shared by the families that end with it."""
    neck = encoder.ensure_find(Neck)
    return [(f"image_encoder.neck.{i}", layer) for i, layer in enumerate(list(neck)[1:])]  # after the Permute


def read_plain_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of an official checkpoint (`io.load_official_state_dict`); a pickled whole model is refused
    with the file to use instead when a registered family knows its code.

    Raises:
        CheckpointError: the file is unreadable or holds more than plain weights.
    """
    try:
        return load_official_state_dict(path)
    except PickledObjectError as e:
        hints = [hint for layout in layouts() if e.global_name and (hint := layout.whole_model_hint(e.global_name))]
        if not hints:
            raise
        message = f"{path}: a whole pickled model, refused (finesam reads plain weights only); {hints[0]}"
        raise CheckpointError(message) from None
