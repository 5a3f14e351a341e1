"""Text prompts (Grounded SAM): the detector's share and the masks' share of one text-prompted image, and
`finesam segment DIR --text` in images per hour, one process against two under torchrun.

    python benchmarks/bench_text.py [--detector full|small] [--sam vit_b|vit_tiny] [--images 4] [--repeats 3]

No weights are downloaded: the detector is a Grounding DINO with random weights built from its transformers
configuration (`full`: the class defaults, Grounding DINO tiny's size, Swin-T and BERT-base, 800-pixel short
side; `small`: reference/tiny_detectors.py's) with a small made-up vocabulary, saved to a folder and loaded back
by path; SAM is a random ViT-B (or TinyViT) from its configuration. The box threshold keeps every query of the
random detector and `--max-detections 10` keeps ten boxes per image, as a real photo with a few named objects
gives. The images are the benchmark photos (`$FINESAM_BENCH_IMAGES`, see bench.py), repeated to `--images`.

The dataset commands run as subprocesses; their times are those of the summary line (models loaded to
annotations.json written). Two processes get one thread each (torchrun's default), one process gets all cores.
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "reference"), str(Path(__file__).resolve().parent)]
from bench_datasets import run as dataset_rate
from finesam.detection import TextDetector, masks_of_detections
from finesam.fast import apply_fast_paths
from finesam.model import SAMConfig, SegmentAnything
from finesam.model.registry import PRESETS
from finesam.weights import save_sam

from bench import median_ms, photos
from tiny_detectors import WORDS, grounding_dino

TEXT = "a person. a car. a bicycle."
DETECTIONS = 10


def full_grounding_dino(folder: Path) -> Path:
    """Grounding DINO at the size of IDEA-Research/grounding-dino-tiny (its configuration's class defaults),
    random weights, a made-up vocabulary (the text encoder's size is the real one)."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *WORDS]) + "\n")
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(), tokenizer=BertTokenizer(str(folder / "vocab.txt"))
    )
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--detector", choices=["full", "small"], default="full")
    parser.add_argument("--sam", choices=["vit_b", "vit_tiny"], default="vit_b")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-dataset", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        build = full_grounding_dino if args.detector == "full" else grounding_dino
        folder = build(root / "detector")
        detector = TextDetector.load(folder)
        parameters = sum(p.numel() for p in detector.model.parameters()) / 1e6
        print(
            f"detector: Grounding DINO ({args.detector}, {parameters:.0f} M parameters), built and loaded in "
            f"{time.perf_counter() - started:.1f} s"
        )
        config: SAMConfig = PRESETS[args.sam]
        torch.manual_seed(0)
        sam = SegmentAnything(config).eval()
        weights = save_sam(sam, root / "sam.safetensors")
        apply_fast_paths(sam)
        image = photos()[0]
        print(f"image: {image.width} x {image.height}; SAM {args.sam}; {DETECTIONS} boxes")

        found = detector.detect(image, TEXT, 0.0, 0.0, DETECTIONS)
        detect_ms = median_ms(lambda: detector.detect(image, TEXT, 0.0, 0.0, DETECTIONS), args.repeats)
        masks_ms = median_ms(lambda: masks_of_detections(sam, image, found), args.repeats)
        total = detect_ms + masks_ms
        print(
            f"one image: detector {detect_ms:.0f} ms ({100 * detect_ms / total:.0f} %), masks (encode + "
            f"{len(found)} boxes) {masks_ms:.0f} ms ({100 * masks_ms / total:.0f} %), {total:.0f} ms in all"
        )
        if args.skip_dataset:
            return
        images = root / "images"
        images.mkdir()
        pictures = photos()
        for i in range(args.images):
            pictures[i % len(pictures)].save(images / f"{i:03d}.jpg", quality=95)
        command = ["segment", str(images), "--weights", str(weights), "--text", TEXT, "--detector", str(folder)]
        command += ["--box-threshold", "0", "--text-threshold", "0", "--max-detections", str(DETECTIONS)]
        for processes in (1, 2):
            count, masks, seconds = dataset_rate([*command, "--out", str(root / f"out{processes}")], processes)
            print(
                f"dataset, {processes} process(es): {count} images, {masks} masks in {seconds:.1f} s: "
                f"{3600 * count / seconds:.0f} images/hour"
            )


if __name__ == "__main__":
    main()
