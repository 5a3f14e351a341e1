"""The fast version of a layer every part of the model uses: GELU through the dense view of channels-last maps,
in place where the swap found it safe. Same formula as refiners' `GeLU` (tests/test_parity_model.py)."""

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.fast.swap import fast_version_of


@fast_version_of(fl.GeLU)
class GeLU(fl.GeLU):
    """GELU through the dense (B, H, W, C) view of a channels-last map (torch's CPU kernel runs about twice as
    slow on a channels-last tensor as on the same memory seen as contiguous), and at inference, where the swap
    found it safe (`in_place`: its input is a fresh output of the layer before it, read by nothing else), over
    its input instead of a new tensor: a fresh output of tens of MB costs more in page faults than the GELU.
    With gradients, the reference formula.

    Set by the swap: `in_place`.
    """

    in_place: bool

    def forward(self, x: Float[Tensor, "..."]) -> Float[Tensor, "..."]:
        if torch.is_grad_enabled():
            return super().forward(x)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return self.forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.in_place and self.approximation == fl.GeLUApproximation.NONE:
            return torch.ops.aten.gelu_(x)
        return super().forward(x)
