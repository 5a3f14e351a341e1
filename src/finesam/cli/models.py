"""`finesam models`: the family table. Every registered encoder family, each of its presets with its parameters
(image encoder; prompt encoder and mask decoder), input size and the official files that hold its weights, with
their licences; then the decoders of the catalogue that pair with an encoder (MobileSAMv2's)."""

import argparse
from dataclasses import dataclass

from finesam.cli.options import Commands, add_command
from finesam.model.config import SAMConfig
from finesam.model.registry import EncoderFamily, families
from finesam.model.sam import build_sam
from finesam.weights.download import CHECKPOINTS
from finesam.weights.layouts import Checkpoint, layout_of
from finesam.weights.mobilesamv2 import sam1_decoder_families


@dataclass(frozen=True)
class PresetFacts:
    """What the family table says of one preset (`finesam models`, `benchmarks/bench_families.py`)."""

    family: EncoderFamily
    preset: SAMConfig
    encoder_parameters: int
    decoder_parameters: int  # the prompt encoder's and the mask decoder's (everything after the image encoder)
    input_size: int  # the side of the image encoder's input (EfficientViT-SAM L: 512; prompts stay in image_size)
    checkpoints: tuple[Checkpoint, ...]  # the official files holding its weights

    @property
    def parameters(self) -> int:
        return self.encoder_parameters + self.decoder_parameters

    @property
    def files(self) -> str:
        """The official files with their licences, e.g. `sam_vit_b_01ec64.pth (Apache-2.0)`; `-` when none."""
        return ", ".join(f"{c.filename} ({c.licence})" for c in self.checkpoints) or "-"


def preset_facts(family: EncoderFamily) -> list[PresetFacts]:
    """The facts of each preset of `family`; the parameters are counted on a model built on `meta` (no memory,
    no weights)."""
    checkpoints = layout_of(family.name).checkpoints
    facts = []
    for preset in family.presets:
        model = build_sam(preset, device="meta")
        encoder = sum(p.numel() for p in model.image_encoder.parameters())
        total = sum(p.numel() for p in model.parameters())
        files = tuple(c for c in checkpoints if c.preset == preset.name)
        facts.append(PresetFacts(family, preset, encoder, total - encoder, model.encoder_input_size, files))
    return facts


HEADER = ("preset", "parameters", "encoder", "prompt+decoder", "input", "image encoder", "official files (licence)")


def model_rows(family: EncoderFamily) -> list[tuple[str, ...]]:
    """One row of `finesam models` (the cells of `HEADER`) for each preset of `family`."""
    return [
        (
            f.preset.name,
            f"{f.parameters:,}",
            f"{f.encoder_parameters:,}",
            f"{f.decoder_parameters:,}",
            str(f.input_size),
            f.preset.encoder.describe(),
            f.files,
        )
        for f in preset_facts(family)
    ]


def decoder_lines() -> list[str]:
    """The decoders of the catalogue (files that pair with an encoder of another release), one line each."""
    takers = ", ".join(sam1_decoder_families())
    return [
        f"  {c.filename} ({c.licence}): {c.description}; pairs with the encoders of {takers}"
        for c in CHECKPOINTS.values()
        if c.decoder
    ]


def run_models(args: argparse.Namespace) -> None:
    del args
    for family in families().values():
        print(f"{family.name}: {family.title}")
        rows = [HEADER, *model_rows(family)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
        for row in rows:
            *cells, files = row
            # numbers to the right, words to the left; the files last, as long as they are
            padded = [
                cell.rjust(w) if 0 < i < 5 else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            ]
            print("  " + "  ".join(padded) + "  " + files)
    if lines := decoder_lines():
        print("decoders (finesam convert ENCODER --decoder FILE):")
        print("\n".join(lines))


def add_commands(commands: Commands) -> None:
    models = add_command(
        commands,
        "models",
        "the family table: presets, parameters, input sizes, official checkpoint files and their licences",
    )
    models.set_defaults(run=run_models)
