"""The official checkpoint layout of the `slimsam` family: the `-uniform` releases are state dicts in SAM's own
key layout (`image_encoder.blocks.*`, ...), with pruned widths; the key map is the ViT's.

The original SlimSAM-50 / SlimSAM-77 files (global pruning) are whole pickled models of SlimSAM's fork of the
`segment_anything` package: they are refused (nothing but plain weights is ever unpickled), naming the
`-uniform` files to use instead.
"""

from collections.abc import Mapping

from torch import Tensor

from finesam.model.families.slimsam import FAMILY, SlimSAMConfig
from finesam.weights.io import CheckpointError
from finesam.weights.layouts import Checkpoint, CheckpointLayout
from finesam.weights.layouts import vit as vit_layout

# SAM's own ViTs all have MLPs 4x their width; SlimSAM prunes the two widths apart
_VIT_MLP_RATIO = 4


def _config(state_dict: Mapping[str, Tensor]) -> tuple[SlimSAMConfig, int]:
    shape = vit_layout.vit_shape(state_dict)
    image_size = shape.pop("image_size")
    return SlimSAMConfig(**shape), image_size


def recognises(state_dict: Mapping[str, Tensor]) -> bool:
    """A ViT-layout checkpoint whose MLP width is not 4x its width, or whose encoder is a SlimSAM release's
    (SlimSAM-50 keeps the ratio: 384 / 1536)."""
    if not vit_layout.recognises(state_dict):
        return False
    try:
        config, _ = _config(state_dict)
    except (CheckpointError, ValueError):
        return False  # a broken ViT checkpoint: the ViT layout names what is wrong
    releases = {preset.encoder for preset in FAMILY.presets}
    return config.mlp_dim != _VIT_MLP_RATIO * config.dim or config in releases


def whole_model_hint(global_name: str) -> str | None:
    """SlimSAM's repository pickles whole models of its `segment_anything` fork (SlimSAM-50.pth, SlimSAM-77.pth)."""
    if not global_name.startswith(("segment_anything.", "segment_anything_kd.")):
        return None
    return (
        f"it holds a {global_name} object, as the original SlimSAM-50 / SlimSAM-77 files do. Use SlimSAM's "
        "state-dict releases SlimSAM-50-uniform.pth / SlimSAM-77-uniform.pth (`finesam download slimsam_50_uniform` "
        "or `slimsam_77_uniform`), or save the model's state_dict() with the code that made it"
    )


def _drive(file_id: str) -> str:
    # Google Drive's direct download (`confirm=t` skips the page it shows before files it cannot scan)
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


LAYOUT = CheckpointLayout(
    family="slimsam",
    recognises=recognises,
    infer_encoder=_config,
    modules=vit_layout.modules,
    rules=vit_layout.rules,
    whole_model_hint=whole_model_hint,
    # the ViT's layout claims every ViT-layout checkpoint: this refinement is asked first
    priority=vit_layout.LAYOUT.priority + 1,
    # hosted on Google Drive by SlimSAM's authors (README, "Local Pruning Models"); no size or SHA-256 is published
    # (each download is checked for a whole checkpoint and its SHA-256 printed). The Hub copies
    # (Zigeng/SlimSAM-uniform-50, -77) hold the same weights in HF transformers' own key layout.
    checkpoints=(
        Checkpoint(
            "slimsam_50_uniform",
            _drive("1Ld7Q2LY8H2nu4zB6VxwwA5npS5A9OHFq"),
            None,
            None,
            "SlimSAM-50 (uniform pruning)",
            preset="vit_p50",
            file="SlimSAM-50-uniform.pth",
        ),
        Checkpoint(
            "slimsam_77_uniform",
            _drive("1OeWpfk5WhdlMz5VvYmb9gaE6suzHB0sp"),
            None,
            None,
            "SlimSAM-77 (uniform pruning)",
            preset="vit_p77",
            file="SlimSAM-77-uniform.pth",
        ),
    ),
)
