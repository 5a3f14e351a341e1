"""SAM 2's memory encoder: a frame's image embedding and its predicted mask become that frame's memory.

The mask logits (image size) go through the sigmoid mapped to -10..10 (or, on prompted frames, the thresholded
mask), are downsampled 16x by strided convolutions to the embedding's grid and added to the projected image
embedding; two ConvNeXt blocks fuse them, a 1 x 1 convolution compresses to the memory width, and a learned
embedding marks frames where the object is predicted absent. The memory's positions are the sine encoding of
its grid.

    image embedding (B, 256, 64, 64) --1x1 conv--------------.
                                                             (+) -- fuser (CXBlock x 2) -- out 1x1 -- (+ no object)
    mask logits (B, 1, 1024, 1024) -- sigmoid, scale / bias --'        -> memory (B, 64, 64, 64), positions
               -- downsampler (conv s2, LayerNorm2d, GELU) x 4, 1x1 conv --'
"""

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from refiners.fluxion.context import Contexts
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.model.layers import LayerNorm2d
from finesam.model.sam2.memory_config import SAM2_1_MEMORY, SAM2MemoryConfig
from finesam.model.sam2.memory_layers import LayerScale, SinePositionEncoding2d

NORM_EPS = 1e-6  # the memory encoder's LayerNorm2d


class NonOverlappingMasks(fl.Module):
    """Where several objects' masks (the batch: the objects of one frame) overlap, only the highest logit stays;
    the others are lowered to -10 at most (official `_apply_non_overlapping_constraints`)."""

    def forward(self, masks: Float[Tensor, "objects 1 height width"]) -> Float[Tensor, "objects 1 height width"]:
        if masks.shape[0] == 1:
            return masks
        highest = masks.argmax(dim=0, keepdim=True)
        keep = highest == torch.arange(masks.shape[0], device=masks.device)[:, None, None, None]
        return torch.where(keep, masks, masks.clamp(max=-10.0))


class MaskForMemory(fl.ContextModule):
    """Mask logits -> `scale * p + bias`, p the sigmoid probability, or the thresholded mask when the
    `memory_encoder` context says `binarize` (a prompted frame, in evaluation)."""

    def __init__(self, scale: float, bias: float, binarize_prompted: bool) -> None:
        super().__init__()
        self.scale = scale
        self.bias = bias
        self.binarize_prompted = binarize_prompted

    def forward(self, logits: Float[Tensor, "batch 1 height width"]) -> Float[Tensor, "batch 1 height width"]:
        binarize = self.binarize_prompted and self.use_context("memory_encoder").get("binarize", False)
        mask = (logits > 0).float() if binarize and not self.training else torch.sigmoid(logits)
        # two steps, as the official model applies them
        return mask * self.scale + self.bias


class MaskDownsampler(fl.Chain):
    """The mask to the embedding grid: (strided conv, LayerNorm2d, GELU) layers, each multiplying the channels by
    stride^2, then a 1 x 1 convolution to the embedding width."""

    def __init__(self, config: SAM2MemoryConfig, device: Device | str | None = None, dtype: DType | None = None):
        layers: list[fl.Module] = []
        channels = 1
        for _ in range(config.mask_layers):
            out = channels * config.mask_stride**2
            layers += [
                fl.Conv2d(
                    channels,
                    out,
                    kernel_size=config.mask_kernel,
                    stride=config.mask_stride,
                    padding=config.mask_padding,
                    device=device,
                    dtype=dtype,
                ),
                LayerNorm2d(out, eps=NORM_EPS, device=device, dtype=dtype),
                fl.GeLU(),
            ]
            channels = out
        super().__init__(*layers, fl.Conv2d(channels, config.dim, kernel_size=1, device=device, dtype=dtype))


class ConvNeXtBlock(fl.Residual):
    """x + layer scale x MLP(LayerNorm(depth-wise conv(x))), the MLP on channels-last features (official
    `CXBlock`)."""

    def __init__(
        self, dim: int, kernel: int, scale_init: float, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Conv2d(dim, dim, kernel_size=kernel, padding=kernel // 2, groups=dim, device=device, dtype=dtype),
            LayerNorm2d(dim, eps=NORM_EPS, device=device, dtype=dtype),
            fl.Permute(0, 2, 3, 1),
            fl.Linear(dim, 4 * dim, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Linear(4 * dim, dim, device=device, dtype=dtype),
            LayerScale(dim, scale_init, device=device, dtype=dtype),
            fl.Permute(0, 3, 1, 2),
        )


class Fuser(fl.Chain):
    """The ConvNeXt blocks that mix the mask into the image features."""


class PixelFeatures(fl.Chain):
    """The image embedding through a 1 x 1 convolution (`pix_feat_proj`)."""


class MaskFeatures(fl.Chain):
    """The mask, mapped for memory and downsampled to the embedding grid."""


class MemoryProjection(fl.Chain):
    """The fused features compressed to the memory width by a 1 x 1 convolution (`out_proj`)."""

    def __init__(self, dim: int, memory_dim: int, device: Device | str | None = None, dtype: DType | None = None):
        super().__init__(fl.Conv2d(dim, memory_dim, kernel_size=1, device=device, dtype=dtype))


class FusedFeatures(fl.Chain):
    """(image embedding, mask logits, ...) -> image and mask features summed, fused, projected."""


class NoObjectSpatialEmbedding(fl.WeightedModule):
    """(memory, object-score logits) -> the memory, plus a learned per-channel embedding where the object score is
    not positive (SAM 2.1's `no_obj_embed_spatial`)."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dim, device=device, dtype=dtype))

    def forward(
        self, memory: Float[Tensor, "batch dim height width"], object_scores: Float[Tensor, "batch 1"]
    ) -> Float[Tensor, "batch dim height width"]:
        absent = 1 - (object_scores > 0).float()
        return memory + absent[..., None, None] * self.weight[..., None, None]


class MemoryEncoder(fl.Chain):
    """(image embedding (B, dim, E, E) without `no_mem_embed`, mask logits (B, 1, 16 E, 16 E), object-score
    logits (B, 1)) -> (memory (B, memory_dim, E, E), its positions (B, memory_dim, E, E)).

    The `memory_encoder` context's `binarize` says that the masks come from prompts (thresholded instead of the
    sigmoid when the configuration says so); `encode` sets it.
    """

    def __init__(
        self, config: SAM2MemoryConfig = SAM2_1_MEMORY, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        self.config = config
        overlap: list[fl.Module] = [NonOverlappingMasks()] if config.non_overlapping_masks else []
        fused = FusedFeatures(
            fl.Sum(
                PixelFeatures(
                    fl.GetArg(0), fl.Conv2d(config.dim, config.dim, kernel_size=1, device=device, dtype=dtype)
                ),
                MaskFeatures(
                    fl.GetArg(1),
                    *overlap,
                    MaskForMemory(config.sigmoid_scale, config.sigmoid_bias, config.binarize_prompted_masks),
                    MaskDownsampler(config, device=device, dtype=dtype),
                ),
            ),
            Fuser(
                ConvNeXtBlock(config.dim, config.fuser_kernel, config.layer_scale_init, device=device, dtype=dtype)
                for _ in range(config.fuser_layers)
            ),
            MemoryProjection(config.dim, config.memory_dim, device=device, dtype=dtype),
        )
        absent: list[fl.Module] = (
            [NoObjectSpatialEmbedding(config.memory_dim, device=device, dtype=dtype)]
            if config.no_object_spatial
            else [fl.GetArg(0)]
        )
        super().__init__(
            fl.Parallel(fused, fl.GetArg(2)),
            *absent,
            fl.Parallel(fl.Identity(), SinePositionEncoding2d(config.memory_dim)),
        )

    def init_context(self) -> Contexts:
        return {"memory_encoder": {"binarize": False}}

    def encode(
        self,
        image_embedding: Float[Tensor, "batch dim grid grid"],
        mask_logits: Float[Tensor, "batch 1 height width"],
        object_score_logits: Float[Tensor, "batch 1"],
        from_prompts: bool = False,
    ) -> tuple[Float[Tensor, "batch memory_dim grid grid"], Float[Tensor, "batch memory_dim grid grid"]]:
        """One frame's memory.

        Args:
            image_embedding: the frame's image embedding, without the image model's `no_mem_embed`.
            mask_logits: the predicted mask logits at the model's input size (16 x the grid).
            object_score_logits: the decoder's object scores (> 0: the object is present).
            from_prompts: the masks were predicted from prompts on this frame (thresholded for memory when the
                configuration binarizes prompted masks).

        Returns:
            The memory features and their position encoding.
        """
        grid = image_embedding.shape[-1]
        expected = grid * self.config.mask_total_stride
        if mask_logits.shape[-2:] != (expected, expected):
            raise ValueError(
                f"the memory encoder needs mask logits of {expected} x {expected} for a {grid} x {grid} embedding, "
                f"got {tuple(mask_logits.shape[-2:])}"
            )
        self.set_context("memory_encoder", {"binarize": from_prompts})
        try:
            memory, positions = self(image_embedding, mask_logits, object_score_logits)
        finally:
            self.set_context("memory_encoder", {"binarize": False})
        return memory, positions
