"""Small leaf layers shared by the model's chains, and what identifies the current values of weights."""

from typing import Any

import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor


class LayerNorm2d(fl.LayerNorm2d):
    """Refiners' `LayerNorm2d` (same name, parameters and keys): the normalisation over channels written as
    one `layer_norm` over the channels-last view, the formula of the official `LayerNorm2d`.

    The output has channels-last strides, which the convolutions that follow it in SAM read at no cost.
    """

    def forward(self, x: Float[Tensor, "batch channels height width"]) -> Float[Tensor, "batch channels height width"]:
        channels_last = x.permute(0, 2, 3, 1)
        # the channel count from the weight, not the input: a constant for the ONNX exporter's tracer
        channels = (self.weight.shape[0],)
        return F.layer_norm(channels_last, channels, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def tensor_version(tensor: Tensor) -> int:
    """In-place modification counter; inference tensors (created under `torch.inference_mode`) have none."""
    return -1 if tensor.is_inference() else tensor._version


def weights_key(weights: tuple[Tensor, ...]) -> tuple[tuple[Any, ...], ...]:
    """What identifies the current values of weights for a memory of their outputs: each tensor's identity,
    storage, dtype, device and in-place version (keep the tensors referenced, so their ids stay theirs)."""
    return tuple((id(w), w.data_ptr(), w.dtype, w.device, tensor_version(w)) for w in weights)


class ImageFeature(fl.UseContext):
    """Reads a feature an adapter computed while the image was encoded (`image` context), or says why it cannot.

    Adapters declare what they need from the encoding with this layer (HQ-SAM: the early ViT embedding):
    `SegmentAnything.decode` checks every one of them before it runs, so that an embedding made before such an
    adapter was injected is refused with one sentence.
    """

    def __init__(self, key: str) -> None:
        super().__init__("image", key)

    def __call__(self, *_: Tensor) -> Tensor:
        value = self.use_context("image").get(self.key)
        if value is None:
            raise ValueError(missing_features_message([self.key]))
        return value


def missing_features_message(keys: list[str]) -> str:
    """The one sentence for an embedding that lacks features an injected adapter needs."""
    names = ", ".join(f"'{key}'" for key in keys)
    return (
        f"this image embedding has no {names}: it was encoded without the adapter that computes it (made before "
        "inject()?); encode the image again with the adapter injected"
    )
