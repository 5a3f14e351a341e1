"""`LayerNorm2d` with a single-pass forward."""

import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor


class LayerNorm2d(fl.LayerNorm2d):
    """Refiners' `LayerNorm2d` (same name, parameters and keys), normalising over channels in one fused
    `layer_norm` call on the channels-last view instead of six elementwise passes over the whole map.

    The output has channels-last strides, which the convolutions that follow it in SAM read at no cost.
    """

    def forward(self, x: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch channels height width"]:
        channels_last = x.permute(0, 2, 3, 1)
        return F.layer_norm(channels_last, (x.shape[1],), self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
