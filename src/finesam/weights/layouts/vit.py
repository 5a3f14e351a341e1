"""The official checkpoint layout of the `vit` family: `segment_anything`'s `ImageEncoderViT` keys."""

from collections.abc import Mapping
from typing import Any

from refiners.fluxion import layers as fl
from torch import Tensor

from finesam.model.config import ViTConfig
from finesam.model.image_encoder import RelativePositionAttention, TransformerBlock
from finesam.model.registry import EncoderChain
from finesam.weights.io import CheckpointError
from finesam.weights.key_map import Rule
from finesam.weights.layouts import Checkpoint, CheckpointLayout, KeyOf, count, neck_modules, shape_of


def recognises(state_dict: Mapping[str, Tensor]) -> bool:
    """A ViT image encoder: numbered transformer blocks under `image_encoder.blocks`."""
    return any(key.startswith("image_encoder.blocks.") for key in state_dict)


def vit_shape(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """The ViT hyper-parameters the tensor shapes hold, `mlp_dim` (the MLP width) and `image_size` included."""
    dim, _, patch, _ = shape_of(state_dict, "image_encoder.patch_embed.proj.weight")
    grid = shape_of(state_dict, "image_encoder.pos_embed")[1]
    depth = count(state_dict, r"image_encoder\.blocks\.(\d+)\.norm1\.weight")
    rel_pos = [shape_of(state_dict, f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    global_blocks = tuple(i for i, (length, _) in enumerate(rel_pos) if length == 2 * grid - 1)
    windows = {(length + 1) // 2 for length, _ in rel_pos if length != 2 * grid - 1}
    if len(windows) > 1:
        raise CheckpointError(f"blocks use different window sizes {sorted(windows)}; finesam supports one")
    head_dim = rel_pos[0][1] if rel_pos else dim
    return {
        "dim": dim,
        "depth": depth,
        "heads": dim // head_dim,
        "global_attention_blocks": global_blocks,
        "window_size": windows.pop() if windows else ViTConfig.window_size,
        "mlp_dim": shape_of(state_dict, "image_encoder.blocks.0.mlp.lin1.weight")[0],
        "patch_size": patch,
        "image_size": grid * patch,
    }


def infer_encoder(state_dict: Mapping[str, Tensor]) -> tuple[ViTConfig, int]:
    shape = vit_shape(state_dict)
    image_size, mlp_dim = shape.pop("image_size"), shape.pop("mlp_dim")
    return ViTConfig(**shape, mlp_ratio=mlp_dim / shape["dim"]), image_size


def modules(encoder: EncoderChain[Any]) -> list[tuple[str, fl.Module]]:
    """Patch embedding, blocks and neck: `ImageEncoder`'s modules by the structure of the chain."""
    pairs: list[tuple[str, fl.Module]] = [
        ("image_encoder.patch_embed.proj", encoder.layer(("PatchEmbedding", "Conv2d"), fl.Conv2d))
    ]
    for i, (block, _) in enumerate(encoder.walk(TransformerBlock)):
        norm1, norm2 = block.layers(fl.LayerNorm)
        qkv, proj, lin1, lin2 = block.layers(fl.Linear)
        prefix = f"image_encoder.blocks.{i}"
        pairs += [
            (f"{prefix}.norm1", norm1),
            (f"{prefix}.attn.qkv", qkv),
            (f"{prefix}.attn", block.ensure_find(RelativePositionAttention)),
            (f"{prefix}.attn.proj", proj),
            (f"{prefix}.norm2", norm2),
            (f"{prefix}.mlp.lin1", lin1),
            (f"{prefix}.mlp.lin2", lin2),
        ]
    return pairs + neck_modules(encoder)


def rules(encoder: EncoderChain[Any], key: KeyOf) -> dict[str, Rule]:
    """The position embedding: (1, grid, grid, dim) officially, without the batch dimension here."""
    position = encoder.layer(("PositionEmbedding", "Parameter"), fl.Parameter)
    return {key(position, "weight"): Rule(("image_encoder.pos_embed",), lambda t: t[0])}


_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"
_HQ_REPO = "lkeab/hq-sam"
_HQ = f"https://huggingface.co/{_HQ_REPO}/resolve/main/"

LAYOUT = CheckpointLayout(
    family="vit",
    recognises=recognises,
    infer_encoder=infer_encoder,
    modules=modules,
    rules=rules,
    checkpoints=(
        Checkpoint(
            "sam_vit_b",
            _SAM + "sam_vit_b_01ec64.pth",
            375042383,
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            "SAM ViT-B",
            preset="vit_b",
        ),
        Checkpoint(
            "sam_vit_l",
            _SAM + "sam_vit_l_0b3195.pth",
            1249524607,
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            "SAM ViT-L",
            preset="vit_l",
        ),
        Checkpoint(
            "sam_vit_h",
            _SAM + "sam_vit_h_4b8939.pth",
            2564550879,
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            "SAM ViT-H",
            preset="vit_h",
        ),
        Checkpoint("sam_hq_vit_b", _HQ + "sam_hq_vit_b.pth", None, None, "HQ-SAM ViT-B", _HQ_REPO, "vit_b"),
        Checkpoint("sam_hq_vit_l", _HQ + "sam_hq_vit_l.pth", None, None, "HQ-SAM ViT-L", _HQ_REPO, "vit_l"),
        Checkpoint("sam_hq_vit_h", _HQ + "sam_hq_vit_h.pth", None, None, "HQ-SAM ViT-H", _HQ_REPO, "vit_h"),
    ),
)
