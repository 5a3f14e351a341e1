"""Speed of the HQ-SAM adapter against the official `segment_anything_hq`, same random weights, same process.

    python benchmarks/bench_hq.py [--size vit_b]

Prints, per stage, the median time of each implementation and the ratio, and the cost of the adapter
over finesam's base decoder.
"""

import argparse

import numpy as np
import torch
from PIL import Image

from finesam.hq import HQSAMAdapter, convert_hq_state_dict
from finesam.weights import build_from_official

from bench_sam import Stage, median_ms, report
from official import HQSamPredictor, random_official


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    args = parser.parse_args()

    official = random_official(args.size, seed=0, hq=True)
    model = build_from_official(official.state_dict())
    adapter = HQSAMAdapter(model)
    adapter.load_state_dict(convert_hq_state_dict(official.state_dict(), adapter))
    image = np.random.default_rng(0).integers(0, 256, (1200, 1800, 3), dtype=np.uint8)
    predictor = HQSamPredictor(official)
    predictor.set_image(image)
    box = np.array([100.0, 200.0, 1500.0, 1000.0])
    boxes = np.stack([box + i for i in range(16)])
    model_boxes = torch.as_tensor(predictor.transform.apply_boxes(boxes, predictor.original_size)).float()

    base_embedding = model.encode_image(Image.fromarray(image))
    base_decode = median_ms(lambda: model.decode(base_embedding.embedding, boxes=model_boxes[:1]), 20)
    adapter.inject()
    embedding = model.encode_image(Image.fromarray(image))
    model.predict(embedding, boxes=box)  # the first prompt computes and caches the image-only HQ features

    def decode(count: int):
        return lambda: model.decode(embedding.embedding, boxes=model_boxes[:count], image_features=embedding.features)

    def official_decode(count: int):
        return lambda: predictor.predict_torch(None, None, model_boxes[:count], multimask_output=False)

    stages: list[Stage] = [
        ("HQ decoder, 1 box", official_decode(1), decode(1), 20),
        ("HQ decoder, 16 boxes batched", official_decode(16), decode(16), 3),
        (
            "HQ predict (1 box, masks at 1800x1200)",
            lambda: predictor.predict(box=box, multimask_output=False),
            lambda: model.predict(embedding, boxes=box),
            10,
        ),
    ]
    hq_decode = report(f"HQ-SAM {args.size}", stages)[0]
    overhead = hq_decode / base_decode
    print(f"finesam decoder, 1 box: base {base_decode:.1f} ms, with HQ {hq_decode:.1f} ms ({overhead:.2f}x)")


if __name__ == "__main__":
    main()
