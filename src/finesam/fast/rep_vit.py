"""The fast version of RepViT's `RepVGGDW` (EdgeSAM's encoder): at inference its three branches, the depthwise
3x3 and 1x1 convolutions with their BatchNorms and the identity, are one depthwise 3x3 convolution (RepVGG's
re-parameterisation). Same formula as the reference up to float rounding (tests/test_edge_sam.py)."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.fast.swap import fast_version_of, swapped_by_type
from finesam.fast.tiny_vit import fold_batch_norm
from finesam.model.rep_vit import RepVGGDW as ReferenceRepVGGDW
from finesam.model.tiny_vit import BatchNorm2d, Conv2dBN


def _folded(unit: fl.Module) -> tuple[Tensor, Tensor] | None:
    """The convolution weight and bias of a `Conv2dBN` with its BatchNorm (eval mode) folded in, or None where
    the unit is not exactly a convolution and a BatchNorm with running statistics (an adapter in its place)."""
    if not isinstance(unit, Conv2dBN) or len(unit) != 2:
        return None
    conv, norm = unit
    if type(conv) is not fl.Conv2d or type(norm) is not BatchNorm2d or norm.training:
        return None
    if norm.running_mean is None or norm.running_var is None:
        return None
    return fold_batch_norm(conv.weight, None, norm)


@swapped_by_type()
@fast_version_of(ReferenceRepVGGDW)
class RepVGGDW(ReferenceRepVGGDW):
    """At inference, one depthwise 3x3 convolution: the 3x3 kernel, plus the 1x1 kernel at its centre, plus 1 at
    its centre (the identity), each BatchNorm folded into its kernel."""

    def forward(self, *inputs: Tensor) -> Float[Tensor, "batch channels height width"]:
        if torch.is_grad_enabled() or len(self) != 3 or type(self[2]) is not fl.Identity:
            return super().forward(*inputs)
        three, one = _folded(self[0]), _folded(self[1])
        if three is None or one is None or three[0].shape[-1] != 3 or one[0].shape[-1] != 1:
            return super().forward(*inputs)
        weight = three[0] + F.pad(one[0], [1, 1, 1, 1])
        weight[:, :, 1, 1] += 1.0  # the identity: each channel's own value, at the kernel's centre
        x = inputs[0]
        return F.conv2d(x, weight.to(x.dtype), (three[1] + one[1]).to(x.dtype), 1, 1, 1, weight.shape[0])
