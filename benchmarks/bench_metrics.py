"""Boundary IoU at dataset resolution: finesam's `boundary_iou` against the HQ-SAM evaluation's OpenCV erosion
(`d` iterations of a 3x3 erosion per mask), on one pair of masks at 1024, 2048 and 4096 px wide.

    python benchmarks/bench_metrics.py [--repeats 5]

The masks are a real silhouette (scikit-image's horse, scaled up) and the same shifted by a few pixels with
thin lines added; d = round(0.02 x diagonal) (20, 49 and 98). Both sides compute the whole boundary IoU of
the pair; they run alternately after a warm-up. Needs OpenCV (a test dependency).
"""

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from skimage import data

sys.path[:0] = [str(Path(__file__).resolve().parent)]
from finesam.evaluation.metrics import boundary_dilation, boundary_iou

from bench import alternating_median_ms


def masks(width: int) -> tuple[np.ndarray, np.ndarray]:
    height = round(width * 2 / 3)
    horse = np.logical_not(data.horse())  # the silhouette is where the picture is dark
    gt = np.array(Image.fromarray(horse).resize((width, height), Image.Resampling.NEAREST))
    pred = np.roll(gt, (height // 200, -width // 150), axis=(0, 1)).copy()
    pred[height // 3 :: height // 7, :] = True  # thin lines across
    return pred, gt


def opencv_boundary_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    dilation = boundary_dilation(*gt.shape)
    kernel = np.ones((3, 3), np.uint8)

    def band(mask: np.ndarray) -> np.ndarray:
        padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
        return mask & ~cv2.erode(padded, kernel, iterations=dilation)[1:-1, 1:-1].astype(bool)

    a, b = band(pred), band(gt)
    return float((a & b).sum() / max((a | b).sum(), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"threads: torch {torch.get_num_threads()}, OpenCV {cv2.getNumThreads()}\n")
    print("| mask pair | d | OpenCV erosion | finesam | finesam / OpenCV | same IoU |")
    print("|---|---:|---:|---:|---:|---|")
    for width in (1024, 2048, 4096):
        pred, gt = masks(width)
        pred_t, gt_t = torch.from_numpy(pred), torch.from_numpy(gt)
        ours = boundary_iou(pred_t, gt_t).item()
        theirs = opencv_boundary_iou(pred, gt)
        opencv_ms, ours_ms = alternating_median_ms(
            lambda p=pred, g=gt: opencv_boundary_iou(p, g),
            lambda p=pred_t, g=gt_t: boundary_iou(p, g),
            repeats=args.repeats,
        )
        same = "yes" if abs(ours - theirs) < 1e-6 else f"no ({ours:.6f} vs {theirs:.6f})"
        print(
            f"| {width} x {gt.shape[0]} | {boundary_dilation(*gt.shape)} | {opencv_ms:.0f} ms | {ours_ms:.0f} ms "
            f"| {ours_ms / opencv_ms:.2f}x | {same} |"
        )


if __name__ == "__main__":
    main()
