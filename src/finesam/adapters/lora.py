"""LoRA on Segment Anything: named low-rank adapters on chosen linear layers, built on refiners' `LoraAdapter`.

A `SAMLoraAdapter` holds one named LoRA (rank, scale) for every selected `fl.Linear` of the base model.
Layers are selected by the class names of their ancestors (`include` / `exclude`), and named by their path in
the base model with every adapter looked through, so names (and saved files) are the same whether the HQ
adapter or other LoRAs are injected or not, and in whichever order.
"""

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import Adapter, LinearLora, LoraAdapter
from torch import Tensor

from finesam.adapters.placement import check_placement
from finesam.model.registry import ENCODER_LORA_TARGETS, families
from finesam.model.sam import SegmentAnything
from finesam.text import check_name, listing

# Where LoRA goes, by ancestor class names. The default adapts the two-way transformer of the mask decoder
# (token self-attention, both cross-attentions, token MLP): cheap, and it trains on cached image embeddings.
# The encoder presets are each registered family's own (`EncoderFamily.lora_targets`): `encoder_attention` the
# attention projections, `encoder` every encoder linear. Their union is listed here: a family's class names
# occur only in its own encoder, so on any model the union selects exactly that family's layers.
_MODELS = (SegmentAnything, *(f.model for f in families().values() if f.model))
TARGETS: dict[str, tuple[str, ...]] = {
    # the two-way transformer of every model class (SAM's, a variant's own)
    "decoder": tuple(dict.fromkeys(m.transformer_class.__name__ for m in _MODELS)),
    # also the mask hypernetworks and the IoU head: the decoder chain of every model class (SAM's, a family's own)
    "decoder_all": tuple(dict.fromkeys(m.decoder_class.__name__ for m in _MODELS)),
    **{
        name: tuple(dict.fromkeys(c for family in families().values() for c in family.lora_targets[name]))
        for name in ENCODER_LORA_TARGETS
    },
}


@dataclass(frozen=True)
class BaseLinear:
    """A linear layer of the base model, with a path that no adapter changes."""

    path: str
    layer: fl.Linear
    ancestors: tuple[str, ...]  # class names from the model down to the layer's parent
    holder: fl.Chain  # the chain that holds the layer now: its base parent, or a `LoraAdapter` around it


def _unwrap(module: fl.Module, parent: fl.Chain) -> tuple[fl.Module, fl.Chain]:
    """The base module behind `module` (a child of `parent`), and the chain that directly holds it."""
    while isinstance(module, Adapter):
        assert isinstance(module, fl.Chain)
        module, parent = module.target, module
    return module, parent


def base_linears(model: SegmentAnything) -> Iterator[BaseLinear]:
    """Every `fl.Linear` of the base model (not of adapters), in order, named like refiners names children."""

    def visit(chain: fl.Chain, prefix: str, ancestors: tuple[str, ...]) -> Iterator[BaseLinear]:
        children = [_unwrap(child, chain) for child in chain]
        counts = Counter(type(child).__name__ for child, _ in children)
        seen: Counter[str] = Counter()
        for child, holder in children:
            kind = type(child).__name__
            seen[kind] += 1
            name = kind if counts[kind] == 1 else f"{kind}_{seen[kind]}"
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, fl.Linear):
                yield BaseLinear(path, child, ancestors, holder)
            elif isinstance(child, fl.Chain):
                yield from visit(child, path, (*ancestors, kind))

    yield from visit(model, "", ())


def select_linears(
    model: SegmentAnything, include: Sequence[str] = TARGETS["decoder"], exclude: Sequence[str] = ()
) -> list[BaseLinear]:
    """The base linears with an ancestor named in `include` and none named in `exclude`."""
    return [
        linear
        for linear in base_linears(model)
        if any(a in include for a in linear.ancestors) and not any(a in exclude for a in linear.ancestors)
    ]


class SAMLoraAdapter(fl.Chain, Adapter[SegmentAnything]):
    """One named LoRA on a set of linear layers of a `SegmentAnything`.

    Its children are the LoRA layers, so `state_dict()` / `parameters()` are the LoRA weights alone. The up
    projections start at zero: a new adapter leaves outputs unchanged until trained. Several adapters with
    different names can be injected at once (they share refiners' `LoraAdapter` where they hit the same
    layer), with the HQ adapter, in any order (finesam's commands inject HQ-SAM first: `finesam.adapters.order`);
    `eject()` restores the base exactly.

    Lifecycle: build it on a loaded model (nothing changes yet), `inject()` it, run the model, `eject()` it;
    it can be injected again, and saved (`finesam.weights.save_lora`) at any point.

    Args:
        target: the model whose linear layers it adapts.
        name: names the LoRA (in files, evaluation rows, and where several LoRAs share a layer).
        rank: the inner dimension of each LoRA.
        scale: the factor of each LoRA's output.
        include: names of chains (`TARGETS` lists the usual sets) whose linear layers are adapted.
        exclude: names of chains whose linear layers are left alone.
        paths: the exact target paths instead of `include` / `exclude` (as a LoRA file lists them).

    Raises:
        ValueError: a bad name or rank, a path not in the model, or no linear layer selected.
    """

    def __init__(
        self,
        target: SegmentAnything,
        name: str = "lora",
        rank: int = 16,
        scale: float = 1.0,
        include: Sequence[str] = TARGETS["decoder"],
        exclude: Sequence[str] = (),
        paths: Sequence[str] | None = None,
    ) -> None:
        check_name(name, "a LoRA")  # it names files and evaluation rows
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if paths is None:
            linears = select_linears(target, include, exclude)
        else:
            by_path = {linear.path: linear for linear in base_linears(target)}
            missing = [p for p in paths if p not in by_path]
            if missing:
                raise ValueError(f"LoRA targets not found in this model: {listing(missing, 5)}")
            linears = [by_path[p] for p in paths]
        if not linears:
            raise ValueError(f"no linear layer matches include={list(include)} exclude={list(exclude)}")
        self.name, self.rank, self.include, self.exclude = name, rank, tuple(include), tuple(exclude)
        self.paths = [linear.path for linear in linears]
        loras = [
            LinearLora(
                name,
                in_features=layer.in_features,
                out_features=layer.out_features,
                rank=rank,
                scale=scale,
                device=layer.weight.device,
                dtype=layer.weight.dtype,
            )
            for layer in (linear.layer for linear in linears)
        ]
        # the LoRA layers keep no parent link: they are children here (for their weights) and in a `LoraAdapter`
        with self.setup_adapter(target), ExitStack() as stack:
            for lora in loras:
                stack.enter_context(lora.no_parent_refresh())
            super().__init__(*loras)
        self.injected = False

    @property
    def loras(self) -> list[LinearLora]:
        """The LoRA layers, one per target linear layer, in the order of `paths`."""
        return [lora for lora in self if isinstance(lora, LinearLora)]

    @property
    def scale(self) -> float:
        """The factor of every LoRA layer's output (`up(down(x)) * scale`); it may be changed while injected."""
        return self.loras[0].scale

    @scale.setter
    def scale(self, value: float) -> None:
        for lora in self.loras:
            lora.scale = value

    def forward(self, *_: Any) -> Any:
        raise TypeError("SAMLoraAdapter is not called directly: inject() it and call the SegmentAnything model")

    def inject(self, parent: fl.Chain | None = None) -> "SAMLoraAdapter":
        """Adds this LoRA to its target linear layers; overrides refiners' `Adapter.inject`, which would put the
        adapter in place of the whole model.

        Each target gets refiners' `LoraAdapter` around it, or, where another LoRA (of another name) already
        holds that layer, this one joins it. The weights are checked to be on the device and in the dtype of
        the layers first (`finesam.adapters.placement`).

        Args:
            parent: unused (the targets are found from the model given at construction); kept for the signature
                of `Adapter.inject`.

        Returns:
            The adapter itself, injected.

        Raises:
            RuntimeError: this adapter is already injected.
            ValueError: a LoRA with this name is already injected in the model, or the weights are on another
                device / in another dtype than the layers.
        """
        if self.injected:
            raise RuntimeError(f"LoRA '{self.name}' is already injected")
        holders = self._holders()
        if any(isinstance(h, LoraAdapter) and self.name in h.names for h, _ in holders):
            raise ValueError(f"a LoRA named '{self.name}' is already injected in this model: eject it first")
        targets = zip(holders, self.loras, self.paths, strict=True)
        joins = ((w, layer.weight, f"layer {path}") for (_, layer), lora, path in targets for w in lora.parameters())
        check_placement(f"LoRA '{self.name}'", joins)
        for (holder, layer), lora in zip(holders, self.loras, strict=True):
            with lora.no_parent_refresh():
                if isinstance(holder, LoraAdapter):
                    holder.add_lora(lora)
                else:
                    LoraAdapter(layer, lora).inject(holder)
        self.injected = True
        return self

    def eject(self) -> None:
        """Removes this LoRA from its target layers, wherever other adapters have moved them since; overrides
        refiners' `Adapter.eject`. A `LoraAdapter` left with no other LoRA is ejected too, so the base's
        structure, `state_dict` and outputs are those before `inject()`. The LoRA weights are kept: the adapter
        can be injected again.

        Raises:
            RuntimeError: this adapter is not injected.
        """
        if not self.injected:
            raise RuntimeError(f"LoRA '{self.name}' is not injected")
        for (holder, _), lora in zip(self._holders(), self.loras, strict=True):
            assert isinstance(holder, LoraAdapter)
            with lora.no_parent_refresh():
                if holder.names == [self.name]:
                    holder.eject()
                else:
                    holder.remove_lora(self.name)
        self.injected = False

    def _holders(self) -> list[tuple[fl.Chain, fl.Linear]]:
        """For each target, where it is held now (other adapters may have been injected since)."""
        by_path = {linear.path: linear for linear in base_linears(self.target)}
        return [(by_path[p].holder, by_path[p].layer) for p in self.paths]

    def lora_weights(self) -> dict[str, Any]:
        """The weights keyed by target path, as LoRA files store them (`finesam.weights.lora`).

        Returns:
            `{path}.down.weight` and `{path}.up.weight` for each target path.
        """
        weights: dict[str, Any] = {}
        for path, lora in zip(self.paths, self.loras, strict=True):
            weights[f"{path}.down.weight"] = lora.down.weight
            weights[f"{path}.up.weight"] = lora.up.weight
        return weights


def merged_weight(adapter: LoraAdapter) -> Tensor:
    """The weight of the linear layer a `LoraAdapter` adapts, with every LoRA of it folded in.

    Raises:
        ValueError: the adapter holds something else than a linear layer and linear LoRAs.
    """
    linear = adapter.target
    if not isinstance(linear, fl.Linear):
        raise ValueError(f"{adapter.get_path()} adapts a {type(linear).__name__}, not a linear layer")
    weight = linear.weight.detach().clone()
    for lora in adapter.lora_layers:
        if not isinstance(lora, LinearLora):
            raise ValueError(f"{adapter.get_path()} holds a {type(lora).__name__}, not a linear LoRA")
        weight += lora.scale * (lora.up.weight @ lora.down.weight)
    return weight
