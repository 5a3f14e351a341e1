"""Every weights file finesam reads or writes: official checkpoints, converted SAM files, adapter files, downloads.

Loading is safe (memory-mapped safetensors, or `torch.load(weights_only=True)`) and every write is atomic.
"""

from finesam.weights.adapter_files import save_adapter
from finesam.weights.hq import holds_hq, hq_weights_for, load_hq, save_hq
from finesam.weights.io import CheckpointError, OutputError, atomic_write, check_output, output_error
from finesam.weights.loading import ConversionReport, convert_checkpoint, load_sam, save_sam
from finesam.weights.lora import load_lora, save_lora

__all__ = [
    "CheckpointError",
    "ConversionReport",
    "OutputError",
    "atomic_write",
    "check_output",
    "convert_checkpoint",
    "holds_hq",
    "hq_weights_for",
    "load_hq",
    "load_lora",
    "load_sam",
    "output_error",
    "save_adapter",
    "save_hq",
    "save_lora",
    "save_sam",
]
