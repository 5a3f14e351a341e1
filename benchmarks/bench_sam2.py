"""SAM 2.1 on images against Meta's sam2 1.1.0 and HF transformers' Sam2Model in the same process, alternating:
the image encoder (fp32, ours also in bf16), one box prompt, 64 boxes in one call. Random weights of a release's
shapes (the timings do not depend on the values), the same in all three (HF's through finesam's renames). Prints
each median and the ratios ours / official and ours / HF.

    python benchmarks/bench_sam2.py --size tiny --repeats 3
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))

import numpy as np
import torch
from PIL import Image
from transformers import Sam2Config, Sam2Model  # before the reference (its torchvision stand-in)

from finesam.adapters.hq import HQSAM2Adapter
from finesam.fast import apply_fast_paths
from finesam.model.sam2.config import HieraConfig
from finesam.weights.hf import to_hf_state_dict
from finesam.weights.loading import sam_from_state_dict

from official_sam2 import SAM2ImagePredictor, build_official_sam2


def _median(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_model(encoder: HieraConfig, official: dict[str, torch.Tensor]) -> Sam2Model:
    """HF's Sam2Model of a release's Hiera, holding the official weights."""
    dims = list(encoder.dims)
    backbone = {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": encoder.embed_dim,
        "num_attention_heads": encoder.heads,
        "blocks_per_stage": list(encoder.stages),
        "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": [encoder.heads * 2**i for i in range(len(dims))],
        "window_size_per_stage": list(encoder.window_spec),
        "global_attention_blocks": list(encoder.global_attention_blocks),
        "window_positional_embedding_background_size": list(encoder.position_embedding_size),
    }
    vision = {"backbone_config": backbone, "backbone_channel_list": dims[::-1]}
    model = Sam2Model(Sam2Config(vision_config=vision))
    model.load_state_dict(to_hf_state_dict(official, "sam2"), strict=True)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "base_plus", "large"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    official = build_official_sam2(f"sam2.1_hiera_{args.size}")
    ours = sam_from_state_dict(official.state_dict())
    apply_fast_paths(ours)
    assert isinstance(ours.config.encoder, HieraConfig)
    hf = hf_model(ours.config.encoder, official.state_dict())
    image = (np.random.default_rng(0).random((768, 1024, 3)) * 255).astype(np.uint8)
    picture = Image.fromarray(image)
    predictor = SAM2ImagePredictor(official)
    box = np.array([100.0, 100.0, 600.0, 500.0])
    boxes = np.stack([box + i for i in range(64)])
    rows: list[tuple[str, float, float, float | None]] = []
    with torch.inference_mode():
        predictor.set_image(image)
        embedding = ours.encode_image(image)
        pixels, _ = ours.preprocess(picture)
        features = hf(pixel_values=pixels).image_embeddings
        scale = torch.tensor([1024 / image.shape[1], 1024 / image.shape[0]] * 2)
        hf_box = (torch.from_numpy(box).float() * scale)[None, None]
        hf_boxes = (torch.from_numpy(boxes).float() * scale)[None]
        cases: list[tuple[str, Callable[[], object], Callable[[], object], Callable[[], object] | None]] = [
            (
                "encoder fp32",
                lambda: predictor.set_image(image),
                lambda: ours.encode_image(image),
                lambda: hf.get_image_embeddings(ours.preprocess(picture)[0]),
            ),
            (
                "one box",
                lambda: predictor.predict(box=box, multimask_output=False),
                lambda: ours.predict(embedding, boxes=box),
                lambda: hf(image_embeddings=features, input_boxes=hf_box, multimask_output=False),
            ),
            (
                "64 boxes, one call",
                lambda: predictor.predict(box=boxes, multimask_output=False),
                lambda: ours.predict(embedding, boxes=boxes),
                lambda: hf(image_embeddings=features, input_boxes=hf_boxes, multimask_output=False),
            ),
        ]
        for name, theirs, mine, huggingface in cases:
            for run in (theirs, mine, huggingface):  # warm-up
                if run is not None:
                    run()
            a, b, c = [], [], []
            for _ in range(args.repeats):  # alternating
                a.append(_median(theirs, 1))
                b.append(_median(mine, 1))
                if huggingface is not None:
                    c.append(_median(huggingface, 1))
            rows.append((name, statistics.median(a), statistics.median(b), statistics.median(c) if c else None))
        # HQ-SAM 2 (random weights of its shapes) injected: its prompt against the official base decoder's, and
        # what it adds to ours
        hq = HQSAM2Adapter(ours)
        apply_fast_paths(*hq.placed_adapters)  # as load_hq gives it on a fast model
        hq.inject()
        hq_embedding = ours.encode_image(image)
        one_hq = lambda: ours.predict(hq_embedding, boxes=box)  # noqa: E731
        one_hq()
        hq_times, base_times = [], []
        for _ in range(args.repeats):
            hq_times.append(_median(one_hq, 1))
            hq.eject()
            base_times.append(_median(lambda: ours.predict(embedding, boxes=box), 1))
            hq.inject()
        hq.eject()
        hq_s, base_s = statistics.median(hq_times), statistics.median(base_times)
        rows.append(("HQ-SAM 2, one box (vs their base decoder)", rows[1][1], hq_s, rows[1][3]))
        extra_ms = 1000 * (hq_s - base_s)
        ours.set_encoder_dtype(torch.bfloat16)
        ours.encode_image(image)
        bf16 = _median(lambda: ours.encode_image(image), args.repeats)
        rows.append(("encoder bf16 (ours) vs their fp32", rows[0][1], bf16, rows[0][3]))
    print(f"SAM 2.1 Hiera-{args.size}, {torch.get_num_threads()} threads")
    print(f"{'case':42} {'official s':>10} {'HF s':>8} {'finesam s':>10} {'/official':>9} {'/HF':>6}")
    for name, theirs_s, mine_s, hf_s in rows:
        hf_text = f"{hf_s:8.3f}" if hf_s is not None else f"{'-':>8}"
        ratio_hf = f"{mine_s / hf_s:6.2f}" if hf_s is not None else f"{'-':>6}"
        print(f"{name:42} {theirs_s:10.3f} {hf_text} {mine_s:10.3f} {mine_s / theirs_s:9.2f} {ratio_hf}")
    print(f"HQ-SAM 2 adds {extra_ms:.1f} ms to one box prompt of finesam's SAM 2.1")


if __name__ == "__main__":
    main()
