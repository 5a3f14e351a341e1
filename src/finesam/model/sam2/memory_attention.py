"""SAM 2's memory attention: the current frame's image tokens attend to themselves, then to the memories of
other frames and to their object pointers, with axial rotary position encodings (RoPE).

    image tokens (B, HW, 256) + 0.1 x positions
      -> [ self-attention (RoPE) -> cross-attention to memories (RoPE, keys + memory positions) -> MLP ] x 4
      -> LayerNorm -> memory-conditioned image tokens

Every sub-layer is pre-norm and residual. The memories are (B, M, 64) tokens: whole frames of the current grid
(their keys are rotated with the grid's angles, repeated for each frame), then the object pointer tokens, which
are not rotated. The `memory_attention` context carries what the layers read besides the image tokens:
`positions` (B, HW, 256), `memory` and `memory_positions` (B, M, 64) and `pointer_tokens` (how many of the
memory tokens are pointers); `MemoryAttention.condition` sets them.
"""

import math

from jaxtyping import Float
from refiners.fluxion import layers as fl
from refiners.fluxion.context import Contexts
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.sam2.memory_config import SAM2_1_MEMORY, SAM2MemoryConfig
from finesam.model.sam2.memory_layers import Dropout, HeadsAttention, RotaryPositions

CONTEXT = "memory_attention"


def _from_context(key: str) -> fl.UseContext:
    return fl.UseContext(CONTEXT, key)


class RoPEAttention(fl.Chain):
    """(queries, keys, values) -> attention output: projections to `dim`, rotary encoding of the queries and of
    the keys that are grid tokens, multi-head attention, output projection."""

    def __init__(
        self,
        config: SAM2MemoryConfig,
        key_dim: int,
        cross: bool,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        dim = config.dim
        grid = (config.rope_grid[0], config.rope_grid[1])
        super().__init__(
            fl.Distribute(
                fl.Linear(dim, dim, device=device, dtype=dtype),
                fl.Linear(key_dim, dim, device=device, dtype=dtype),
                fl.Linear(key_dim, dim, device=device, dtype=dtype),
            ),
            RotaryPositions(
                config.attention_heads, config.rope_theta, grid, repeat_keys=cross, excludes_pointers=cross
            ),
            HeadsAttention(config.attention_heads, config.dropout),
            fl.Linear(dim, dim, device=device, dtype=dtype),
        )


def _with_positions(added: bool, key: str) -> list[fl.Module]:
    return [fl.Residual(_from_context(key))] if added else []


class MemorySelfAttention(fl.Residual):
    """x + attention(norm(x)) among the image tokens (queries and keys + positions when configured)."""

    def __init__(self, config: SAM2MemoryConfig, device: Device | str | None = None, dtype: DType | None = None):
        query = fl.Chain(fl.Identity(), *_with_positions(config.position_at_self_attention, "positions"))
        key = fl.Chain(fl.Identity(), *_with_positions(config.position_at_self_attention, "positions"))
        super().__init__(
            fl.LayerNorm(config.dim, device=device, dtype=dtype),
            fl.Parallel(query, key, fl.Identity()),
            RoPEAttention(config, config.dim, cross=False, device=device, dtype=dtype),
            Dropout(config.dropout),
        )


class MemoryCrossAttention(fl.Residual):
    """x + attention(norm(x) -> memories): keys are the memories + their positions (when configured), values the
    memories."""

    def __init__(self, config: SAM2MemoryConfig, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(
            fl.LayerNorm(config.dim, device=device, dtype=dtype),
            fl.Parallel(
                fl.Chain(fl.Identity(), *_with_positions(config.position_at_cross_queries, "positions")),
                fl.Chain(_from_context("memory"), *_with_positions(config.position_at_cross_keys, "memory_positions")),
                _from_context("memory"),
            ),
            RoPEAttention(config, config.memory_dim, cross=True, device=device, dtype=dtype),
            Dropout(config.dropout),
        )


class MemoryFeedForward(fl.Residual):
    """x + MLP(norm(x)) (ReLU)."""

    def __init__(self, config: SAM2MemoryConfig, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(
            fl.LayerNorm(config.dim, device=device, dtype=dtype),
            fl.Linear(config.dim, config.feedforward_dim, device=device, dtype=dtype),
            fl.ReLU(),
            Dropout(config.dropout),
            fl.Linear(config.feedforward_dim, config.dim, device=device, dtype=dtype),
            Dropout(config.dropout),
        )


class MemoryAttentionLayer(fl.Chain):
    """Self-attention, cross-attention to the memories, MLP."""

    def __init__(self, config: SAM2MemoryConfig, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(
            MemorySelfAttention(config, device=device, dtype=dtype),
            MemoryCrossAttention(config, device=device, dtype=dtype),
            MemoryFeedForward(config, device=device, dtype=dtype),
        )


class InputPositions(fl.Residual):
    """Adds 0.1 x the image tokens' positions before the first layer (`pos_enc_at_input`)."""

    def __init__(self) -> None:
        super().__init__(_from_context("positions"), fl.Multiply(0.1))


class MemoryAttention(fl.Chain):
    """Image tokens (B, HW, dim) -> the same tokens conditioned on the memories in the `memory_attention` context
    (see the module docstring; `condition` sets it and runs the chain)."""

    def __init__(
        self, config: SAM2MemoryConfig = SAM2_1_MEMORY, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        self.config = config
        inputs: list[fl.Module] = [InputPositions()] if config.position_at_input else []
        super().__init__(
            *inputs,
            *(MemoryAttentionLayer(config, device=device, dtype=dtype) for _ in range(config.attention_layers)),
            fl.LayerNorm(config.dim, device=device, dtype=dtype),
        )

    def init_context(self) -> Contexts:
        return {CONTEXT: {"positions": None, "memory": None, "memory_positions": None, "pointer_tokens": 0}}

    def condition(
        self,
        tokens: Float[Tensor, "batch hw dim"],
        positions: Float[Tensor, "batch hw dim"],
        memory: Float[Tensor, "batch m memory_dim"],
        memory_positions: Float[Tensor, "batch m memory_dim"],
        pointer_tokens: int = 0,
    ) -> Float[Tensor, "batch hw dim"]:
        """The image tokens conditioned on the memories.

        Args:
            tokens: the current frame's image embedding as row-major tokens (without `no_mem_embed`).
            positions: their sine position encoding.
            memory: the memory tokens: whole frames of the same grid, then `pointer_tokens` object pointer tokens.
            memory_positions: the memories' positions (spatial + temporal encodings; the pointers' temporal one).
            pointer_tokens: how many of the last memory tokens are object pointer tokens (not rotated).

        Returns:
            The conditioned tokens (after the final norm).
        """
        if tokens.shape != positions.shape or memory.shape != memory_positions.shape:
            raise ValueError(
                f"positions must have the shape of what they encode: tokens {tuple(tokens.shape)} / positions "
                f"{tuple(positions.shape)}, memory {tuple(memory.shape)} / positions {tuple(memory_positions.shape)}"
            )
        if memory.shape[0] != tokens.shape[0]:
            raise ValueError(f"batch of the memories ({memory.shape[0]}) and of the tokens ({tokens.shape[0]}) differ")
        if not 0 <= pointer_tokens <= memory.shape[1]:
            raise ValueError(f"pointer_tokens {pointer_tokens} is not in 0..{memory.shape[1]}")
        grid = tokens.shape[1]
        if math.isqrt(grid) ** 2 != grid:
            raise ValueError(f"the rotary encoding needs a square grid of query tokens, got {grid}")
        if (memory.shape[1] - pointer_tokens) % grid:
            raise ValueError(
                f"{memory.shape[1] - pointer_tokens} memory tokens besides the {pointer_tokens} pointer tokens for "
                f"{grid} image tokens: the memories must be whole frames of the query grid"
            )
        context = {
            "positions": positions,
            "memory": memory,
            "memory_positions": memory_positions,
            "pointer_tokens": pointer_tokens,
        }
        self.set_context(CONTEXT, context)
        try:
            return self(tokens)
        finally:
            self._reset_context()
