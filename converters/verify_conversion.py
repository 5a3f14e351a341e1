"""Checks a conversion on real weights: the official package and finesam on the same image and prompts.

    python converters/verify_conversion.py sam_vit_b_01ec64.pth [--converted X.safetensors] [--image photo.jpg]

Prints the max abs differences of the image embedding and of the mask logits / IoU for a box and a click,
and exits 1 if any exceeds 1e-4. Needs `segment_anything` (installed by `make test`).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from finesam.cli.example import HOUSE_BOX, SUN_POINT, example_image
from finesam.model.config import preset_name
from finesam.weights import load_sam
from finesam.weights.io import load_official_state_dict
from finesam.weights.loading import sam_from_state_dict
from finesam.weights.sam_keys import infer_config

from official import OFFICIAL_BUILDERS, SamPredictor

TOLERANCE = 1e-4


@torch.inference_mode()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="official SAM .pth")
    parser.add_argument("--converted", type=Path, help="finesam .safetensors (default: convert in memory)")
    parser.add_argument("--image", type=Path, help="default: the project's example image")
    args = parser.parse_args()

    state_dict = load_official_state_dict(args.checkpoint)
    name = preset_name(infer_config(state_dict))
    if name not in OFFICIAL_BUILDERS:
        print(f"{args.checkpoint}: not an official SAM size ({name})", file=sys.stderr)
        return 1
    official = OFFICIAL_BUILDERS[name]()
    official.load_state_dict(state_dict)
    ours = load_sam(args.converted) if args.converted else sam_from_state_dict(state_dict)
    image = Image.open(args.image).convert("RGB") if args.image else example_image()
    width, height = image.size
    box = (
        np.array(HOUSE_BOX, dtype=np.float64)
        if args.image is None
        else np.array([0.2 * width, 0.2 * height, 0.8 * width, 0.8 * height])
    )
    click = np.array([SUN_POINT], dtype=np.float64) if args.image is None else np.array([[0.5 * width, 0.5 * height]])

    predictor = SamPredictor(official)
    predictor.set_image(np.asarray(image))
    embedding = ours.encode_image(image)
    features = predictor.features
    assert features is not None
    diffs = {"image embedding": (embedding.embedding - features).abs().max().item()}
    for what, official_kwargs, our_kwargs in (
        ("box", {"box": box}, {"boxes": box}),
        ("click", {"point_coords": click, "point_labels": np.array([1])}, {"points": click}),
    ):
        logits, iou, _ = predictor.predict(**official_kwargs, multimask_output=True, return_logits=True)
        prediction = ours.predict(embedding, **our_kwargs, multimask_output=True, return_logits=True)
        diffs[f"{what}: mask logits"] = np.abs(prediction.masks[0].numpy() - logits).max()
        diffs[f"{what}: IoU"] = np.abs(prediction.iou_predictions[0].numpy() - iou).max()
    for what, diff in diffs.items():
        print(f"{what:24s} max abs diff {diff:.2e}  {'ok' if diff <= TOLERANCE else 'TOO LARGE'}")
    return 0 if all(d <= TOLERANCE for d in diffs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
