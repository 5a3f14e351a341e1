"""Access to Meta's `sam2` package (1.1.0, installed with --no-deps): the reference of the SAM 2 parity tests
and benchmarks.

`sam2` imports hydra (to compose its YAML configs), iopath (for a file open in Hiera) and torchvision (the
predictor's transforms, NMS in the mask generator), none of which is installed. `install_stand_ins` registers
small modules in their place:

- `hydra` / `hydra.core.global_hydra`: the package's `__init__` only registers its config folder;
  `build_official_sam2` reads the YAML files itself (`instantiate` below: every mapping with a `_target_`
  becomes an object of that class, built from its other keys, children first).
- `iopath.common.file_io.g_pathmgr`: `open` is the builtin `open`.
- `torchvision.transforms`: `ToTensor` (HWC uint8 to CHW float in [0, 1]), `Resize` (torchvision's tensor
  path: bilinear with antialiasing, align_corners False) and `Normalize` ((x - mean) / std), as TorchScript-able
  modules (the predictor scripts them).
- `torchvision.ops.boxes`: the plain NMS of `official.py`.
- `sam2._C`: the connected components the predictor's hole filling calls (a CUDA extension in the official
  build, skipped with a warning without it); here OpenCV's 8-connected labelling, so that the official hole /
  sprinkle filling runs and is a reference for ours.
"""

import importlib
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

import official  # noqa: F401  (installs the torchvision stand-in that this one extends)


class ToTensor:
    """torchvision's `ToTensor` for HWC uint8 arrays and RGB PIL images: CHW float32 in [0, 1]."""

    def __call__(self, picture: Any) -> torch.Tensor:
        array = np.asarray(picture)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div(255)


class Resize(torch.nn.Module):
    """torchvision's `Resize` on a (C, H, W) float tensor: bilinear, antialiased, align_corners False."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [self.size[0], self.size[1]]
        batched = x.unsqueeze(0) if x.dim() == 3 else x
        out = torch.nn.functional.interpolate(batched, size=size, mode="bilinear", align_corners=False, antialias=True)
        return out[0] if x.dim() == 3 else out


class Normalize(torch.nn.Module):
    """torchvision's `Normalize`: per-channel (x - mean) / std."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.mean = mean
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


def _connected_components(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sam2._C.get_connected_componnets`: for (N, 1, H, W) uint8 masks, the 8-connected component label of
    every foreground pixel (0 on background) and the area of its component (0 on background)."""
    import cv2

    labels = torch.zeros(mask.shape, dtype=torch.int32)
    areas = torch.zeros(mask.shape, dtype=torch.int32)
    for i in range(mask.shape[0]):
        count, label, stats, _ = cv2.connectedComponentsWithStats(mask[i, 0].numpy().astype(np.uint8), connectivity=8)
        label_t = torch.from_numpy(label.astype(np.int32))
        area = torch.from_numpy(stats[:, cv2.CC_STAT_AREA].astype(np.int32))
        area[0] = 0  # the background label
        labels[i, 0] = label_t
        areas[i, 0] = area[label_t]
        del count
    return labels, areas


class _GlobalHydra:
    @staticmethod
    def instance() -> "_GlobalHydra":
        return _GlobalHydra()

    def is_initialized(self) -> bool:
        return True


def install_stand_ins() -> None:
    """hydra, iopath, torchvision's transforms and sam2's CUDA extension (see the module docstring)."""
    if "hydra" in sys.modules:
        return
    members: dict[str, dict[str, Any]] = {
        "hydra": {"initialize_config_module": lambda *a, **k: None, "compose": None},
        "hydra.core": {},
        "hydra.core.global_hydra": {"GlobalHydra": _GlobalHydra},
        "hydra.utils": {"instantiate": None},
        "omegaconf": {"OmegaConf": None},
        "iopath": {},
        "iopath.common": {},
        "iopath.common.file_io": {"g_pathmgr": types.SimpleNamespace(open=open)},
        "sam2._C": {"get_connected_componnets": _connected_components},
    }
    for name, attributes in members.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module
    transforms = sys.modules["torchvision.transforms"]
    transforms.__dict__.update(ToTensor=ToTensor, Resize=Resize, Normalize=Normalize)


install_stand_ins()

import sam2  # noqa: E402
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator  # noqa: E402
from sam2.modeling.sam2_base import SAM2Base  # noqa: E402
from sam2.sam2_image_predictor import SAM2ImagePredictor  # noqa: E402

sam2._C = sys.modules["sam2._C"]  # type: ignore[attr-defined]  # what `from sam2 import _C` finds

CONFIGS = Path(sam2.__file__).parent / "configs"

# the official configuration of each release (`finesam` preset name -> YAML file of the package)
CONFIG_FILES = {
    f"sam2.1_hiera_{size}": f"sam2.1/sam2.1_hiera_{short}.yaml"
    for size, short in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
} | {
    f"sam2_hiera_{size}": f"sam2/sam2_hiera_{short}.yaml"
    for size, short in (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
}

# what `build_sam2(apply_postprocessing=True)` adds to every configuration (the image predictor's setting)
POSTPROCESSING = {
    "sam_mask_decoder_extra_args": {
        "dynamic_multimask_via_stability": True,
        "dynamic_multimask_stability_delta": 0.05,
        "dynamic_multimask_stability_thresh": 0.98,
    }
}

# what `build_sam2_video_predictor(apply_postprocessing=True)` sets on top of a configuration (with POSTPROCESSING)
VIDEO_PREDICTOR = {
    "_target_": "sam2.sam2_video_predictor.SAM2VideoPredictor",
    "binarize_mask_from_pts_for_mem_enc": True,
    "fill_hole_area": 8,
}


def instantiate(node: Any) -> Any:
    """hydra's recursive `instantiate` for the plain YAML of sam2's configs."""
    if isinstance(node, list):
        return [instantiate(item) for item in node]
    if isinstance(node, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", node):
        return float(node)  # YAML 1.1 (PyYAML) reads `1e-6` as a string; hydra's loader reads a number
    if not isinstance(node, dict):
        return node
    values = {key: instantiate(value) for key, value in node.items() if key != "_target_"}
    if "_target_" not in node:
        return values
    module, _, name = node["_target_"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**values)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def official_config(name: str, changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `model` section of an official configuration (a key of `CONFIG_FILES`), with the predictor's
    postprocessing settings and `changes` merged in (nested mappings are merged key by key)."""
    model = yaml.safe_load((CONFIGS / CONFIG_FILES[name]).read_text())["model"]
    return _merged(_merged(model, POSTPROCESSING), changes or {})


def build_official_sam2(name: str, changes: dict[str, Any] | None = None, seed: int = 0) -> SAM2Base:
    """An official `SAM2Base` of configuration `name` (with `changes`), in eval mode, with seeded random weights:
    the default initialisation, then every parameter perturbed so that zero-initialised ones (position
    embeddings, `no_mem_embed`, LayerNorm biases) take part in the comparison too."""
    torch.manual_seed(seed)
    model = instantiate(official_config(name, changes))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def small_hiera(name: str = "sam2.1_hiera_tiny") -> dict[str, Any]:
    """Changes that make a fast configuration of release `name` for most tests: two heads less deep stages, the
    same structure (every kind of block: windowed, pooling, global; every neck level)."""
    del name
    return {
        "image_encoder": {
            "trunk": {"embed_dim": 32, "num_heads": 1, "stages": [1, 1, 2, 1], "global_att_blocks": [3]},
            "neck": {"backbone_channel_list": [256, 128, 64, 32]},
        }
    }


__all__ = [
    "CONFIG_FILES",
    "SAM2AutomaticMaskGenerator",
    "SAM2Base",
    "SAM2ImagePredictor",
    "build_official_sam2",
    "instantiate",
    "official_config",
    "small_hiera",
]
