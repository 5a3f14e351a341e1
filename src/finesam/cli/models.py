"""`finesam models`: the registered encoder families, their presets and the official files each reads."""

import argparse

from finesam.cli.options import Commands, add_command
from finesam.model.registry import EncoderFamily, families
from finesam.model.sam import build_sam
from finesam.weights.layouts import layout_of


def model_rows(family: EncoderFamily) -> list[tuple[str, str, str, str]]:
    """(preset, parameters, what it is, official files) for each preset of `family`; the parameters are
    counted on a model built on `meta` (no memory, no weights)."""
    checkpoints = layout_of(family.name).checkpoints
    rows = []
    for preset in family.presets:
        parameters = sum(p.numel() for p in build_sam(preset, device="meta").parameters())
        files = ", ".join(c.filename for c in checkpoints if c.preset == preset.name) or "-"
        rows.append((preset.name, f"{parameters:,}", f"{preset.encoder.describe()}, input {preset.image_size}", files))
    return rows


def run_models(args: argparse.Namespace) -> None:
    del args
    header = ("preset", "parameters", "encoder", "official files")
    for family in families().values():
        print(f"{family.name}: {family.title}")
        rows = [header, *model_rows(family)]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[3])


def add_commands(commands: Commands) -> None:
    models = add_command(
        commands,
        "models",
        "list the encoder families, their presets and the official checkpoint files each reads",
    )
    models.set_defaults(run=run_models)
