"""The fast version of HQ-SAM's mask head: the HQ token's dot product folded into the last convolution of the
mask features, computed in bands of rows. Same formula as `HQMaskPrediction` up to float rounding
(tests/test_fast_paths.py)."""

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.adapters.hq.layers import CONTEXT, HQMaskFeatures
from finesam.adapters.hq.layers import HQMaskPrediction as ReferenceHQMaskPrediction
from finesam.fast.swap import fast_version_of, swapped_by_type


def _as_built(hidden: list[fl.Module], projection: fl.Module) -> bool:
    """Whether the mask features are the layers `HQMaskFeatures` builds (a 3x3 convolution with padding 1, a
    norm, a GELU, then a linear convolution): what banding and folding rely on."""
    kinds = [type(layer).__name__ for layer in hidden]  # the GELU may run its fast version
    first = hidden[0] if hidden else None
    local = isinstance(first, fl.Conv2d) and first.kernel_size == (3, 3) and first.padding == (1, 1)
    linear = type(projection) is fl.Conv2d and projection.bias is not None
    return kinds == ["Conv2d", "LayerNorm2d", "GeLU"] and type(first) is fl.Conv2d and local and linear


@swapped_by_type(band_rows=64)
@fast_version_of(ReferenceHQMaskPrediction)
class HQMaskPrediction(ReferenceHQMaskPrediction):
    """w . (mask_features(u) + f) for the HQ token weights w, SAM's upscaled features u and the HQ features f
    (HQ-SAM 2: no f), with the dot product folded into the last (linear) convolution of the mask features: per
    prompt, the 3x3 convolution to D / 8 channels followed by a dot product becomes one 3x3 convolution to a single
    channel, computed as nine 1x1 taps summed at their offsets. A fraction of the work and no (B, D / 8, 4E, 4E)
    intermediate.

    The hidden features are computed `band_rows` rows at a time (reading one input row more on each side) in the
    channels-last layout SAM's upscaling produces: the per-prompt temporaries then stay a few MB, which on the CPU
    keeps them in cache and out of the page-faulting path of large allocations. Only the nine tap maps (zero
    outside the image, the projection's padding) are kept whole.

    At inference, with the mask features' layers as built; otherwise (gradients, an adapter on one of them) the
    reference formula. Set by the swap: `band_rows`.
    """

    band_rows: int

    def forward(self, *args: Tensor) -> Float[Tensor, "batch 1 height width"]:
        *hidden, projection = self.ensure_find(HQMaskFeatures)
        if torch.is_grad_enabled() or not _as_built(hidden, projection):
            return super().forward(*args)
        token_branch = self.ensure_find(fl.Parallel)[0]
        weights = token_branch(*args)  # (B, 1, D/8)
        context = self.use_context(CONTEXT)
        upscaled = context["upscaled_embedding"]  # (B, D/8, H, W) the decoder's upscaled features
        batch, _, height, width = upscaled.shape
        # (B, D/8) x (D/8, C, 3, 3) -> (B, C, 9): per prompt, one C-vector per kernel offset; padded with zero
        # columns to 16, a width the CPU's matrix product handles several times faster than 9
        taps_weight = torch.einsum("bo,ockl->bckl", weights[:, 0], projection.weight).flatten(2)
        taps_weight = torch.nn.functional.pad(taps_weight, (0, 16 - 9))
        # taps[b, k, 1 + y, 1 + x] = taps_weight[b, :, k] . hidden features at (y, x); zero outside the image,
        # as the projection's padding
        taps = upscaled.new_zeros(batch, 9, height + 2, width + 2)
        for top in range(0, height, self.band_rows):
            bottom = min(top + self.band_rows, height)
            # one input row more on each side inside the image; the convolution pads the image's own borders
            first, last = max(top - 1, 0), min(bottom + 1, height)
            band_features = upscaled[:, :, first:last]
            for layer in hidden:  # 3x3 convolution (padding 1), LayerNorm2d, GELU
                band_features = layer(band_features)
            band_features = band_features[:, :, top - first : bottom - first].permute(0, 2, 3, 1)  # (B, rows, W, C)
            band = band_features.reshape(batch, -1, band_features.shape[-1]) @ taps_weight  # (B, rows * W, 16)
            band = band.view(batch, bottom - top, width, 16)[..., :9]
            taps[:, :, top + 1 : bottom + 1, 1:-1] = band.permute(0, 3, 1, 2)
        product = sum(taps[:, 3 * dy + dx, dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))
        bias = weights[:, 0] @ projection.bias  # (B,)
        masks = (product + bias[:, None, None])[:, None]
        if not self.fused:
            return masks
        hq_features = context["hq_features"]  # (B or 1, D/8, H, W)
        return (weights @ hq_features.flatten(2)).unflatten(-1, (height, width)) + masks  # + (B, 1, H, W)
