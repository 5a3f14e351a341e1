"""The family table's timings: every preset of every registered family on this CPU, built with random weights (the
times do not depend on the values), with the fast paths as `load_sam` applies them. For each preset: the image
encoder on one padded input and one box prompt's decode, in fp32 and in bf16 (the whole model cast), the median of
`--repeats` runs after one warm-up. Prints the markdown table of docs/families.md: parameters, input size, the
four times, the official checkpoint files and their licences (`finesam models`' facts).

    python benchmarks/bench_families.py                                  # every preset (ViT-H too: minutes)
    python benchmarks/bench_families.py --presets vit_tiny vit_b --repeats 5

Nothing here names a family: the presets come from the registry.
"""

import argparse
import platform
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference"), str(Path(__file__).resolve().parent)]

import torch

from finesam.cli.models import PresetFacts, preset_facts
from finesam.fast import apply_fast_paths
from finesam.model.prompts import Prompts
from finesam.model.registry import families
from finesam.model.sam import SegmentAnything, build_sam

from bench import median_ms


def cpu_name() -> str:
    """The CPU's model name (Linux), the cores torch uses, and the precisions the CPU has natively."""
    name = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if lines:
            name = lines[0].split(":", 1)[1].strip()
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


@torch.no_grad()
def time_preset(model: SegmentAnything, repeats: int) -> tuple[float, float]:
    """(encoder ms, one-box decode ms) of `model` in its current precision."""
    size, frame = model.encoder_input_size, model.config.image_size  # the encoder's input; the prompts' frame
    dtype = model.image_encoder.dtype or torch.float32
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    box = Prompts(boxes=torch.tensor([[0.1 * frame, 0.2 * frame, 0.7 * frame, 0.9 * frame]]))
    encoder = median_ms(lambda: model.encode(pixels), repeats)
    embedding = model.encode(pixels)
    features = model.image_features()
    decode = median_ms(lambda: model.decode(embedding, box, image_features=features), 5 * repeats)
    return encoder, decode


def measure(facts: PresetFacts, repeats: int) -> list[float]:
    """[encoder fp32, encoder bf16, one box fp32, one box bf16] in milliseconds."""
    torch.manual_seed(0)
    model = build_sam(facts.preset).eval()
    apply_fast_paths(model)
    encoder32, box32 = time_preset(model, repeats)
    model.to(dtype=torch.bfloat16)
    encoder16, box16 = time_preset(model, repeats)
    return [encoder32, encoder16, box32, box16]


HEADER = (
    "| family | preset | parameters (encoder + prompt / decoder) | input | encoder fp32 | encoder bf16 "
    "| 1 box fp32 | 1 box bf16 | official checkpoints (licence) |"
)


def row(facts: PresetFacts, times: list[float] | None) -> str:
    cells = [f"{t:,.0f} ms" if t >= 100 else f"{t:.1f} ms" for t in times] if times else ["-"] * 4
    parameters = f"{facts.parameters / 1e6:.1f} M ({facts.encoder_parameters / 1e6:.1f} M + "
    parameters += f"{facts.decoder_parameters / 1e6:.1f} M)"
    files = facts.files.replace(", ", "<br>")
    return f"| `{facts.family.name}` | `{facts.preset.name}` | {parameters} | {facts.input_size} | " + (
        " | ".join(cells) + f" | {files} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", metavar="NAME", help="only these presets (default: every one)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the decode: 5x as many)")
    parser.add_argument("--no-times", action="store_true", help="the table without timings (no model is built)")
    args = parser.parse_args()
    every = [facts for family in families().values() for facts in preset_facts(family)]
    known = {facts.preset.name for facts in every}
    if unknown := [name for name in args.presets or [] if name not in known]:
        parser.error(f"unknown presets {unknown}; the registered ones: {', '.join(sorted(known))}")
    chosen = [facts for facts in every if args.presets is None or facts.preset.name in args.presets]
    print(f"CPU: {cpu_name()}", file=sys.stderr)
    print(HEADER)
    print("|" + "---|" * HEADER.count(" |"))
    for facts in chosen:
        times = None if args.no_times else measure(facts, args.repeats)
        print(row(facts, times), flush=True)


if __name__ == "__main__":
    main()
