"""The fast versions of EfficientViT-SAM's layers (`finesam.model.efficientvit.encoder`), same formulas up to float
rounding (tests/test_efficientvit.py):

- `Pointwise` (a linear layer over channels, between two permutes): one 1x1 convolution on the channels-first
  map, without the two copies;
- `LiteMLA`: its q/k/v projection the same way, and the BatchNorm after its output projection folded into it;
- `EfficientViTEncoder`: its input in channels-last memory, oneDNN's own layout for convolutions on the CPU
  (every map after it stays so; the values are the same).

The convolutions with BatchNorm (`Conv2dBN`) are folded by TinyViT's fast version, which they share. With
gradients, or where an adapter replaced a layer (a LoRA on a projection), the reference formula.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.fast.swap import fast_version_of, swapped_by_type
from finesam.model.efficientvit.encoder import EfficientViTEncoder as ReferenceEncoder
from finesam.model.efficientvit.encoder import LiteMLA as ReferenceLiteMLA
from finesam.model.efficientvit.encoder import Pointwise as ReferencePointwise
from finesam.model.tiny_vit import BatchNorm2d


def _linear(layer: fl.Module) -> fl.Linear | None:
    """The plain linear layer of a `Pointwise` (None where an adapter took its place)."""
    if not isinstance(layer, ReferencePointwise):
        return None
    linear = layer[1]
    return linear if type(linear) is fl.Linear else None


@swapped_by_type()
@fast_version_of(ReferencePointwise)
class Pointwise(ReferencePointwise):
    """The linear layer as a 1x1 convolution on the channels-first map."""

    def forward(self, *inputs: Tensor) -> Float[Tensor, "batch out height width"]:
        linear = _linear(self)
        if torch.is_grad_enabled() or linear is None:
            return super().forward(*inputs)
        return F.conv2d(inputs[0], linear.weight[:, :, None, None], linear.bias)


@swapped_by_type()
@fast_version_of(ReferenceLiteMLA)
class LiteMLA(ReferenceLiteMLA):
    """The q/k/v projection as a 1x1 convolution; the output projection and its BatchNorm as one."""

    def forward(self, *inputs: Tensor) -> Float[Tensor, "batch channels height width"]:
        qkv, aggregation, attention, projection, norm = self
        qkv_linear, out_linear = _linear(qkv), _linear(projection)
        plain = type(norm) is BatchNorm2d and not norm.training and norm.running_var is not None
        if torch.is_grad_enabled() or qkv_linear is None or out_linear is None or not plain:
            return super().forward(*inputs)
        assert isinstance(norm, BatchNorm2d) and norm.running_mean is not None and norm.running_var is not None
        x = F.conv2d(inputs[0], qkv_linear.weight[:, :, None, None], qkv_linear.bias)
        x = attention(aggregation(x))
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        bias = norm.running_mean if out_linear.bias is None else norm.running_mean - out_linear.bias
        shift = norm.bias - bias * scale
        return F.conv2d(x, (out_linear.weight * scale[:, None])[:, :, None, None], shift)


@swapped_by_type()
@fast_version_of(ReferenceEncoder)
class EfficientViTEncoder(ReferenceEncoder):
    """The input in channels-last memory at inference: the convolutions run in oneDNN's native layout."""

    def forward(self, *inputs: Tensor) -> Float[Tensor, "batch dim grid grid"]:
        if torch.is_grad_enabled() or inputs[0].device.type != "cpu":
            return super().forward(*inputs)
        return super().forward(inputs[0].contiguous(memory_format=torch.channels_last))
