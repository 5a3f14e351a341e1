"""Every registered encoder family through the same checks, and `finesam models` listing them."""

import torch

from finesam.model.registry import families
from finesam.weights.layouts import layout_of

from helpers import finesam
from official import OFFICIAL_BUILDERS


def _rows(stdout: str) -> dict[str, str]:
    """The output lines of `finesam models` by their first word (a preset name, or a family header)."""
    return {line.split()[0].rstrip(":"): line for line in stdout.splitlines() if line.strip()}


def test_models_lists_every_family_preset_and_the_files_it_reads():
    result = finesam("models")
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    for family in families().values():
        assert rows[family.name].startswith(f"{family.name}: {family.title}")
        files = layout_of(family.name).checkpoints
        for preset in family.presets:
            row = rows[preset.name]
            assert preset.encoder.describe() in row
            for checkpoint in (c for c in files if c.preset == preset.name):
                assert checkpoint.filename in row
    # the official files, as their releases name them
    assert "sam_vit_b_01ec64.pth" in rows["vit_b"] and "sam_hq_vit_b.pth" in rows["vit_b"]
    assert "mobile_sam.pt" in rows["vit_tiny"] and "sam_hq_vit_tiny.pth" in rows["vit_tiny"]
    # the parameter counts are the official models'
    for name in ("vit_b", "vit_h"):
        with torch.device("meta"):
            official = OFFICIAL_BUILDERS[name]()
        assert f" {sum(p.numel() for p in official.parameters()):,} " in rows[name]
