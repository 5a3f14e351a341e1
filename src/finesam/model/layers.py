"""Small leaf layers shared by the model's chains: refiners' `GeLU` and `LayerNorm2d` on faster paths."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor


class GeLU(fl.GeLU):
    """Refiners' `GeLU` (same name and approximation), applied to a channels-last map through its dense
    (B, H, W, C) view: on the CPU, torch's GELU kernel runs about twice as slow on a channels-last tensor as on
    the same memory seen as contiguous. Same values; the output keeps the input's layout.
    """

    def forward(self, x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return super().forward(x)


class LayerNorm2d(fl.LayerNorm2d):
    """Refiners' `LayerNorm2d` (same name, parameters and keys), normalising over channels in one fused
    `layer_norm` call on the channels-last view instead of six elementwise passes over the whole map.

    The output has channels-last strides, which the convolutions that follow it in SAM read at no cost.
    """

    def forward(self, x: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch channels height width"]:
        channels_last = x.permute(0, 2, 3, 1)
        # the channel count from the weight, not the input: a constant for the ONNX exporter's tracer
        channels = (self.weight.shape[0],)
        return F.layer_norm(channels_last, channels, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)
