"""Every speed figure of finesam against the official implementations, for one model size, as one table.

    python benchmarks/bench.py [--size vit_b] [--repeats 3] [--compile] [--drift-count 50] [--skip loading,...]
                               [--device cuda]

Same random weights and same inputs for every side, in the same process (loading and memory: fresh child
processes); official, finesam and HF transformers runs alternate after a warm-up of each, so all see the same
load. Each row gives the median time of each side, the ratios finesam / official and finesam / HF (lower is
better), the goal and the deviation of finesam's output (and HF's). Parts: encoder, bf16, int8, compile (only
with --compile: minutes), prompts, hq, loading, memory. The HF column needs `pip install transformers` (see
hf_transformers.py); without it the column stays empty. Needs the official packages (`make test` installs
them) and, for the photo rows, the photos
of `$FINESAM_BENCH_IMAGES` (default: ../shared/images beside the project; without them a random image is
used, and said). On a GPU (`--device cuda`) every timed run ends with a synchronisation, and loading and
memory (CPU process figures) are left out.
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "reference"), str(Path(__file__).resolve().parent)]
from finesam.adapters.hq import HQSAMAdapter
from finesam.evaluation.metrics import mask_iou
from finesam.fast import apply_fast_paths
from finesam.model import SegmentAnything
from finesam.model.prompts import Prompts
from finesam.weights.hq import convert_hq_state_dict
from finesam.weights.loading import sam_from_state_dict
from hf_transformers import hf_sam, transformers

import bench_loading
import bench_memory
from official import HQSamPredictor, SamPredictor, build_official_tiny, random_official

PARTS = ("encoder", "bf16", "int8", "compile", "prompts", "hq", "loading", "memory")
# the photos of the published figures (docs/performance.md); not part of the project
IMAGES = Path(os.environ.get("FINESAM_BENCH_IMAGES", Path(__file__).resolve().parents[2] / "shared" / "images"))
PHOTOS = ("truck.jpg", "dog.jpg", "groceries.jpg")
BOX = np.array([100.0, 200.0, 1500.0, 1000.0])


@dataclass
class Row:
    figure: str
    official: str
    finesam: str
    ratio: float | None
    goal: str
    deviation: str
    hf: str = "-"  # HF transformers, where it has the feature
    hf_ratio: float | None = None


def synchronize() -> None:
    """Waits for queued GPU work, so that a timed run ends when its results exist."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def alternating_median_ms(*runs: Callable[[], object], repeats: int) -> list[float]:
    """Median times (ms) of functions run in turn after a warm-up of each, so that all see the same load."""
    for run in runs:
        run()
    synchronize()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, bucket in zip(runs, times, strict=True):
            start = time.perf_counter()
            run()
            synchronize()
            bucket.append(time.perf_counter() - start)
    return [1000 * statistics.median(bucket) for bucket in times]


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def timed(
    figure: str,
    official: Callable[[], object],
    ours: Callable[[], object],
    repeats: int,
    goal: str,
    deviation: str,
    per_second: str = "",
    hf: Callable[[], object] | None = None,
) -> Row:
    """A timing of official, finesam and (when given) HF transformers in turn, as a row; with `per_second`
    (e.g. "images") the rate of each side is shown too."""
    runs = (official, ours) if hf is None else (official, ours, hf)
    theirs_ms, ours_ms, *hf_ms = alternating_median_ms(*runs, repeats=repeats)

    def cell(ms: float) -> str:
        return f"{ms:.1f} ms" + (f" ({1000 / ms:.2f} {per_second}/s)" if per_second else "")

    row = Row(figure, cell(theirs_ms), cell(ours_ms), ours_ms / theirs_ms, goal, deviation)
    if hf_ms:
        row.hf, row.hf_ratio = cell(hf_ms[0]), ours_ms / hf_ms[0]
    return row


def official_decoder(predictor: Any, boxes: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """The official prompt encoder and mask decoder on the predictor's image, one mask per box: what
    `predict_torch` runs before it resizes the masks to the image and thresholds them. Our `decode` and HF's
    forward stop at the same low-resolution logits, so all three sides do the same work."""
    model = predictor.model
    hq = (
        {"hq_token_only": False, "interm_embeddings": predictor.interm_features}
        if isinstance(predictor, HQSamPredictor)
        else {}
    )

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
        return model.mask_decoder(
            image_embeddings=predictor.features,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            **hq,
        )

    return run


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def random_image() -> np.ndarray:
    """A random 1800x1200 RGB image, the size of the shared truck photo."""
    return np.random.default_rng(0).integers(0, 256, (1200, 1800, 3), dtype=np.uint8)


def photos() -> list[Image.Image]:
    """The benchmark photos found in `IMAGES` (truck.jpg first), or a random image when there are none."""
    found = [IMAGES / name for name in PHOTOS if (IMAGES / name).is_file()]
    if not found:
        print(f"no benchmark photos in {IMAGES} (set FINESAM_BENCH_IMAGES): a random image", file=sys.stderr)
        return [Image.fromarray(random_image())]
    return [Image.open(path).convert("RGB") for path in found]


class Bench:
    def __init__(self, size: str, repeats: int, drift_count: int, device: torch.device) -> None:
        self.size, self.repeats, self.drift_count, self.device = size, repeats, drift_count, device
        self.official = random_official(size, seed=0).to(device)
        self.pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0)).to(device)
        self.image = random_image()
        self.hf = None if transformers is None else hf_sam(self.official).to(device)
        if self.hf is None:
            print("transformers is not installed: no HF column (pip install transformers)", file=sys.stderr)

    def ours(self) -> SegmentAnything:
        """finesam as `load_sam` gives it: with the fast paths."""
        model = sam_from_state_dict(self.official.state_dict(), device=self.device)
        apply_fast_paths(model)
        return model

    def on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)

    def encoder(self) -> list[Row]:
        ours = self.ours()
        reference = self.official.image_encoder(self.pixels)
        deviation = f"max abs {(ours.encode(self.pixels) - reference).abs().max().item():.1e}"
        hf: Callable[[], Any] | None = None
        if (model := self.hf) is not None:
            hf = lambda: model.get_image_embeddings(self.pixels)  # noqa: E731
            deviation += f" (HF {(hf() - reference).abs().max().item():.1e})"
        rows = [
            timed(
                f"1. image encoder {self.size}, fp32",
                lambda: self.official.image_encoder(self.pixels),
                lambda: ours.encode(self.pixels),
                self.repeats,
                "<= 0.55, HF <= 0.70",
                deviation,
                per_second="images",
                hf=hf,
            )
        ]
        tiny_official = build_official_tiny(seed=0).to(self.device)
        tiny = sam_from_state_dict(tiny_official.state_dict(), device=self.device)
        apply_fast_paths(tiny)
        theirs = tiny_official.image_encoder(self.pixels)[0]  # segment_anything_hq's encoders also return features
        difference = (tiny.encode(self.pixels) - theirs).abs().max().item()
        run_official, run_ours = (lambda: tiny_official.image_encoder(self.pixels)), (lambda: tiny.encode(self.pixels))
        deviation = f"max abs {difference:.1e}"
        rows.append(timed("   image encoder TinyViT, fp32", run_official, run_ours, 5, "-", deviation, "images"))
        return rows

    @staticmethod
    def against_fp32(fp32: SegmentAnything, candidate: SegmentAnything) -> str:
        """Embedding cosine and final-mask IoU (one box per photo) of a reduced-precision model vs fp32."""
        cosines, ious = [], []
        for image in photos():
            reference, embedding = fp32.encode_image(image), candidate.encode_image(image)
            cosines.append(cosine(embedding.embedding, reference.embedding))
            width, height = image.size
            box = np.array([0.1 * width, 0.15 * height, 0.8 * width, 0.9 * height])
            pairs = ((fp32, reference), (candidate, embedding))
            masks = [m.predict(e, boxes=box).masks[0] for m, e in pairs]  # (M, H, W)
            ious.append(mask_iou(*masks).min().item())
        return f"cos >= {min(cosines):.5f}, mask IoU >= {min(ious):.3f} ({len(ious)} photos)"

    def bf16(self) -> list[Row]:
        fp32, bf16 = self.ours(), self.ours().set_encoder_dtype(torch.bfloat16)
        row = timed(
            "2. image encoder, bf16 (vs official fp32)",
            lambda: self.official.image_encoder(self.pixels),
            lambda: bf16.encode(self.pixels),
            self.repeats,
            "<= 0.12",
            self.against_fp32(fp32, bf16),
            per_second="images",
        )
        official_bf16 = copy.deepcopy(self.official.image_encoder).to(torch.bfloat16)
        pixels = self.pixels.to(torch.bfloat16)
        hf = None
        if self.hf is not None:
            hf_bf16 = copy.deepcopy(self.hf).to(torch.bfloat16)
            hf = lambda: hf_bf16.get_image_embeddings(pixels)  # noqa: E731
        both_bf16 = timed(
            "   image encoder, bf16 (vs official and HF in bf16)",
            lambda: official_bf16(pixels),
            lambda: bf16.encode(self.pixels),
            self.repeats,
            "HF <= 0.40",
            f"official bf16 vs our fp32: cos {cosine(official_bf16(pixels), fp32.encode(self.pixels)):.5f}",
            per_second="images",
            hf=hf,
        )
        return [row, both_bf16]

    def int8(self) -> list[Row]:
        fp32, int8 = self.ours(), self.ours().quantize_encoder()
        deviation = self.against_fp32(fp32, int8)
        return [
            timed(
                "2b. image encoder, int8 linears (vs official fp32)",
                lambda: self.official.image_encoder(self.pixels),
                lambda: int8.encode(self.pixels),
                self.repeats,
                "faster than bf16",
                deviation,
                per_second="images",
            ),
            timed(
                "    int8 vs our fp32 (finesam)",
                lambda: fp32.encode(self.pixels),
                lambda: int8.encode(self.pixels),
                self.repeats,
                "-",
                "",
                per_second="images",
            ),
        ]

    def compile(self) -> list[Row]:
        reference = self.ours().encode(self.pixels)
        compiled = self.ours().set_encoder_dtype(torch.bfloat16).compile_encoder()
        start = time.perf_counter()
        embedding = compiled.encode(self.pixels)
        compile_s = time.perf_counter() - start
        deviation = f"cos {cosine(embedding, reference):.5f}, compile {compile_s:.0f} s"
        run_official = lambda: self.official.image_encoder(self.pixels)  # noqa: E731
        run_ours = lambda: compiled.encode(self.pixels)  # noqa: E731
        return [timed("3. compiled encoder, bf16", run_official, run_ours, 3, "<= 0.08", deviation, "images")]

    def prompts(self) -> list[Row]:
        ours = self.ours()
        predictor = SamPredictor(self.official)
        predictor.set_image(self.image)
        embedding = ours.encode_image(Image.fromarray(self.image))
        boxes = torch.as_tensor(
            predictor.transform.apply_boxes(np.stack([BOX + i for i in range(64)]), predictor.original_size)
        )
        boxes = self.on_device(boxes.float())
        all_boxes, first_box = Prompts(boxes=boxes), Prompts(boxes=boxes[:1])
        one = ours.decode(embedding.embedding, first_box)[0]
        official_one, official_all = official_decoder(predictor, boxes[:1]), official_decoder(predictor, boxes)
        theirs_one = official_one()[0]
        batched = ours.decode(embedding.embedding, all_boxes)[0]
        singles = torch.cat([ours.decode(embedding.embedding, all_boxes[i : i + 1])[0] for i in range(64)])

        def our_singles() -> None:
            for i in range(64):
                ours.decode(embedding.embedding, all_boxes[i : i + 1])

        same = "identical masks" if torch.equal(batched > 0, singles > 0) else "MASKS DIFFER"
        one_deviation = f"max abs {(one - theirs_one).abs().max().item():.1e}"
        hf_one: Callable[[], Any] | None = None
        hf_all: Callable[[], Any] | None = None
        if (hf := self.hf) is not None:
            features = predictor.features
            hf_one = lambda: hf(image_embeddings=features, input_boxes=boxes[None, :1], multimask_output=False)  # noqa: E731
            hf_all = lambda: hf(image_embeddings=features, input_boxes=boxes[None], multimask_output=False)  # noqa: E731
            hf_masks = hf_one().pred_masks[0, :, 0]  # (1, 256, 256)
            one_deviation += f" (HF {(hf_masks - theirs_one[:, 0]).abs().max().item():.1e})"
        return [
            timed(
                "4. prompt + decoder, 1 box",
                official_one,
                lambda: ours.decode(embedding.embedding, first_box),
                20,
                "<= 0.45, HF <= 0.80",
                one_deviation,
                hf=hf_one,
            ),
            timed(
                "4. 64 boxes in one call",
                official_all,
                lambda: ours.decode(embedding.embedding, all_boxes),
                self.repeats,
                "<= 0.25",
                f"vs 64 single calls: {same}, max abs {(batched - singles).abs().max().item():.1e}",
                hf=hf_all,
            ),
            timed(
                "   64 boxes: one call vs 64 calls (finesam)",
                our_singles,
                lambda: ours.decode(embedding.embedding, all_boxes),
                self.repeats,
                "<= 1.00",
                "",
            ),
        ]

    def hq(self) -> list[Row]:
        official = random_official(self.size, seed=0, hq=True).to(self.device)
        model = sam_from_state_dict(official.state_dict(), device=self.device)
        adapter = HQSAMAdapter(model)
        adapter.load_state_dict(convert_hq_state_dict(official.state_dict(), adapter))
        apply_fast_paths(model, *adapter.placed_adapters)  # as load_sam and load_hq give them
        predictor = HQSamPredictor(official)
        predictor.set_image(self.image)
        boxes = self.on_device(
            torch.as_tensor(predictor.transform.apply_boxes(BOX[None], predictor.original_size)).float()
        )
        base = model.encode_image(Image.fromarray(self.image))
        adapter.inject()
        embedding = model.encode_image(Image.fromarray(self.image))
        box = Prompts(boxes=boxes)
        uncached = model.decode(embedding.embedding, box, image_features=dict(embedding.features))[0]
        cached = model.decode(embedding.embedding, box, image_features=embedding.features)[0]  # now cached
        official_hq = official_decoder(predictor, boxes)
        theirs = official_hq()[0]

        def hq_prompt() -> object:
            return model.decode(embedding.embedding, box, image_features=embedding.features)

        hq_ms, base_ms = [], []
        for _ in range(3):  # alternate blocks with and without the adapter, so both see the same load
            adapter.eject()
            base_ms.append(median_ms(lambda: model.decode(base.embedding, box), 10))
            adapter.inject()
            hq_ms.append(median_ms(hq_prompt, 10))
        hq_median, base_median = statistics.median(hq_ms), statistics.median(base_ms)
        deviation = f"max abs {(cached - theirs).abs().max().item():.1e}"
        hf_prompt: Callable[[], Any] | None = None
        if transformers is not None:
            hf_hq = hf_sam(official, hq=True).to(self.device)
            features, early = predictor.features, predictor.interm_features
            inputs = {"image_embeddings": features, "intermediate_embeddings": early, "input_boxes": boxes[None]}
            hf_prompt = lambda: hf_hq(**inputs, multimask_output=False)  # noqa: E731

            # HF's SamHQModel does not give the official HQ logits with these weights (its base model does)
            deviation += f" (HF {(hf_prompt().pred_masks[0, :, 0] - theirs[:, 0]).abs().max().item():.1e})"
        return [
            timed(
                "5. HQ prompt + decoder, 1 box (vs official HQ)",
                official_hq,
                hq_prompt,
                20,
                "<= 0.25, HF <= 0.60",
                deviation,
                hf=hf_prompt,
            ),
            Row(
                "5. HQ prompt vs base prompt (finesam)",
                f"{base_median:.1f} ms (base)",
                f"{hq_median:.1f} ms (+{hq_median - base_median:.1f} ms)",
                hq_median / base_median,
                "+ <= 10 ms",
                f"cached vs recomputed HQ features: max abs {(cached - uncached).abs().max().item():.1e}",
            ),
        ]

    def loading(self) -> list[Row]:
        with tempfile.TemporaryDirectory() as tmp:
            weights_mb, results = bench_loading.run(self.size, Path(tmp))
        ours, reference = results["finesam load_sam(.safetensors)"], results["torch.load(.pth)"]
        builder = results["official builder(.pth)"]
        deviation = (
            f"peak {ours['peak_mb'] / weights_mb:.2f}x the {weights_mb:.0f} MB of weights "
            f"(official builder {builder['peak_mb'] / weights_mb:.2f}x)"
        )
        return [
            Row(
                f"6. load {self.size} (vs torch.load .pth)",
                f"{reference['seconds']:.2f} s",
                f"{ours['seconds']:.2f} s",
                ours["seconds"] / reference["seconds"],
                "<= 0.30",
                deviation,
            )
        ]

    def memory(self) -> list[Row]:
        with tempfile.TemporaryDirectory() as tmp:
            weights = bench_memory.converted(self.size, Path(tmp))
            peaks = {name: bench_memory.run(weights, f"torch.{name}", 1) for name in ("float32", "bfloat16")}
            rss = bench_memory.run(weights, "torch.bfloat16", self.drift_count)["rss"]
        rows = [
            Row(
                f"7. one prediction {self.size}, {name}",
                "-",
                f"+{numbers['peak_mb']:.0f} MB",
                None,
                "report",
                f"over the {numbers['weights_mb']:.0f} MB resident model",
            )
            for name, numbers in peaks.items()
        ]
        drift = rss[-1] - rss[4]
        rows.append(
            Row(
                f"7. RSS over {self.drift_count} predictions, bf16",
                "-",
                f"{drift:+.0f} MB",
                None,
                "no growth",
                f"RSS after #5 {rss[4]:.0f} MB, after #{self.drift_count} {rss[-1]:.0f} MB",
            )
        )
        return rows


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}\n")
    print("| figure | official | HF transformers | finesam | finesam / official | finesam / HF | goal | deviation |")
    print("|---|---:|---:|---:|---:|---:|---|---|")

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    for row in rows:
        print(
            f"| {row.figure} | {row.official} | {row.hf} | {row.finesam} | {ratio(row.ratio)} | {ratio(row.hf_ratio)} "
            f"| {row.goal} | {row.deviation} |"
        )


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each slow stage (encoders, batches)")
    parser.add_argument("--compile", action="store_true", help="also time the compiled encoder (minutes)")
    parser.add_argument("--drift-count", type=int, default=50, help="predictions for the memory drift")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out, of {','.join(PARTS)}")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU table (never part of the tests)")
    args = parser.parse_args()
    skip = {part for part in args.skip.split(",") if part}
    if unknown := skip - set(PARTS):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    device = torch.device(args.device)
    if device.type != "cpu":
        skip |= {"loading", "memory"}  # process RSS figures: CPU only
    bench = Bench(args.size, args.repeats, args.drift_count, device)
    rows: list[Row] = []
    for part in PARTS:
        if part in skip or (part == "compile" and not args.compile):
            continue
        start = time.perf_counter()
        rows += getattr(bench, part)()
        print(f"{part}: done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    where = f"{torch.get_num_threads()} CPU threads"
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    print_table(f"SAM {args.size}, torch {torch.__version__}, {where}", rows)


if __name__ == "__main__":
    main()
