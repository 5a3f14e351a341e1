"""SAM 2's object pointers, the temporal encodings of the memories, and the occlusion handling by object score.

A frame's object pointer is the decoder's chosen mask token through an MLP (`obj_ptr_proj`); where the object is
predicted absent (object score <= 0) it is the learned `no_obj_ptr` instead and the mask logits are -1024. In the
memory attention each pointer is split into `dim / memory_dim` tokens whose positions encode how far (in frames)
its frame is from the current one: a 1-D sine encoding of the distance over the farthest allowed one, projected to
the memory width (`obj_ptr_tpos_proj`). A spatial memory's positions get the learned encoding of its slot
(`maskmem_tpos_enc`: the conditioning frames share the last one).
"""

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.mask_decoder import MultiLayerPerceptron
from finesam.model.sam2.memory_config import SAM2_1_MEMORY, SAM2MemoryConfig
from finesam.model.sam2.memory_layers import SinePositions1d

# the mask logit of an object predicted absent (official `NO_OBJ_SCORE`)
NO_OBJECT_SCORE = -1024.0


class OccludedMasks(fl.Module):
    """(mask logits (B, M, H, W), object-score logits (B, 1)) -> the logits, -1024 everywhere for an object
    predicted absent (a hard choice, as the masks the user sees)."""

    def forward(
        self, masks: Float[Tensor, "batch masks height width"], object_scores: Float[Tensor, "batch 1"]
    ) -> Float[Tensor, "batch masks height width"]:
        present = object_scores > 0
        return torch.where(present[:, None, None], masks, NO_OBJECT_SCORE)


class NoObjectPointer(fl.WeightedModule):
    """(pointer (B, dim), object-score logits (B, 1)) -> the pointer of a present object, the learned
    `no_obj_ptr` for an absent one (`fixed`), or the pointer plus it (not `fixed`); with `soft`, presence is the
    score's sigmoid instead of the threshold at 0."""

    def __init__(
        self, dim: int, fixed: bool, soft: bool, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.fixed = fixed
        self.soft = soft
        self.weight = torch.nn.Parameter(torch.zeros(1, dim, device=device, dtype=dtype))

    def forward(
        self, pointer: Float[Tensor, "batch dim"], object_scores: Float[Tensor, "batch 1"]
    ) -> Float[Tensor, "batch dim"]:
        present = object_scores.sigmoid() if self.soft else (object_scores > 0).float()
        if self.fixed:
            pointer = present * pointer
        return pointer + (1 - present) * self.weight


class PointerProjection(fl.Chain):
    """The output token to a pointer: an MLP (`obj_ptr_proj`; a single linear when `pointer_mlp_layers` is 1)."""

    def __init__(self, dim: int, layers: int, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(MultiLayerPerceptron(dim, dim, dim, layers, device=device, dtype=dtype))


class ObjectPointer(fl.Chain):
    """(the decoder's output token for the chosen mask (B, dim), object-score logits (B, 1)) -> the frame's
    object pointer (B, dim)."""

    def __init__(
        self, config: SAM2MemoryConfig = SAM2_1_MEMORY, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        dim = config.dim
        super().__init__(
            fl.Parallel(
                fl.Chain(fl.GetArg(0), PointerProjection(dim, config.pointer_mlp_layers, device=device, dtype=dtype)),
                fl.GetArg(1),
            ),
            NoObjectPointer(
                dim, config.fixed_no_object_pointer, config.soft_no_object_pointer, device=device, dtype=dtype
            ),
        )


class PointerTimeEncoding(fl.Chain):
    """Normalised signed or absolute frame distances of the pointers (N,) -> their positions (N, memory_dim): the
    1-D sine encoding at `dim` projected to `memory_dim`, or made at `memory_dim` without a projection."""

    def __init__(
        self, config: SAM2MemoryConfig = SAM2_1_MEMORY, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        if config.pointer_time_projection:
            layers: list[fl.Module] = [
                SinePositions1d(config.dim),
                fl.Linear(config.dim, config.memory_dim, device=device, dtype=dtype),
            ]
        else:
            layers = [SinePositions1d(config.memory_dim)]
        super().__init__(*layers)


class MemoryTimeEncoding(fl.WeightedModule):
    """The learned temporal encoding of the memory slots (`maskmem_tpos_enc`), added to a memory's positions:
    slot 0 holds the conditioning frames, slot t >= 1 the frame `num_maskmem - t` frames away (the previous frame
    is slot num_maskmem - 1); slot t adds row `num_maskmem - t - 1`."""

    def __init__(
        self, num_maskmem: int, dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_maskmem, dim, device=device, dtype=dtype))

    def forward(self, positions: Float[Tensor, "batch tokens dim"], slot: int) -> Float[Tensor, "batch tokens dim"]:
        slots = self.weight.shape[0]
        if not 0 <= slot < slots:
            raise ValueError(f"memory slot {slot} is not in 0..{slots - 1}")
        return positions + self.weight[slots - slot - 1]


def pointer_tokens(
    pointers: Float[Tensor, "n batch dim"], positions: Float[Tensor, "n memory_dim"], memory_dim: int
) -> tuple[Float[Tensor, "batch tokens memory_dim"], Float[Tensor, "batch tokens memory_dim"]]:
    """N object pointers (and their temporal positions) as memory tokens: each pointer split into
    `dim / memory_dim` consecutive tokens that share its position; batch first.

    Args:
        pointers: the pointers, nearest conditioning frames first, as the memory bank orders them.
        positions: their temporal positions.
        memory_dim: the memory tokens' width.

    Returns:
        The tokens and their positions, (B, N * dim / memory_dim, memory_dim) each.
    """
    count, batch, dim = pointers.shape
    split = dim // memory_dim
    tokens = pointers.reshape(count, batch, split, memory_dim).permute(1, 0, 2, 3).reshape(batch, -1, memory_dim)
    expanded = positions[None, :, None, :].expand(batch, count, split, memory_dim).reshape(batch, -1, memory_dim)
    return tokens, expanded
