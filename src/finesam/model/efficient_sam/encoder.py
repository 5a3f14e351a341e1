"""EfficientSAM's image encoder: a plain ViT (patches, an absolute position table resized to the grid, blocks that
all attend globally) and SAM's neck.

Shared with SAM's ViT (`finesam.model.image_encoder`): the patch embedding, the MLP and the neck. Its own: the
position table of the 224-pixel pretraining (14 x 14 plus a class-token row) resized bicubically at every call,
and attention without relative positions.
"""

import torch
import torch.nn.functional as F
from jaxtyping import Float
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.efficient_sam.config import EfficientSAMConfig
from finesam.model.image_encoder import FeedForward, Neck, PatchEmbedding
from finesam.model.registry import EncoderChain
from finesam.model.sam2.hiera import QueryPoolingAttention

LAYER_NORM_EPS = 1e-6  # the official blocks' norms


class PretrainPositionTable(fl.Module):
    """The absolute position table of the pretraining grid, (1, 1 + g * g, C) with the class token's row first
    (the official `pos_embed`), as a (1, H, W, C) embedding of a grid: the class row dropped and the g x g table
    resized bicubically (align_corners=False) where the grid is another size."""

    def __init__(
        self, pretrain_grid: int, dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.pretrain_grid = pretrain_grid
        self.weight = torch.nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, dim, device=device, dtype=dtype))

    def forward(self, x: Float[Tensor, "batch height width dim"]) -> Float[Tensor, "1 height width dim"]:
        height, width, g = x.shape[1], x.shape[2], self.pretrain_grid
        table = self.weight[:, 1:].reshape(1, g, g, -1)
        if (height, width) == (g, g):
            return table
        resized = F.interpolate(table.permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False)
        return resized.permute(0, 2, 3, 1)


class PositionEmbedding(fl.Residual):
    """Adds the resized pretraining position table to every patch."""

    def __init__(
        self, pretrain_grid: int, dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(PretrainPositionTable(pretrain_grid, dim, device=device, dtype=dtype))


class GlobalAttention(fl.Chain):
    """qkv projection (with bias), multi-head attention over the whole grid, output projection."""

    def __init__(self, dim: int, num_heads: int, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(
            fl.Linear(dim, 3 * dim, device=device, dtype=dtype),
            QueryPoolingAttention(num_heads),  # stride 1: plain attention on a (B, H, W, 3C) grid
            fl.Linear(dim, dim, device=device, dtype=dtype),
        )


class ViTBlock(fl.Chain):
    """Pre-norm ViT block with global attention."""

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Residual(
                fl.LayerNorm(dim, eps=LAYER_NORM_EPS, device=device, dtype=dtype),
                GlobalAttention(dim, num_heads, device=device, dtype=dtype),
            ),
            fl.Residual(
                fl.LayerNorm(dim, eps=LAYER_NORM_EPS, device=device, dtype=dtype),
                FeedForward(dim, mlp_dim, device=device, dtype=dtype),
            ),
        )


class ViTBlocks(fl.Chain):
    pass


class EfficientSAMEncoder(EncoderChain[EfficientSAMConfig]):
    """EfficientSAM's ViT: (B, 3, S, S) normalised image -> (B, out_dim, S/16, S/16) image embedding."""

    def __init__(
        self,
        config: EfficientSAMConfig,
        image_size: int,
        out_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        del image_size  # the position table is resized to whatever grid the input gives
        dim = config.dim
        super().__init__(
            PatchEmbedding(config.patch_size, dim, device=device, dtype=dtype),
            PositionEmbedding(config.pretrain_grid, dim, device=device, dtype=dtype),
            ViTBlocks(
                ViTBlock(dim, config.heads, config.mlp_dim, device=device, dtype=dtype) for _ in range(config.depth)
            ),
            Neck(dim, out_dim, device=device, dtype=dtype),
        )
        self.config = config

    @property
    def early_embedding_layer(self) -> fl.Module:
        """The block HQ-SAM taps (`EfficientSAMConfig.early_embedding_block`), channels-last output."""
        return self.ensure_find(ViTBlocks)[self.config.early_embedding_block]
