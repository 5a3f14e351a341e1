"""The same inference figures for two source trees of finesam (two commits), in alternating child processes.

    python benchmarks/bench_ab.py OLD_TREE NEW_TREE [--size vit_b] [--rounds 3]

Each tree is a checkout of the project (its `src/` goes first on the child's path). The weights are random
official ones, saved once by this process (SAM as a finesam file, HQ-SAM as the official `.pth`, which every
tree reads); each child loads them with its own tree's
`load_sam` / `load_hq` (with whatever that tree applies by default) and times the image encoder, a one-box
decode, an HQ-SAM box and 16 boxes, with the TinyViT encoder. Children alternate (old, new, old, new, ...), so
both see the same machine load; the table gives the median over rounds of each child's median and the ratio
new / old. For changes meant to keep speed (a refactoring): ratios near 1.00 within the machine's noise.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference")]

CHILD = r"""
import json, statistics, sys, time
import torch
from PIL import Image
from finesam.model.prompts import Prompts
from finesam.weights import load_hq, load_sam

def median_ms(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)

folder = sys.argv[1]
pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
image = Image.fromarray((torch.rand(768, 1024, 3, generator=torch.Generator().manual_seed(1)) * 255).byte().numpy())
one = Prompts(boxes=torch.tensor([[100.0, 200.0, 900.0, 700.0]]))
corners = torch.rand(16, 2, 2, generator=torch.Generator().manual_seed(2)).sort(dim=1).values
many = Prompts(boxes=corners.reshape(16, 4) * 1000)
result = {}
with torch.no_grad():
    sam = load_sam(f"{folder}/sam.safetensors")
    result["encoder"] = median_ms(lambda: sam.encode(pixels), 2)
    embedding = sam.encode_image(image)
    decode = lambda prompts: sam.decode(embedding.embedding, prompts, image_features=embedding.features)
    result["1 box"] = median_ms(lambda: decode(one), 30)
    result["16 boxes"] = median_ms(lambda: decode(many), 5)
    hq = load_hq(sam, f"{folder}/sam_hq.pth").inject()  # the official file: every tree reads it
    embedding = sam.encode_image(image)
    result["HQ 1 box"] = median_ms(lambda: decode(one), 30)
    hq.eject()
    tiny = load_sam(f"{folder}/tiny.safetensors")
    result["TinyViT encoder"] = median_ms(lambda: tiny.encode(pixels), 3)
print(json.dumps(result))
"""


def write_weights(folder: Path, size: str) -> None:
    import torch

    from finesam.weights import save_sam
    from finesam.weights.loading import sam_from_state_dict

    from official import build_official_tiny, random_official

    official = random_official(size, seed=0, hq=True)
    save_sam(sam_from_state_dict(official.state_dict()), folder / "sam.safetensors")
    torch.save(official.state_dict(), folder / "sam_hq.pth")
    save_sam(sam_from_state_dict(build_official_tiny(seed=0).state_dict()), folder / "tiny.safetensors")


def run_child(tree: Path, folder: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(f"the child of {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="The same inference figures for two source trees of finesam.")
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--size", default="vit_b")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_weights(folder, args.size)
        runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
        for round_ in range(args.rounds):
            for side in ("old", "new"):
                runs[side].append(run_child(getattr(args, side), folder))
                print(f"round {round_ + 1} {side}: {runs[side][-1]}", file=sys.stderr)
    print(f"| figure ({args.size}) | old ms | new ms | new / old |")
    print("|---|---|---|---|")
    for figure in runs["old"][0]:
        old = statistics.median(r[figure] for r in runs["old"])
        new = statistics.median(r[figure] for r in runs["new"])
        print(f"| {figure} | {old:.1f} | {new:.1f} | {new / old:.3f} |")


if __name__ == "__main__":
    main()
