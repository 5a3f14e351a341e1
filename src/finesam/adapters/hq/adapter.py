"""`HQSAMAdapter`: HQ-SAM injected into a frozen `SegmentAnything`, and ejected again, without editing it; `HQAdapter`,
what it shares with HQ-SAM 2's adapter (`finesam.adapters.hq.sam2`)."""

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import Adapter
from torch import device as Device
from torch import dtype as DType

from finesam.adapters.hq.layers import (
    CONTEXT,
    CONTEXT_KEYS,
    EARLY_EMBEDDING,
    IMAGE_KEYS,
    CachedHQFeatures,
    CompressEarlyFeatures,
    EmbeddingEncoder,
    HQFeatureFusion,
    HQMaskFeatures,
    HQMaskPrediction,
    HQOutputRule,
    HQRule,
    HQToken,
    HQTokenMLP,
)
from finesam.adapters.placement import check_placement
from finesam.model.mask_decoder import MaskDecoder, MaskHead, MultimaskSelection, OutputTokens, UpscaledImageEmbedding
from finesam.model.sam import SegmentAnything


class EarlyEmbedding(fl.Chain, Adapter[fl.Module]):
    """Keeps the early encoder output (first global ViT block, or TinyViT stage 1) as `early_embedding`."""

    def __init__(self, target: fl.Module) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.SetContext("image", EARLY_EMBEDDING))


class HQFeatures(fl.Chain, Adapter[fl.Chain]):
    """Before the mask decoder, fuses the early encoder embedding with the image embedding into `hq_sam.hq_features`.

    Done in the decoder stage (as in the official model) so that the fusion trains on a frozen, cached encoder.
    """

    def __init__(self, target: fl.Chain, fusion: HQFeatureFusion) -> None:
        with self.setup_adapter(target):
            super().__init__(fl.Passthrough(CachedHQFeatures(fusion), fl.SetContext(CONTEXT, "hq_features")), target)


class HQOutputToken(fl.Concatenate, Adapter[OutputTokens]):
    """Appends the HQ token to SAM's output tokens."""

    def __init__(self, target: OutputTokens, token: HQToken) -> None:
        with self.setup_adapter(target):
            super().__init__(target, token, dim=1)


class UpscaledEmbeddingCapture(fl.Chain, Adapter[fl.Chain]):
    """Keeps SAM's upscaled mask features in `hq_sam.upscaled_embedding` for the HQ mask head (SAM's
    `UpscaledImageEmbedding`, SAM 2's `UpscaledWithSkips`)."""

    def __init__(self, target: fl.Chain) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.SetContext(CONTEXT, "upscaled_embedding"))


class HQMaskHead(fl.Concatenate, Adapter[fl.Chain]):
    """SAM's mask logits followed by the HQ mask logits (around SAM's `MaskHead`, or SAM 2's `SAM2MaskHead`)."""

    def __init__(self, target: fl.Chain, prediction: fl.Chain) -> None:
        with self.setup_adapter(target):
            super().__init__(target, prediction, dim=1)


class HQMaskSelection(fl.Chain, Adapter[MultimaskSelection]):
    """Replaces SAM's multimask selection by the HQ-SAM output rule."""

    def __init__(self, target: MultimaskSelection, rule: HQOutputRule) -> None:
        with self.setup_adapter(target):
            super().__init__(rule)


def _drop_context(model: fl.Chain, name: str, key: str | None = None) -> None:
    """Removes a context (or one key of it) from every provider of the tree."""
    for chain in [model, *(m for m in model.modules() if isinstance(m, fl.Chain))]:
        contexts = chain.provider.contexts
        if key is None:
            contexts.pop(name, None)
        elif name in contexts:
            contexts[name].pop(key, None)


def _ensure_no_hq(model: SegmentAnything) -> None:
    if model.find(HQRule) is not None:  # the output rule of either generation
        raise ValueError("this model already has an HQ-SAM adapter injected: eject it first")


@dataclass(frozen=True)
class SharedParts:
    """The HQ parts both generations build first (new weights), and the device and dtype they were made on."""

    token: HQToken
    token_mlp: HQTokenMLP
    device: Device | str | None
    dtype: DType | None


class HQAdapter(fl.Chain, Adapter[SegmentAnything]):
    """What the HQ-SAM adapters of both generations share: the HQ parts as children (so `state_dict()`,
    `parameters()` and `.to()` concern only them), small adapters placed around base modules by `inject()` and
    taken out by `eject()`, the contexts they declare, and the `hq_mask_only` switch.

    A subclass builds, in its `__init__`, `self._rule` (a one-element list holding its `HQRule`) and
    `self._adapters` (the small adapters, in injection order), then calls `self._hold(target, parts)`.

    Attributes:
        context_keys: the keys of the `hq_sam` context its parts write while the decoder runs.
        declared_image_keys: the keys of the `image` context it declares on `inject()`.
        image_keys: the keys of the `image` context it drops on `eject()` (declared and cached ones).
        official_prefix: the module prefix of its keys in the official checkpoints (`mask_decoder`,
            `sam_mask_decoder`).
    """

    context_keys: ClassVar[tuple[str, ...]] = CONTEXT_KEYS
    declared_image_keys: ClassVar[tuple[str, ...]] = (EARLY_EMBEDDING,)
    image_keys: ClassVar[tuple[str, ...]] = IMAGE_KEYS
    official_prefix: ClassVar[str] = "mask_decoder"
    _rule: list[HQRule]
    _adapters: Sequence[Adapter[Any]]
    injected: bool

    def __init__(
        self,
        target: SegmentAnything,
        hq_mask_only: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        """The constructor every generation has (`hq_adapter_for` calls it); this base builds nothing."""
        raise TypeError("HQAdapter is the shared base: build an HQSAMAdapter or an HQSAM2Adapter (hq_adapter_for)")

    @staticmethod
    def _shared_parts(
        target: SegmentAnything,
        decoder: type[fl.Chain],
        refusal: tuple[str, str],
        device: Device | str | None,
        dtype: DType | None,
    ) -> "SharedParts":
        """Checks that `target` has no HQ adapter and has the mask decoder this generation adapts (else a
        `ValueError`: `refusal` is what it adapts and what to use instead), then builds the HQ token and its MLP,
        which both generations have first, on the target's device and in its decoder's dtype unless told
        otherwise. (Each generation then builds its other parts, in the order that gives a seed its weights.)"""
        _ensure_no_hq(target)
        if not isinstance(target.mask_decoder, decoder):
            adapts, instead = refusal
            has = f"this {type(target).__name__} has a {type(target.mask_decoder).__name__}"
            raise ValueError(f"{adapts}; {has} ({instead})")
        device = target.device if device is None else device
        dtype = target.mask_decoder.dtype if dtype is None else dtype  # the HQ parts run with the decoder
        dim = target.config.decoder.prompt_dim
        return SharedParts(
            HQToken(dim, device=device, dtype=dtype), HQTokenMLP(dim, device=device, dtype=dtype), device, dtype
        )

    def _hold(self, target: SegmentAnything, parts: list[fl.Module]) -> None:
        """Makes `parts` (the HQ modules with weights) this chain's children, for `target`, not injected."""
        with self.setup_adapter(target), ExitStack() as stack:
            # the parts stay children of the small adapters (their parent) and are listed here for their weights
            for part in parts:
                if isinstance(part, fl.ContextModule):
                    stack.enter_context(part.no_parent_refresh())
            super().__init__(*parts)
        self.injected = False

    @property
    def placed_adapters(self) -> list[fl.Chain]:
        """The small adapters that `inject` places around modules of the base model; they hold the HQ parts
        in the places where they run (e.g. `HQMaskPrediction` in `HQMaskHead`)."""
        return [adapter for adapter in self._adapters if isinstance(adapter, fl.Chain)]

    @property
    def hq_mask_only(self) -> bool:
        """The output rule: True, the HQ mask alone (official `hq_token_only`); False, SAM's mask plus the HQ
        mask. It may be changed while injected (see also `hq_mask_only_set_to`)."""
        return self._rule[0].hq_mask_only

    @hq_mask_only.setter
    def hq_mask_only(self, value: bool) -> None:
        self._rule[0].hq_mask_only = value

    def forward(self, *_: Any) -> Any:
        raise TypeError(f"{type(self).__name__} is not called directly: inject() it and call the SegmentAnything model")

    def inject(self, parent: fl.Chain | None = None) -> "HQAdapter":
        """Places the HQ parts in the target model; overrides refiners' `Adapter.inject`, which would put this
        chain in place of the whole model.

        Injects its small adapters instead, each around one base module, and declares the `hq_sam` context (and
        the `image` context's keys it needs). The weights are checked to be on the device and in the dtype of
        the mask decoder first.

        Args:
            parent: unused (the places are found from the model given at construction); kept for the signature
                of `Adapter.inject`.

        Returns:
            The adapter itself, injected.

        Raises:
            RuntimeError: this adapter is already injected.
            ValueError: the model already has an HQ-SAM adapter, or the weights are on another device / in
                another dtype than the mask decoder.
        """
        name = type(self).__name__
        if self.injected:
            raise RuntimeError(f"this {name} is already injected")
        _ensure_no_hq(self.target)
        decoder = next(self.target.mask_decoder.parameters())
        check_placement(name, ((weight, decoder, "mask decoder") for weight in self.parameters()))
        for adapter in self._adapters:
            adapter.inject(self.target)  # searched from the root: leaf targets (OutputTokens) have no parent link
        self.target.set_context(CONTEXT, dict.fromkeys(self.context_keys))
        # in place: the `image` dict is shared by the whole tree (and SetContext ignores an empty context)
        image = self.target.use_context("image")
        for key in self.declared_image_keys:
            image.setdefault(key, None)
        self.injected = True
        return self

    def eject(self) -> None:
        """Takes the HQ parts out again, in reverse order, and drops the contexts `inject()` declared; overrides
        refiners' `Adapter.eject`. The base's structure, `state_dict` and outputs are those before `inject()`;
        the HQ weights are kept, so the adapter can be injected again.

        Raises:
            RuntimeError: this adapter is not injected.
        """
        if not self.injected:
            raise RuntimeError(f"this {type(self).__name__} is not injected")
        for adapter in reversed(self._adapters):
            adapter.eject()
        _drop_context(self.target, CONTEXT)
        for key in self.image_keys:
            _drop_context(self.target, "image", key)
        self.injected = False


class HQSAMAdapter(HQAdapter):
    """HQ-SAM as an adapter of a `SegmentAnything` of any size.

    Its children are the HQ parts (token, token MLP, feature fusion, mask features), so `state_dict()`,
    `parameters()` and `.to()` concern only the adapter's weights. `inject()` places them in the target
    through small adapters around the base modules; `eject()` restores the base exactly.

    With `hq_mask_only=False` the output is SAM's mask plus the HQ mask, with `True` the HQ mask alone
    (official `hq_token_only`); it can be changed while injected. With `multimask_output=True`, SAM's mask is
    the best of its three by predicted IoU, as in the official package. HQ-SAM outputs one mask per prompt.

    `early_layer` (for variants) is the encoder layer whose output is fused; by default the official one.

    A decoder variant whose parts play the same roles (EfficientSAM's) has its adapter as a subclass naming its
    classes: `decoder` (the mask decoder it adapts), `upscaling` (whose output the HQ mask head refines) and
    `mask_head` (after which the HQ mask is appended).
    """

    decoder: ClassVar[type[fl.Chain]] = MaskDecoder
    upscaling: ClassVar[type[fl.Chain]] = UpscaledImageEmbedding
    mask_head: ClassVar[type[fl.Chain]] = MaskHead
    refusal: ClassVar[tuple[str, str]] = (
        "HQ-SAM adapts SAM's mask decoder",
        "HQ-SAM 2 is its own adapter: HQSAM2Adapter, or hq_adapter_for",
    )

    def __init__(
        self,
        target: SegmentAnything,
        hq_mask_only: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
        early_layer: fl.Module | None = None,
    ) -> None:
        shared = self._shared_parts(target, self.decoder, self.refusal, device, dtype)
        token, token_mlp, device, dtype = shared.token, shared.token_mlp, shared.device, shared.dtype
        config = target.config
        dim = config.decoder.prompt_dim
        fusion = HQFeatureFusion(config.encoder.early_embedding_dim, dim, device=device, dtype=dtype)
        mask_features = HQMaskFeatures(dim, device=device, dtype=dtype)
        rule = HQOutputRule(hq_mask_only)
        self._rule = [rule]
        self._adapters = [
            EarlyEmbedding(target.image_encoder.early_embedding_layer if early_layer is None else early_layer),
            HQFeatures(target.ensure_find(self.decoder), fusion),
            HQOutputToken(target.ensure_find(OutputTokens), token),
            UpscaledEmbeddingCapture(target.ensure_find(self.upscaling)),
            HQMaskHead(
                target.ensure_find(self.mask_head),
                HQMaskPrediction(token_mlp, mask_features, config.decoder.num_output_tokens),
            ),
            HQMaskSelection(target.ensure_find(MultimaskSelection), rule),
        ]
        parts: list[fl.Module] = [token, token_mlp, fusion.ensure_find(EmbeddingEncoder)]
        parts += [fusion.ensure_find(CompressEarlyFeatures), mask_features]
        self._hold(target, parts)


@contextmanager
def hq_mask_only_set_to(model: SegmentAnything, hq_mask_only: bool) -> Iterator[None]:
    """Sets the output of the HQ-SAM adapter injected in `model` for the block (the HQ mask alone, or SAM's
    mask plus the HQ mask), then restores it.

    Raises:
        ValueError: no HQ-SAM adapter is injected in `model`.
    """
    rule = model.find(HQRule)
    if rule is None:
        raise ValueError("hq_mask_only needs the HQ-SAM adapter injected in the model")
    before, rule.hq_mask_only = rule.hq_mask_only, hq_mask_only
    try:
        yield
    finally:
        rule.hq_mask_only = before
