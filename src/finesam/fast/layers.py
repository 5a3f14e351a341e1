"""The fast versions of layers every part of the model uses: GELU through the dense view of channels-last maps,
in place where the swap found it safe (same formula as refiners' `GeLU`, tests/test_parity_model.py); and
`linear`, a linear layer (and GELU) in one oneDNN call in float32 and bfloat16 (tests/test_encoder_attention.py)."""

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


# oneDNN's linear layer with a fused bias and activation, as torch's own compiled CPU code calls it
_ONE_DNN_LINEAR = hasattr(torch.ops.mkldnn, "_linear_pointwise")


def one_dnn_inference(x: Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether a fast layer may run `x` through oneDNN's fused kernels: inference on the CPU, in one of
    `dtypes`, with oneDNN available and enabled."""
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in dtypes
        and torch.backends.mkldnn.is_available()
        and bool(torch.backends.mkldnn.enabled)
    )


# float32 too: MKL's float32 products ran at 205 GFLOP/s on an AMD EPYC (Zen 5) where oneDNN's ran at 368
ONE_DNN_DTYPES = (torch.float32, torch.bfloat16)


def one_dnn_applies(x: Tensor) -> bool:
    """Whether `linear` runs a plain linear layer on `x` through oneDNN: float32 or bfloat16, at inference, not
    compiling (the compiler makes its own fusions)."""
    return _ONE_DNN_LINEAR and one_dnn_inference(x, ONE_DNN_DTYPES) and not torch.compiler.is_compiling()


def linear(layer: torch.nn.Module, x: Float[Tensor, "... inputs"], gelu: bool = False) -> Float[Tensor, "... outputs"]:
    """`layer(x)` (then the exact GELU, with `gelu`), as one oneDNN call where `layer` is a plain `fl.Linear`
    and `one_dnn_applies(x)`: torch's bfloat16 linear copies the bias into its output before the product, and
    GELU is another pass over it. Any other layer (an adapter around the linear) is called as it is."""
    if type(layer) is fl.Linear and one_dnn_applies(x):
        activation, algorithm = ("gelu", "none") if gelu else ("none", "")  # "none": GELU's erf form
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, activation, [], algorithm)
    out = layer(x)
    return torch.nn.functional.gelu(out) if gelu else out


def writes_attention_out(q: Tensor) -> bool:
    """Whether a fast attention over `q` writes its products and softmax out rather than calling torch's
    attention kernel: in 16-bit floats on the CPU, where that kernel computes at float32 speed while the 16-bit
    batched products run 3-4x faster (no AMX; docs/performance.md); not on a GPU, not while compiling (the
    written-out attention works in place)."""
    return q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu" and not torch.compiler.is_compiling()
