"""Training samples: image + mask from a dataset folder, augmented, at the model's input frame, with a prompt.

Every random choice of a sample comes from a generator seeded with (seed, epoch, index): a sample is the same
whichever process draws it, and a resumed run sees exactly what an uninterrupted one would.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from finesam.data.pairs import load_pair
from finesam.data.sampling import foreground_points, mask_box, noisy_box, sample_generator
from finesam.model.prompts import Prompts
from finesam.model.sam import SegmentAnything
from finesam.training.config import DataConfig, PromptConfig

# (image, side) -> the normalised (3, height, width) pixels of the model's input frame: `input_frame` of the
# model's class (SAM: the longest side at `side`; SAM 2: squashed to a square; EfficientSAM: stretched)
InputFrame = Callable[[Image.Image, int], Float[Tensor, "3 height width"]]


@dataclass(frozen=True)
class Sample:
    pixels: Float[Tensor, "3 size size"]  # normalised and padded, as the encoder takes it
    target: Float[Tensor, "1 low low"]  # the mask at the decoder's output resolution, in [0, 1]
    prompt: Prompts  # in model-input pixels, a batch of one
    image_path: Path


def to_input_frame(
    image: Image.Image,
    mask: Tensor,
    size: int,
    config: DataConfig,
    g: torch.Generator,
    frame: InputFrame = SegmentAnything.input_frame,
) -> tuple[Float[Tensor, "3 size size"], Float[Tensor, "size size"]]:
    """Flip / large-scale jitter (when enabled), the model's input `frame` at `size` x scale (SAM: the longest
    side; SAM 2, EfficientSAM: both sides), then crop or pad to `size` x `size`: the image normalised as the
    model's preprocessing does it (padding 0 after normalisation, as SAM's), the mask in [0, 1]."""
    if config.flip and torch.rand((), generator=g) < 0.5:
        image, mask = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask.flip(-1)
    scale = 1.0
    if config.scale_jitter is not None:
        low, high = config.scale_jitter
        scale = low + (high - low) * torch.rand((), generator=g).item()
    side = max(1, round(size * scale))
    pixels = frame(image, side)  # without jitter: exactly what the model's inference sees
    height, width = pixels.shape[-2:]
    mask = F.interpolate(mask[None, None], (height, width), mode="bilinear", align_corners=False)[0, 0]
    top = int(torch.randint(0, height - size + 1, (), generator=g)) if height > size else 0
    left = int(torch.randint(0, width - size + 1, (), generator=g)) if width > size else 0
    pixels, mask = pixels[:, top : top + size, left : left + size], mask[top : top + size, left : left + size]
    pad = (0, size - pixels.shape[-1], 0, size - pixels.shape[-2])
    return F.pad(pixels, pad), F.pad(mask, pad)


def noisy_mask(target: Tensor, value: float, g: torch.Generator) -> Tensor:
    """Flips pixels near the mask's edges: Gaussian noise (sigma 1) where the mask differs from its 8x
    down-and-up-sampled version, thresholded at 0.5; given as 0 / `value` (HQ-SAM's mask prompt)."""
    low = target.shape[-1]
    coarse = F.interpolate(target[None], (max(1, low // 8),) * 2, mode="bilinear", align_corners=False)
    coarse = F.interpolate(coarse, (low, low), mode="bilinear", align_corners=False)[0]
    edges = ((target - coarse).abs() >= 0.01).float()
    noise = torch.randn(target.shape, generator=g) * edges
    return ((target + noise) > 0.5).float()[None] * value


def sample_prompt(mask: Tensor, target: Tensor, config: PromptConfig, size: int, g: torch.Generator) -> Prompts:
    """A box, foreground points or a noisy mask (drawn uniformly among `config.kinds`) for `mask`."""
    kind = config.kinds[int(torch.randint(0, len(config.kinds), (), generator=g))]
    box = mask_box(mask)
    if box is None:  # nothing left of the object (cropped away): the whole image
        return Prompts(boxes=torch.tensor([[0.0, 0.0, float(size), float(size)]]))
    if kind == "box":
        return Prompts(boxes=noisy_box(box, config.box_noise_scale, size, g)[None])
    if kind == "points":
        points = foreground_points(mask, config.max_points, g)[None]
        return Prompts(points=points, labels=torch.ones(1, points.shape[1], dtype=torch.long))
    return Prompts(mask_input=noisy_mask(target, config.mask_prompt_value, g))


class TrainingSet:
    """The (image, mask) pairs of a dataset folder as training samples for a model of input size `size`."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        data: DataConfig,
        prompts: PromptConfig,
        size: int,
        low: int,
        seed: int,
        frame: InputFrame = SegmentAnything.input_frame,
    ) -> None:
        self.pairs, self.data, self.prompts = pairs, data, prompts
        self.size, self.low, self.seed, self.frame = size, low, seed, frame

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, index: int, epoch: int) -> Sample:
        g = sample_generator(self.seed, epoch, index)
        image_path, mask_path = self.pairs[index]
        image, mask = load_pair(image_path, mask_path)
        pixels, mask = to_input_frame(image, mask, self.size, self.data, g, self.frame)
        target = F.interpolate(mask[None, None], (self.low, self.low), mode="bilinear", align_corners=False)[0]
        return Sample(pixels, target, sample_prompt(mask, target, self.prompts, self.size, g), image_path)
