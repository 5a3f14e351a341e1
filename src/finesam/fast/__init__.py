"""The fast paths: an explicit, reversible swap of model layers for versions that compute the same formulas
faster at inference.

The chains of `finesam.model` and `finesam.adapters` compute the formulas of the paper and the official code;
training, export and any tracer see them. `apply_fast_paths` gives chosen layers the class of a fast version
(see `finesam.fast.swap`: same object, same name, same weights); `remove_fast_paths` takes them back;
`reference_paths` does both around a block. Each fast layer falls back to its reference formula with gradients
enabled, or where an adapter sits in a place its shortcut relies on. Loading for inference (`load_sam`, the
command line, the server) applies the swap; `tests/test_fast_paths.py` holds each fast layer equal to its
reference. Where a fast layer keeps something computed once per image, it is in the `image` context, so in
the `ImageEmbedding`'s features.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from refiners.fluxion import layers as fl

# the modules that declare fast versions; those swapped by type register themselves (`swapped_by_type`)
from finesam.fast import decoder, efficientvit, hiera, hq, layers, rep_vit, tiny_vit, vit  # noqa: F401
from finesam.fast.swap import fast_version_by_type, is_fast, reference_class, restore, settings, swap
from finesam.model.transformer import ImageToTokenAttention, TokenToImageAttention, TwoWayTransformer

__all__ = ["apply_fast_paths", "has_fast_paths", "reference_paths", "remove_fast_paths"]

Site = tuple[torch.nn.Module, type, dict[str, Any]]


def _makes_fresh_tensor(module: fl.Module) -> bool:
    """Whether `module` returns a tensor of its own: a weighted layer (linear, convolution, norm; not a bare
    parameter), a residual sum, or a sequence ending in one."""
    if isinstance(module, fl.WeightedModule) and not isinstance(module, fl.Parameter):
        return True
    if isinstance(module, fl.Residual):
        return True  # x + f(x)
    return isinstance(module, fl.Chain) and _sequential(module) and len(module) > 0 and _makes_fresh_tensor(module[-1])


def _sequential(chain: fl.Chain) -> bool:
    """Whether `chain` feeds each child the output of the one before (and nothing else reads it)."""
    return type(chain).forward is fl.Chain.forward or type(chain).forward is fl.Residual.forward


def _gelu_sites(root: torch.nn.Module) -> Iterator[Site]:
    for chain in [m for m in root.modules() if isinstance(m, fl.Chain)]:
        children = list(chain)
        for i, child in enumerate(children):
            if type(child) is fl.GeLU:
                in_place = i > 0 and _sequential(chain) and _makes_fresh_tensor(children[i - 1])
                yield child, layers.GeLU, {"in_place": in_place}


def _decoder_sites(root: torch.nn.Module) -> Iterator[Site]:
    for t, transformer in enumerate(m for m in root.modules() if isinstance(m, TwoWayTransformer)):
        to_image = [m for m in transformer.modules() if isinstance(m, TokenToImageAttention)]
        to_tokens = [m for m in transformer.modules() if isinstance(m, ImageToTokenAttention)]
        for i, layer in enumerate(to_image):
            attention = layer.ensure_find(fl.Attention)
            if i == 0:  # the first block: keys and values read the image alone
                memory = f"decoder_{t}.block_0.token_to_image"
                yield attention[0], decoder.Distribute, {"image_side": (1, 2), "memory_key": memory}
            else:
                yield attention, decoder.FewQueriesAttention, {}
        for i, layer in enumerate(to_tokens):
            attention = layer.ensure_find(fl.Attention)
            yield attention, decoder.FewKeysAttention, {}
            if i == 0:  # the first block: queries read the image alone
                memory = f"decoder_{t}.block_0.image_to_token"
                yield attention[0], decoder.Distribute, {"image_side": (0,), "memory_key": memory}


def _sites(root: torch.nn.Module) -> Iterator[Site]:
    yield from _decoder_sites(root)
    yield from _gelu_sites(root)
    for module in root.modules():
        if (by_type := fast_version_by_type(module)) is not None:
            fast, settings = by_type
            yield module, fast, dict(settings)


def apply_fast_paths(*roots: torch.nn.Module) -> int:
    """Swaps every layer of `roots` (a model, with whatever adapters are injected; or an adapter not injected
    yet) that has a fast version for it. Layers already fast, and layers of other classes (an adapter's, a
    variant's subclass), are left as they are.

    Args:
        roots: the modules whose layers are swapped.

    Returns:
        How many layers were swapped.
    """
    swapped = 0
    for root in roots:
        # the sites are listed before any swap: a swapped layer is no longer of its reference class
        for module, fast, attributes in list(_sites(root)):
            if type(module) is reference_class(fast):  # not a subclass (a variant), not already fast
                swapped += swap(module, fast, **attributes)
    return swapped


def remove_fast_paths(*roots: torch.nn.Module) -> int:
    """Gives every fast layer of `roots` its reference class back, exactly as it was before the swap.

    Returns:
        How many layers were restored.
    """
    return sum(restore(module) for root in roots for module in list(root.modules()))


def has_fast_paths(root: torch.nn.Module) -> bool:
    """Whether any layer of `root` runs a fast version."""
    return any(is_fast(module) for module in root.modules())


@contextmanager
def reference_paths(*roots: torch.nn.Module) -> Iterator[None]:
    """Within the block every layer of `roots` computes its reference formula (for export, tracing or
    training); afterwards the layers that were fast are fast again, with the same settings."""
    swapped = [
        (module, type(module), settings(module)) for root in roots for module in root.modules() if is_fast(module)
    ]
    for module, _, _ in swapped:
        restore(module)
    try:
        yield
    finally:
        for module, fast, attributes in swapped:
            if not is_fast(module):
                swap(module, fast, **attributes)
