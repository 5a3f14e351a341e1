"""Fast paths of SAM 2's Hiera encoder (`finesam.model.sam2.hiera`)."""

import torch
from jaxtyping import Float
from torch import Tensor

from finesam.fast.swap import fast_version_of, swapped_by_type
from finesam.model.layers import weights_key
from finesam.model.sam2.hiera import WindowedPositionEmbedding as ReferenceWindowedPositionEmbedding


@swapped_by_type()
@fast_version_of(ReferenceWindowedPositionEmbedding)
class WindowedPositionEmbedding(ReferenceWindowedPositionEmbedding):
    """The position embedding of a grid size computed once and remembered while its two weights are unchanged
    (`weights_key`): it depends on nothing else, and its bicubic resize costs 3-4% of the Hiera-T encoder."""

    fast_state = ("_memory",)

    def forward(self, x: Float[Tensor, "batch height width dim"]) -> Float[Tensor, "1 height width dim"]:
        if torch.is_grad_enabled():
            return super().forward(x)
        key = (weights_key((self.background, self.window)), x.shape[1], x.shape[2], x.dtype, x.device)
        memory = vars(self).get("_memory")  # one read: another thread may replace it
        if memory is not None and memory[0] == key:
            return memory[1]
        output = super().forward(x)
        vars(self)["_memory"] = (key, output, self.background, self.window)
        return output
