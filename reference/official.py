"""Access to the official `segment_anything` and `segment_anything_hq` packages: the reference that the parity
tests, the benchmarks and the conversion check compare finesam with.

The official packages import torchvision at import time (for a PIL resize and for NMS in the automatic mask
generator), and segment_anything_hq imports timm for TinyViT, but their model code never needs them;
torchvision has no CPU build that loads with our torch. `install_stand_ins` registers tiny modules in their
place: `resize` is the PIL bilinear resize torchvision performs on PIL images, which is what `SamPredictor`
uses; `batched_nms` and `box_area` are plain reference versions of torchvision's, for the official
`SamAutomaticMaskGenerator`.
"""

import sys
import types
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from finesam.model.config import SAMConfig


def _to_pil_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array)


def _resize(image: Image.Image, size: tuple[int, int] | list[int]) -> Image.Image:
    height, width = size
    return image.resize((width, height), Image.Resampling.BILINEAR)


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    """torchvision's `box_area`: (x2 - x1) * (y2 - y1) of x1, y1, x2, y2 boxes, in their dtype."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision's `batched_nms`, written plainly as the reference for the automatic mask generator tests.

    Boxes of different categories never overlap (each category is shifted by more than the largest coordinate);
    then greedy NMS: visit boxes by descending score (ties in input order), keep a box unless an already kept
    box overlaps it with IoU > `iou_threshold`, computed in the boxes' precision as torchvision does. Returns the
    kept indices by descending score.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    shifted = (boxes + (idxs.to(boxes) * (boxes.max() + 1))[:, None]).numpy()
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    kept: list[int] = []
    with np.errstate(invalid="ignore"):  # 0 / 0 for two empty boxes: NaN, which suppresses nothing
        _greedy(shifted, area, torch.sort(scores, descending=True, stable=True).indices.tolist(), iou_threshold, kept)
    return torch.tensor(kept, dtype=torch.int64)


def _greedy(boxes: np.ndarray, area: np.ndarray, order: list[int], iou_threshold: float, kept: list[int]) -> None:
    for i in order:
        x1, y1, x2, y2 = boxes[i]
        suppressed = False
        for j in kept:
            width = max(min(x2, boxes[j, 2]) - max(x1, boxes[j, 0]), 0)
            height = max(min(y2, boxes[j, 3]) - max(y1, boxes[j, 1]), 0)
            inter = width * height
            if inter / (area[j] + area[i] - inter) > iou_threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)


class _DropPath(torch.nn.Module):
    """timm's stochastic depth; identity in eval mode, which is how the parity tests run."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training, "DropPath stand-in only supports eval mode"
        return x


def _to_2tuple(x: Any) -> tuple[Any, Any]:
    return tuple(x) if isinstance(x, tuple | list) else (x, x)  # type: ignore[return-value]


def install_stand_ins() -> None:
    """torchvision (for segment_anything and segment_anything_hq) and timm (for the HQ package's TinyViT)."""
    if "torchvision" in sys.modules:
        return
    attributes: dict[str, dict[str, Any]] = {
        "torchvision": {},
        "torchvision.transforms": {},
        "torchvision.transforms.functional": {"resize": _resize, "to_pil_image": _to_pil_image},
        "torchvision.ops": {},
        "torchvision.ops.boxes": {"batched_nms": _batched_nms, "box_area": _box_area},
        "timm": {},
        "timm.models": {},
        "timm.models.layers": {
            "DropPath": _DropPath,
            "to_2tuple": _to_2tuple,
            "trunc_normal_": torch.nn.init.trunc_normal_,
        },
        "timm.models.registry": {"register_model": lambda fn: fn},
    }
    for name, members in attributes.items():
        module = types.ModuleType(name)
        module.__dict__.update(members)
        sys.modules[name] = module


install_stand_ins()

import segment_anything  # noqa: E402
import segment_anything.modeling  # noqa: E402
import segment_anything_hq  # noqa: E402
import segment_anything_hq.modeling  # noqa: E402
from segment_anything.modeling import MaskDecoder  # noqa: E402
from segment_anything_hq.modeling import MaskDecoderHQ  # noqa: E402

SamPredictor = segment_anything.SamPredictor
HQSamPredictor = segment_anything_hq.SamPredictor


def build_official(config: SAMConfig, seed: int = 0, hq: bool = False) -> Any:  # an official Sam of either package
    """The official model for `config` (HQ-SAM with `hq`), random weights with every parameter perturbed, in eval
    mode.

    Zero- and one-initialised tensors (norms, biases, tokens, relative positions) get noise too, so that a
    weight mapped to the wrong place changes the output.
    """
    package: Any = segment_anything_hq.modeling if hq else segment_anything.modeling  # either package's classes
    encoder: Any = config.encoder  # a ViTShape: ViTConfig, or a pruned ViT's config
    decoder = config.decoder
    if not hasattr(encoder, "mlp_dim") or not hasattr(encoder, "global_attention_blocks"):
        raise TypeError("build_official builds the ViT models and pruned ViTs (TinyViT: build_official_tiny)")
    torch.manual_seed(seed)
    grid = config.embedding_size
    transformer = package.TwoWayTransformer(
        depth=decoder.depth,
        embedding_dim=decoder.prompt_dim,
        mlp_dim=decoder.mlp_dim,
        num_heads=decoder.heads,
    )
    decoder_options: dict[str, Any] = dict(
        num_multimask_outputs=decoder.num_multimask_outputs,
        transformer=transformer,
        transformer_dim=decoder.prompt_dim,
        iou_head_depth=decoder.iou_head_depth,
        iou_head_hidden_dim=decoder.iou_head_hidden_dim,
    )
    sam = package.Sam(
        image_encoder=package.ImageEncoderViT(
            img_size=config.image_size,
            patch_size=encoder.patch_size,
            embed_dim=encoder.dim,
            depth=encoder.depth,
            num_heads=encoder.heads,
            mlp_ratio=_mlp_ratio(encoder.dim, encoder.mlp_dim),
            out_chans=decoder.prompt_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=encoder.window_size,
            global_attn_indexes=encoder.global_attention_blocks,
        ),
        prompt_encoder=package.PromptEncoder(
            embed_dim=decoder.prompt_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=decoder.mask_in_channels,
        ),
        mask_decoder=(MaskDecoderHQ(**decoder_options, vit_dim=encoder.dim) if hq else MaskDecoder(**decoder_options)),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    perturb(sam, seed)
    return sam.eval()


def _mlp_ratio(dim: int, mlp_dim: int) -> float:
    """The `mlp_ratio` for which the official `int(dim * mlp_ratio)` is `mlp_dim` (SlimSAM's pruned widths are
    not a round ratio of each other; its own code takes `mlp_dim` instead)."""
    ratio = mlp_dim / dim
    while int(dim * ratio) < mlp_dim:  # a quotient rounded down can multiply back to just below mlp_dim
        ratio = float(np.nextafter(ratio, np.inf))
    assert int(dim * ratio) == mlp_dim, (dim, mlp_dim)
    return ratio


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    """Adds noise to every floating-point tensor; scaled so activations stay in a sane range."""
    generator = torch.Generator().manual_seed(seed + 1)
    for tensor in model.state_dict().values():
        if not tensor.is_floating_point():
            continue
        constant = bool((tensor == tensor.flatten()[0]).all())  # zero/one initialised
        scale = 0.1 if constant else 0.02
        noise = torch.randn(tensor.shape, generator=generator) * scale
        tensor.add_(noise.to(tensor.dtype))


def structured(official: Any) -> Any:
    """The official model with every transposed-convolution kernel of its decoder made spatially constant (in
    place; returned for convenience), for the automatic mask generator's tests and benchmark.

    With plain random weights each image token upscales to the same checkerboard-like pattern, so every mask
    spans the whole image and NMS leaves one; without that pattern the masks follow the photo and the point,
    and dozens of distinct masks survive.
    """
    with torch.no_grad():
        for module in official.mask_decoder.modules():
            if isinstance(module, torch.nn.ConvTranspose2d):
                module.weight.copy_(module.weight[:, :, :1, :1].expand_as(module.weight))
    return official


OFFICIAL_BUILDERS = {
    "vit_b": segment_anything.build_sam_vit_b,
    "vit_l": segment_anything.build_sam_vit_l,
    "vit_h": segment_anything.build_sam_vit_h,
}
OFFICIAL_HQ_BUILDERS = {
    "vit_b": segment_anything_hq.build_sam_vit_b,
    "vit_l": segment_anything_hq.build_sam_vit_l,
    "vit_h": segment_anything_hq.build_sam_vit_h,
}


def random_official(name: str, seed: int = 0, hq: bool = False) -> Any:  # an official Sam of either package
    """An official full-size model built by the package's own builder, with cheap random weights.

    Built on the meta device and filled afterwards (small Gaussian weights, norms near one), which is much
    faster than the official initialisation for ViT-H.
    """
    with torch.device("meta"):
        sam = (OFFICIAL_HQ_BUILDERS if hq else OFFICIAL_BUILDERS)[name]()
    generator = torch.Generator().manual_seed(seed)
    norms = {
        f"{prefix}.weight"
        for prefix, module in sam.named_modules()
        if isinstance(module, torch.nn.LayerNorm) or type(module).__name__ == "LayerNorm2d"
    }
    weights = {
        key: (1.0 if key in norms else 0.0)
        + torch.randn(t.shape, generator=generator) * (0.1 if key in norms else 0.02)
        for key, t in sam.state_dict().items()
    }
    sam.load_state_dict(weights, assign=True)
    return sam.eval()


def build_official_tiny(seed: int = 0) -> Any:
    """Official Light HQ-SAM (`vit_tiny`: TinyViT + HQ decoder), random weights and BatchNorm statistics
    perturbed, in eval mode.

    `.eval()` runs after the weights are set: TinyViT caches its attention biases when switched to eval mode
    (the official builder switches before loading a checkpoint, so it keeps the initial biases).
    """
    torch.manual_seed(seed)
    sam = segment_anything_hq.sam_model_registry["vit_tiny"]()
    perturb(sam, seed)
    return sam.eval()


def narrow_official_tiny_vit(seed: int) -> Any:
    """A narrow official TinyViT (the HQ package's, which keeps its early embedding), seeded and perturbed, in
    eval mode: it only runs at 1024 (its grid is written into the code), so the widths are small; the last stage
    keeps 320 channels (the official rule of no downsampling at that width)."""
    torch.manual_seed(seed)
    encoder = segment_anything_hq.modeling.TinyViT(
        img_size=1024,
        embed_dims=[16, 32, 40, 320],
        depths=[1, 1, 1, 1],
        num_heads=[1, 2, 2, 4],
        window_sizes=[7, 7, 14, 7],
        drop_path_rate=0.0,
    )
    perturb(encoder, seed)
    return encoder.eval()  # after the weights are set: the attention biases are cached in eval mode


class _EncoderOnly(torch.nn.Module):
    """The HQ package's TinyViT returns (embedding, early embeddings); plain SAM wants the embedding only."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.img_size = encoder.img_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[0]


def mobile_sam_from(tiny_hq: Any) -> Any:
    """Official MobileSAM (TinyViT + plain SAM decoder) sharing the weights of an official Light HQ-SAM."""
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=segment_anything.modeling.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
    )
    decoder.load_state_dict({k: v for k, v in tiny_hq.mask_decoder.state_dict().items() if k in decoder.state_dict()})
    encoder: Any = _EncoderOnly(tiny_hq.image_encoder)  # an encoder of the other package, in the role of SAM's
    return segment_anything.modeling.Sam(
        image_encoder=encoder,
        prompt_encoder=tiny_hq.prompt_encoder,
        mask_decoder=decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()
