"""The prompt encoder of SAM: sparse point/box tokens, the dense mask prompt, and the image positional encoding.

Boxes enter as two corner points with their own labels, so every sparse prompt is a labelled point:
`-1` padding ("not a point"), `0` background, `1` foreground, `2` box top-left, `3` box bottom-right.
"""

import math

import torch
from jaxtyping import Float, Int
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.inputs import (
    BOX_BOTTOM_RIGHT_LABEL,
    BOX_TOP_LEFT_LABEL,
    PADDING_LABEL,
    PADDING_POINT,
    needs_padding_point,
)
from finesam.model.config import SAMConfig
from finesam.model.layers import LayerNorm2d
from finesam.model.prompts import Prompts


def labelled_points(prompts: Prompts) -> tuple[Float[Tensor, "batch n 2"], Int[Tensor, "batch n"]]:
    """Merges points and boxes into one labelled point sequence, in the order the official encoder embeds them.

    Points come first; a padding point is appended as `finesam.inputs.needs_padding_point` says (points and
    no box); box corners come last. Without points or boxes the sequence is empty, for each prompt of the batch
    (mask-only prompts). The ONNX predictor's numpy twin, `finesam.inputs.labelled_points`, is tested equal.
    """
    points, labels, boxes = prompts.points, prompts.labels, prompts.boxes
    coords: list[Tensor] = []
    kinds: list[Tensor] = []
    if points is not None and labels is not None:
        coords.append(points)
        kinds.append(labels.long())
        if needs_padding_point(True, boxes is not None):
            coords.append(points.new_tensor(PADDING_POINT).expand(points.shape[0], 1, 2))
            kinds.append(labels.new_full((labels.shape[0], 1), PADDING_LABEL).long())
    if boxes is not None:
        coords.append(boxes.reshape(-1, 2, 2))
        corners = torch.tensor([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], device=boxes.device)
        kinds.append(corners.expand(boxes.shape[0], 2))
    if not coords:
        return torch.zeros(prompts.batch_size, 0, 2), torch.zeros(prompts.batch_size, 0, dtype=torch.long)
    return torch.cat(coords, dim=1), torch.cat(kinds, dim=1)


class FourierPositionalEncoding(fl.Module):
    """Random Fourier features of points in the unit square: `[sin, cos](2 pi (2p - 1) G)`, G ~ N(0, 1)."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__()
        self.register_buffer("gaussian_matrix", torch.randn(2, dim // 2, device=device, dtype=dtype))

    def forward(self, unit_coords: Float[Tensor, "... 2"]) -> Float[Tensor, "... dim"]:
        matrix = self.get_buffer("gaussian_matrix")
        projected = (2 * unit_coords.to(matrix.dtype) - 1) @ matrix * (2 * math.pi)
        return torch.cat([projected.sin(), projected.cos()], dim=-1)


class PixelToUnit(fl.Module):
    """Pixel coordinates of the model input (S x S) to pixel-centre coordinates in the unit square."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size

    def forward(self, coords: Float[Tensor, "... 2"]) -> Float[Tensor, "... 2"]:
        return (coords + 0.5) / self.image_size


class ZeroPaddingPoints(fl.Module):
    """Clears the positional encoding of padding points (label -1)."""

    def forward(self, encoding: Float[Tensor, "b n d"], labels: Int[Tensor, "b n"]) -> Float[Tensor, "b n d"]:
        return encoding.masked_fill((labels == PADDING_LABEL)[..., None], 0.0)


class PointTypeEmbedding(fl.Module):
    """One learned embedding per label: padding, background, foreground, box top-left, box bottom-right."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(5, dim, device=device, dtype=dtype))

    def forward(self, _coords: Tensor, labels: Int[Tensor, "b n"]) -> Float[Tensor, "b n d"]:
        return self.weight[labels + 1]


class PointEncoder(fl.Chain):
    """(coords, labels) -> sparse prompt tokens: Fourier encoding of the position + embedding of the label."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Sum(
                fl.Chain(
                    fl.Parallel(
                        fl.Chain(
                            fl.GetArg(0),
                            PixelToUnit(config.image_size),
                            FourierPositionalEncoding(config.decoder.prompt_dim, device=device, dtype=dtype),
                        ),
                        fl.GetArg(1),
                    ),
                    ZeroPaddingPoints(),
                ),
                PointTypeEmbedding(config.decoder.prompt_dim, device=device, dtype=dtype),
            )
        )

    @property
    def positional_encoding(self) -> FourierPositionalEncoding:
        return self.ensure_find(fl.Sum).layer((0, 0, 0, 2), FourierPositionalEncoding)


class MaskEncoder(fl.Chain):
    """Downscales a low-resolution mask prompt (B, 1, 4E, 4E) to a dense embedding (B, D, E, E)."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        hidden = config.decoder.mask_in_channels
        super().__init__(
            fl.Conv2d(1, hidden // 4, kernel_size=2, stride=2, device=device, dtype=dtype),
            LayerNorm2d(hidden // 4, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Conv2d(hidden // 4, hidden, kernel_size=2, stride=2, device=device, dtype=dtype),
            LayerNorm2d(hidden, device=device, dtype=dtype),
            fl.GeLU(),
            fl.Conv2d(hidden, config.decoder.prompt_dim, kernel_size=1, device=device, dtype=dtype),
        )


class NoMaskEmbedding(fl.Module):
    """The learned dense embedding used when no mask prompt is given: one (1, D, E, E) map, the same for every
    prompt, which broadcasts over the batch (the decoder then shares its image-side work among the prompts
    until the image tokens first attend to them)."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(1, dim, device=device, dtype=dtype))

    def forward(self, grid_size: int) -> Float[Tensor, "1 dim grid grid"]:
        return self.weight.reshape(1, -1, 1, 1).expand(1, -1, grid_size, grid_size)


class DenseEmbedding(fl.Chain):
    """The mask prompt of the `sam` context through `MaskEncoder` (B, D, E, E), or the no-mask embedding
    (1, D, E, E), shared by every prompt, when it is unset."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        self.grid_size = config.embedding_size
        super().__init__(
            MaskEncoder(config, device=device, dtype=dtype),
            NoMaskEmbedding(config.decoder.prompt_dim, device=device, dtype=dtype),
        )

    def forward(self, *_: Tensor) -> Float[Tensor, "batch_or_1 dim grid grid"]:
        mask = self.use_context("sam")["mask_prompt"]
        if mask is not None:
            return self.ensure_find(MaskEncoder)(mask)
        return self.ensure_find(NoMaskEmbedding)(self.grid_size)


class DensePositionalEncoding(fl.Module):
    """Fourier encoding of the centres of the E x E image-embedding cells, (1, D, E, E), with channels-last
    strides (so its tokens are contiguous, as the image's).

    It shares the Gaussian matrix of the point encoder, held by reference (not registered twice).
    """

    def __init__(self, encoding: FourierPositionalEncoding, grid_size: int) -> None:
        super().__init__()
        self._encoding = [encoding]
        self.grid_size = grid_size

    @property
    def encoding(self) -> FourierPositionalEncoding:
        """The point encoder's Fourier encoding, whose Gaussian matrix this one reads."""
        return self._encoding[0]

    def forward(self, *_: Tensor) -> Float[Tensor, "1 dim grid grid"]:
        encoding = self.encoding
        matrix = encoding.get_buffer("gaussian_matrix")
        centres = (torch.arange(self.grid_size, device=matrix.device, dtype=torch.float32) + 0.5) / self.grid_size
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1)  # (y, x) -> (x, y)
        return encoding(grid).permute(2, 0, 1).unsqueeze(0)


def prompt_embeddings(
    point_encoder: fl.Module,
    positional_encoding: FourierPositionalEncoding,
    embedding_size: int,
    dense_embedding: fl.Module | None = None,
) -> list[fl.Chain]:
    """A prompt encoder's branches: the points of the `sam` context through `point_encoder` to the sparse prompt
    embedding, `dense_embedding` (when the model has one) to the dense prompt embedding, and the grid's encoding
    by `positional_encoding` to the dense positional encoding, all in the `mask_decoder` context. The layers are
    built by the caller, in the order that seeds their weights."""
    dense: list[fl.Chain] = []
    if dense_embedding is not None:
        dense.append(fl.Chain(dense_embedding, fl.SetContext("mask_decoder", "dense_prompt_embedding")))
    return [
        fl.Chain(
            fl.Parallel(fl.UseContext("sam", "point_coords"), fl.UseContext("sam", "point_labels")),
            point_encoder,
            fl.SetContext("mask_decoder", "sparse_prompt_embedding"),
        ),
        *dense,
        fl.Chain(
            DensePositionalEncoding(positional_encoding, embedding_size),
            fl.SetContext("mask_decoder", "dense_positional_encoding"),
        ),
    ]


class PromptEncoder(fl.Passthrough):
    """Reads the prompt from the `sam` context and writes its embeddings to the `mask_decoder` context.

    Passes its input (the image embedding) through unchanged.
    """

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        point_encoder = PointEncoder(config, device=device, dtype=dtype)
        dense_embedding = DenseEmbedding(config, device=device, dtype=dtype)
        super().__init__(
            *prompt_embeddings(point_encoder, point_encoder.positional_encoding, config.embedding_size, dense_embedding)
        )
