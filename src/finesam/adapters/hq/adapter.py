"""`HQSAMAdapter`: HQ-SAM injected into a frozen `SegmentAnything`, and ejected again, without editing it."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

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


class HQFeatures(fl.Chain, Adapter[MaskDecoder]):
    """Before the mask decoder, fuses the early encoder embedding with the image embedding into `hq_sam.hq_features`.

    Done in the decoder stage (as in the official model) so that the fusion trains on a frozen, cached encoder.
    """

    def __init__(self, target: MaskDecoder, fusion: HQFeatureFusion) -> None:
        with self.setup_adapter(target):
            super().__init__(fl.Passthrough(CachedHQFeatures(fusion), fl.SetContext(CONTEXT, "hq_features")), target)


class HQOutputToken(fl.Concatenate, Adapter[OutputTokens]):
    """Appends the HQ token to SAM's output tokens."""

    def __init__(self, target: OutputTokens, token: HQToken) -> None:
        with self.setup_adapter(target):
            super().__init__(target, token, dim=1)


class UpscaledEmbeddingCapture(fl.Chain, Adapter[UpscaledImageEmbedding]):
    """Keeps SAM's upscaled mask features in `hq_sam.upscaled_embedding` for the HQ mask head."""

    def __init__(self, target: UpscaledImageEmbedding) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.SetContext(CONTEXT, "upscaled_embedding"))


class HQMaskHead(fl.Concatenate, Adapter[MaskHead]):
    """SAM's mask logits followed by the HQ mask logits."""

    def __init__(self, target: MaskHead, prediction: HQMaskPrediction) -> None:
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
    if model.find(HQMaskSelection) is not None:
        raise ValueError("this model already has an HQ-SAM adapter injected: eject it first")


class HQSAMAdapter(fl.Chain, Adapter[SegmentAnything]):
    """HQ-SAM as an adapter of a `SegmentAnything` of any size.

    Its children are the HQ parts (token, token MLP, feature fusion, mask features), so `state_dict()`,
    `parameters()` and `.to()` concern only the adapter's weights. `inject()` places them in the target
    through small adapters around the base modules; `eject()` restores the base exactly.

    With `hq_mask_only=False` the output is SAM's mask plus the HQ mask, with `True` the HQ mask alone
    (official `hq_token_only`); it can be changed while injected. With `multimask_output=True`, SAM's mask is
    the best of its three by predicted IoU, as in the official package. HQ-SAM outputs one mask per prompt.

    `early_layer` (for variants) is the encoder layer whose output is fused; by default the official one.
    """

    def __init__(
        self,
        target: SegmentAnything,
        hq_mask_only: bool = False,
        device: Device | str | None = None,
        dtype: DType | None = None,
        early_layer: fl.Module | None = None,
    ) -> None:
        _ensure_no_hq(target)
        if not isinstance(target.mask_decoder, MaskDecoder):
            raise ValueError(
                f"HQ-SAM adapts SAM's mask decoder; this {type(target).__name__} has a "
                f"{type(target.mask_decoder).__name__} (HQ-SAM 2 is its own adapter)"
            )
        config = target.config
        device = target.device if device is None else device
        dtype = target.mask_decoder.dtype if dtype is None else dtype  # the HQ parts run with the decoder
        dim = config.decoder.prompt_dim
        token, token_mlp = HQToken(dim, device=device, dtype=dtype), HQTokenMLP(dim, device=device, dtype=dtype)
        fusion = HQFeatureFusion(config.encoder.early_embedding_dim, dim, device=device, dtype=dtype)
        mask_features = HQMaskFeatures(dim, device=device, dtype=dtype)
        self._rule = [HQOutputRule(hq_mask_only)]
        self._adapters: list[Adapter[Any]] = [
            EarlyEmbedding(target.image_encoder.early_embedding_layer if early_layer is None else early_layer),
            HQFeatures(target.ensure_find(MaskDecoder), fusion),
            HQOutputToken(target.ensure_find(OutputTokens), token),
            UpscaledEmbeddingCapture(target.ensure_find(UpscaledImageEmbedding)),
            HQMaskHead(
                target.ensure_find(MaskHead),
                HQMaskPrediction(token_mlp, mask_features, config.decoder.num_output_tokens),
            ),
            HQMaskSelection(target.ensure_find(MultimaskSelection), self._rule[0]),
        ]
        parts: list[fl.Module] = [token, token_mlp, fusion.ensure_find(EmbeddingEncoder)]
        parts += [fusion.ensure_find(CompressEarlyFeatures), mask_features]
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
        raise TypeError("HQSAMAdapter is not called directly: inject() it and call the SegmentAnything model")

    def inject(self, parent: fl.Chain | None = None) -> "HQSAMAdapter":
        """Places the HQ parts in the target model; overrides refiners' `Adapter.inject`, which would put this
        chain in place of the whole model.

        Injects its small adapters instead (the early-feature capture in the encoder, the feature fusion, the
        HQ token, the upscaled-embedding capture, the HQ mask head and the output rule), each around one base
        module, and declares the `hq_sam` context and the `image` context's early-embedding key. The weights
        are checked to be on the device and in the dtype of the mask decoder first.

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
        if self.injected:
            raise RuntimeError("this HQSAMAdapter is already injected")
        _ensure_no_hq(self.target)
        decoder = next(self.target.mask_decoder.parameters())
        check_placement("HQSAMAdapter", ((weight, decoder, "mask decoder") for weight in self.parameters()))
        for adapter in self._adapters:
            adapter.inject(self.target)  # searched from the root: leaf targets (OutputTokens) have no parent link
        self.target.set_context(CONTEXT, dict.fromkeys(CONTEXT_KEYS))
        # in place: the `image` dict is shared by the whole tree (and SetContext ignores an empty context)
        self.target.use_context("image").setdefault(EARLY_EMBEDDING, None)
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
            raise RuntimeError("this HQSAMAdapter is not injected")
        for adapter in reversed(self._adapters):
            adapter.eject()
        _drop_context(self.target, CONTEXT)
        for key in IMAGE_KEYS:
            _drop_context(self.target, "image", key)
        self.injected = False


@contextmanager
def hq_mask_only_set_to(model: SegmentAnything, hq_mask_only: bool) -> Iterator[None]:
    """Sets the output of the HQ-SAM adapter injected in `model` for the block (the HQ mask alone, or SAM's
    mask plus the HQ mask), then restores it.

    Raises:
        ValueError: no HQ-SAM adapter is injected in `model`.
    """
    rule = model.find(HQOutputRule)
    if rule is None:
        raise ValueError("hq_mask_only needs the HQ-SAM adapter injected in the model")
    before, rule.hq_mask_only = rule.hq_mask_only, hq_mask_only
    try:
        yield
    finally:
        rule.hq_mask_only = before
