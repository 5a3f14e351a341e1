"""The fast versions of TinyViT's layers: the BatchNorm folded into the convolution, the window attention written
out in 16-bit floats. Same formulas as `Conv2dBN` and `BiasedAttention` up to float rounding
(tests/test_tiny_vit.py)."""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.fast.layers import writes_attention_out
from finesam.fast.swap import fast_version_of, swapped_by_type
from finesam.model.tiny_vit import BatchNorm2d
from finesam.model.tiny_vit import BiasedAttention as ReferenceBiasedAttention
from finesam.model.tiny_vit import Conv2dBN as ReferenceConv2dBN


def fold_batch_norm(weight: Tensor, bias: Tensor | None, norm: BatchNorm2d) -> tuple[Tensor, Tensor]:
    """A convolution's `weight` and `bias` with the eval-mode `norm` after it folded in (its running statistics),
    computed in `weight`'s dtype. Every fast path that folds a BatchNorm (TinyViT, RepViT, EfficientViT) uses it."""
    mean, var = norm.running_mean, norm.running_var
    assert mean is not None and var is not None
    dtype = weight.dtype
    scale = norm.weight.to(dtype) * torch.rsqrt(var.to(dtype) + norm.eps)
    shift = norm.bias.to(dtype) - mean.to(dtype) * scale
    weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    return weight, shift if bias is None else shift + bias * scale


@swapped_by_type()
@fast_version_of(ReferenceConv2dBN)
class Conv2dBN(ReferenceConv2dBN):
    """In eval mode BatchNorm is a fixed affine map per channel: folded into the convolution (one pass), at
    inference."""

    def forward(self, *inputs: Tensor) -> Float[Tensor, "batch out_channels height width"]:
        conv, norm = self
        if torch.is_grad_enabled() or type(conv) is not fl.Conv2d or type(norm) is not BatchNorm2d or norm.training:
            return super().forward(*inputs)  # an adapter in place of a layer, or batch statistics: as written
        if norm.running_mean is None or norm.running_var is None:
            return super().forward(*inputs)
        weight, shift = fold_batch_norm(conv.weight, None, norm)
        return F.conv2d(inputs[0], weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


@swapped_by_type()
@fast_version_of(ReferenceBiasedAttention)
class BiasedAttention(ReferenceBiasedAttention):
    """In 16-bit floats on the CPU at inference (`writes_attention_out`): the bias plus the scaled product in
    one `baddbmm`, the softmax in place, the product with the values."""

    def forward(self, qkv: Float[Tensor, "batch tokens 3*inner"]) -> Float[Tensor, "batch tokens inner"]:
        if torch.is_grad_enabled() or not writes_attention_out(qkv):
            return super().forward(qkv)
        batch, tokens, _ = qkv.shape
        q, k, v = qkv.view(batch, tokens, self.num_heads, -1).transpose(1, 2).split(self.key_dim, dim=3)
        bias = self.attention_biases[:, self.get_buffer("attention_bias_idxs")].to(q.dtype)  # (heads, tokens, tokens)
        rows = batch * self.num_heads
        scores = torch.baddbmm(
            bias.expand(batch, -1, -1, -1).reshape(rows, tokens, tokens),
            q.reshape(rows, tokens, -1),
            k.transpose(-1, -2).reshape(rows, -1, tokens),
            alpha=self.key_dim**-0.5,
        )
        out = torch.bmm(torch.softmax(scores, -1, out=scores), v.reshape(rows, tokens, -1))
        return out.view(batch, self.num_heads, tokens, -1).transpose(1, 2).reshape(batch, tokens, -1)
