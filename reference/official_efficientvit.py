"""Access to the `efficientsam` package (1.0.0 on PyPI, Apache-2.0: a repack of mit-han-lab's EfficientViT-SAM
code, installed with --no-deps): the reference of the EfficientViT-SAM parity tests and benchmark.

Its model code imports torchvision for the predictor's transforms: `torchvision.transforms.Compose`, `ToTensor`,
`Normalize` and `torchvision.transforms.functional.resize` / `to_pil_image` (its `SamResize` resizes a uint8
HWC array through PIL), and `torchvision.ops.boxes` for the mask generator's NMS. `official.py` installs the
functional and NMS stand-ins; this module adds the three transforms, each torchvision's definition:

- `ToTensor`: HWC uint8 (array or PIL) to CHW float32, divided by 255.
- `Normalize`: (x - mean) / std per channel, with mean and std as float32 tensors.
- `Compose`: the transforms applied in order.

`build_official_efficientvit` builds the official model of any configuration our `EfficientViTConfig` can state
(the releases and small ones), with the model zoo's norm eps (1e-6) and seeded, perturbed weights.
"""

import sys
from typing import Any

import numpy as np
import torch

from finesam.model.config import SAMConfig
from finesam.model.efficientvit.config import EfficientViTConfig

import official  # noqa: F401  (installs the torchvision stand-in this one extends)
from official import perturb


class ToTensor:
    """torchvision's `ToTensor` for HWC uint8 arrays and RGB PIL images: CHW float32 in [0, 1]."""

    def __call__(self, picture: Any) -> torch.Tensor:
        array = np.asarray(picture)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).to(torch.float32).div(255)


class Normalize:
    """torchvision's `Normalize`: per-channel (x - mean) / std, mean and std as tensors of x's dtype."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub(mean).div(std)


class Compose:
    """torchvision's `Compose`."""

    def __init__(self, transforms: list[Any]) -> None:
        self.transforms = transforms

    def __call__(self, x: Any) -> Any:
        for transform in self.transforms:
            x = transform(x)
        return x


def install_stand_ins() -> None:
    transforms = sys.modules["torchvision.transforms"]
    for name, value in (("Compose", Compose), ("ToTensor", ToTensor), ("Normalize", Normalize)):
        if not hasattr(transforms, name):  # SAM 2's stand-ins (same definitions) may be there already
            setattr(transforms, name, value)
    transforms.functional = sys.modules["torchvision.transforms.functional"]  # type: ignore[attr-defined]


install_stand_ins()

from efficientsam.models.efficientvit import sam as official_sam  # noqa: E402
from efficientsam.models.efficientvit.backbone import EfficientViTLargeBackbone  # noqa: E402
from efficientsam.models.nn.norm import set_norm_eps  # noqa: E402

EfficientViTSamPredictor = official_sam.EfficientViTSamPredictor
EfficientViTSamAutomaticMaskGenerator = official_sam.EfficientViTSamAutomaticMaskGenerator

# the model zoo's builders of the releases, by our preset names
RELEASES = {
    "efficientvit_sam_l0": official_sam.efficientvit_sam_l0,
    "efficientvit_sam_l1": official_sam.efficientvit_sam_l1,
    "efficientvit_sam_l2": official_sam.efficientvit_sam_l2,
    "efficientvit_sam_xl0": official_sam.efficientvit_sam_xl0,
    "efficientvit_sam_xl1": official_sam.efficientvit_sam_xl1,
}


def build_official_efficientvit(config: SAMConfig, seed: int = 0, release: str | None = None) -> Any:
    """The official EfficientViT-SAM of `config` (its encoder; the official prompt encoder and decoder are
    SAM's at 1024 with a 64 x 64 embedding, so `config` must keep those), the model zoo's norm eps, every
    tensor perturbed (`official.perturb`), in eval mode. `release` builds through the model zoo's own function
    of that name instead (the releases' builders, to check our presets)."""
    encoder = config.encoder
    if not isinstance(encoder, EfficientViTConfig):
        raise TypeError(f"an EfficientViT-SAM configuration, got {encoder!r}")
    if config.image_size != 1024 or config.decoder.prompt_dim != 256:
        raise ValueError("the official EfficientViT-SAM works in the 1024 frame with 256 prompt channels")
    torch.manual_seed(seed)
    if release is not None:
        model = RELEASES[release](image_size=encoder.input_size)
    else:
        backbone = EfficientViTLargeBackbone(
            width_list=list(encoder.widths),
            depth_list=list(encoder.depths),
            block_list=list(encoder.blocks),
            expand_list=list(encoder.expands),
            fewer_norm_list=list(encoder.fewer_norms),
            qkv_dim=encoder.head_dim,
        )
        neck = official_sam.SamNeck(
            fid_list=[f"stage{s}" for s in encoder.neck_stages],
            in_channel_list=[encoder.widths[s] for s in encoder.neck_stages],
            head_width=encoder.neck_width,
            head_depth=encoder.neck_depth,
            expand_ratio=encoder.neck_expand,
            middle_op=encoder.neck_block,
        )
        image_encoder = official_sam.EfficientViTSamImageEncoder(backbone, neck)
        model = official_sam.build_efficientvit_sam(image_encoder, encoder.input_size)
    set_norm_eps(model, 1e-6)  # as `create_efficientvit_sam_model` does for every release
    perturb(model, seed)
    return model.eval()


def official_encoder_outputs(model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official encoder's embedding and its early stage's output (the finest stage its neck reads),
    channels-last: what HQ-SAM fuses."""
    encoder = model.image_encoder
    features = encoder.backbone(pixels)
    finest = min(encoder.neck.input_keys, key=lambda key: int(key.removeprefix("stage")))
    early = features[finest].permute(0, 2, 3, 1)
    return encoder.norm(encoder.neck(features)["sam_encoder"]), early


# small configurations of the official structure (the official model keeps SAM's 1024 frame, 256 prompt
# channels and the 64 x 64 embedding; the encoder is made narrow and shallow): L-style at 512 with the
# releases' block kinds; XL-style at 1024; and one at 128 whose last stage (4 x 4 pixels) is no larger than a
# head, where the official attention takes its quadratic form
SMALL_L = SAMConfig(
    EfficientViTConfig(
        widths=(8, 16, 24, 32, 64),
        depths=(1, 1, 1, 2, 2),
        head_dim=8,
        neck_width=32,
        neck_depth=2,
        input_size=512,
    ),
    name="small_l",
)
SMALL_XL = SAMConfig(
    EfficientViTConfig(
        widths=(8, 16, 24, 32, 48, 64),
        depths=(0, 1, 1, 1, 1, 2),
        blocks=("res", "fmb", "fmb", "fmb", "att@3", "att@3"),
        expands=(1, 4, 4, 4, 4, 6),
        fewer_norms=(False, False, False, False, True, True),
        head_dim=8,
        neck_stages=(5, 4, 3),
        neck_width=32,
        neck_depth=2,
        neck_expand=4.0,
        neck_block="mb",
        input_size=1024,
    ),
    name="small_xl",
)
SMALL_QUADRATIC = SAMConfig(
    EfficientViTConfig(
        widths=(8, 16, 24, 32, 64),
        depths=(1, 1, 1, 1, 1),
        head_dim=16,
        neck_stages=(2, 1, 0),
        neck_width=16,
        neck_depth=1,
        neck_block="res",
        input_size=128,
    ),
    name="small_quadratic",
)
