"""Deployment through ONNX.

`finesam.onnx.export.export` (needs torch and onnx) writes an image encoder and a prompt decoder with the
official SAM ONNX interface; `OnnxPredictor` (onnxruntime, numpy and PIL only) runs them. See docs/onnx.md.
"""

from finesam.onnx.predictor import OnnxEmbedding, OnnxPrediction, OnnxPredictor, read_description

__all__ = ["OnnxEmbedding", "OnnxPrediction", "OnnxPredictor", "read_description"]
