"""EfficientSAM's prompt encoder: every prompt is a fixed number of labelled points (boxes are two of them), and
there is no mask input, so no dense prompt embedding.

Shared with SAM (`finesam.model.prompt_encoder`): the random Fourier encoding of points and of the embedding grid,
pixel centres in the unit square. Its own: which labels have a learned embedding (padding -1, foreground 1, box
corners 2 and 3; a background click, 0, is its position alone) and that padding points keep their position's
encoding (SAM zeroes it).
"""

import torch
from jaxtyping import Float, Int
from refiners.fluxion import layers as fl
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.inputs import (
    BOX_BOTTOM_RIGHT_LABEL,
    BOX_TOP_LEFT_LABEL,
    FIXED_COUNT_PADDING_POINT,
    PADDING_LABEL,
    check_point_count,
)
from finesam.model.config import SAMConfig
from finesam.model.prompt_encoder import FourierPositionalEncoding, PixelToUnit, prompt_embeddings
from finesam.model.prompts import Prompts


def fixed_count_labelled_points(
    prompts: Prompts, count: int
) -> tuple[Float[Tensor, "batch count 2"], Int[Tensor, "batch count"]]:
    """EfficientSAM's sparse sequence: the box corners (labels 2, 3), then the points, then padding points
    (label -1 at (-1, -1)) up to `count` (the numpy twin for the ONNX predictor is
    `finesam.inputs.fixed_count_labelled_points`).

    Raises:
        ValueError: a prompt has more than `count` points (box corners included): the official model would drop
            the last ones silently.
    """
    points, labels, boxes = prompts.points, prompts.labels, prompts.boxes
    coords: list[Tensor] = []
    kinds: list[Tensor] = []
    if boxes is not None:
        coords.append(boxes.reshape(-1, 2, 2).float())
        corners = torch.tensor([BOX_TOP_LEFT_LABEL, BOX_BOTTOM_RIGHT_LABEL], device=boxes.device)
        kinds.append(corners.expand(boxes.shape[0], 2))
    if points is not None and labels is not None:
        coords.append(points.float())
        kinds.append(labels.long())
    batch = max((len(c) for c in coords), default=prompts.batch_size)
    coords = [c.expand(batch, *c.shape[1:]) for c in coords]
    kinds = [k.expand(batch, *k.shape[1:]) for k in kinds]
    given = sum(c.shape[1] for c in coords)
    check_point_count(given, count)
    device = coords[0].device if coords else None
    coords.append(torch.tensor(FIXED_COUNT_PADDING_POINT, device=device).expand(batch, count - given, 2))
    kinds.append(torch.full((batch, count - given), PADDING_LABEL, dtype=torch.long, device=device))
    return torch.cat(coords, dim=1), torch.cat(kinds, dim=1)


class PointLabelEmbedding(fl.Module):
    """The learned embedding of each label that has one: padding (-1), foreground (1), box top-left (2), box
    bottom-right (3), one row each in that order (the official `invalid_points`, `point_embeddings`,
    `bbox_top_left_embeddings`, `bbox_bottom_right_embeddings`); a background click (0) adds nothing."""

    def __init__(self, dim: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, dim, device=device, dtype=dtype))

    def forward(self, _coords: Tensor, labels: Int[Tensor, "b n"]) -> Float[Tensor, "b n d"]:
        padding, foreground, corners = self.weight[:1], self.weight[1:2], self.weight[2:]
        table = torch.cat([padding, torch.zeros_like(padding), foreground, corners])  # rows for labels -1..3
        return table[labels + 1]


class PointEncoder(fl.Sum):
    """(coords, labels) -> sparse prompt tokens: the Fourier encoding of every point's position (padding points'
    too) plus the embedding of its label."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.Chain(
                fl.GetArg(0),
                PixelToUnit(config.image_size),
                FourierPositionalEncoding(config.decoder.prompt_dim, device=device, dtype=dtype),
            ),
            PointLabelEmbedding(config.decoder.prompt_dim, device=device, dtype=dtype),
        )

    @property
    def positional_encoding(self) -> FourierPositionalEncoding:
        return self.ensure_find(fl.Chain).ensure_find(FourierPositionalEncoding)


class EfficientSAMPromptEncoder(fl.Passthrough):
    """Reads the points of the `sam` context and writes the sparse prompt embedding and the dense positional
    encoding to the `mask_decoder` context (there is no dense prompt embedding). Passes the image embedding on."""

    def __init__(self, config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> None:
        point_encoder = PointEncoder(config, device=device, dtype=dtype)
        super().__init__(*prompt_embeddings(point_encoder, point_encoder.positional_encoding, config.embedding_size))
