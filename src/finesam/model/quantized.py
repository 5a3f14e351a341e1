"""int8 inference for the image encoder's linear layers: weights quantised once, activations at each call.

The linear layers (attention projections and MLPs) hold most of the encoder's multiply-adds. On CPUs without
native bf16 matrix units, torch's quantised engine multiplies int8 by int8 with 32-bit sums faster than fp32
(figures in docs/performance.md); on CPUs with AMX, bf16 is the faster mode. Weights are quantised
per output channel (symmetric, int8); activations per tensor at each call (dynamic quantisation), so no
calibration data is needed. Convolutions, norms and attention stay in float32.
"""

import warnings

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import Adapter
from torch import Tensor
from torch.ao.nn.quantized import dynamic as quantized_dynamic


class DynamicInt8Linear(fl.Module):
    """A frozen `fl.Linear` whose product runs in int8: per-channel int8 weights, activations quantised per
    call; the bias stays float32. Inference only (no gradients, CPU only)."""

    def __init__(self, linear: fl.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float().cpu()
        scales = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        with warnings.catch_warnings():
            # torch marks quantised-tensor creation as deprecated; its quantised CPU kernels are the only int8
            # matrix products faster than fp32 in torch 2.13 (torch._int_mm has no fast CPU kernel)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(
                weight, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8
            )
            self.quantized = quantized_dynamic.Linear(self.in_features, self.out_features, dtype=torch.qint8)
            bias = None if linear.bias is None else linear.bias.detach().float().cpu()
            self.quantized.set_weight_bias(qweight, bias)

    def forward(self, x: Float[Tensor, "*batch in_features"]) -> Float[Tensor, "*batch out_features"]:
        return self.quantized(x.float()).to(x.dtype)


def quantize_linears(chain: fl.Chain) -> int:
    """Replaces every `fl.Linear` of `chain` by a `DynamicInt8Linear`, in place, also inside adapters that wrap
    larger parts (HQ-SAM's capture of a block); an adapter around a linear layer itself (LoRA) is refused.

    Returns:
        The number of layers replaced.
    """
    for module in chain.modules():
        if isinstance(module, Adapter) and isinstance(getattr(module, "target", None), fl.Linear):
            raise ValueError(f"int8 cannot quantise a linear layer wrapped by {type(module).__name__} (e.g. LoRA)")
    found = list(chain.walk(fl.Linear))
    for linear, parent in found:
        parent.replace(linear, DynamicInt8Linear(linear))
    return len(found)
