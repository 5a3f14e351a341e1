"""Adapters of a frozen `SegmentAnything`: HQ-SAM and LoRA, injected and ejected at runtime (no file I/O here:
their files are `finesam.weights`)."""

from finesam.adapters.hq import HQSAM2Adapter, HQSAMAdapter
from finesam.adapters.lora import TARGETS, SAMLoraAdapter

__all__ = ["TARGETS", "HQSAM2Adapter", "HQSAMAdapter", "SAMLoraAdapter"]
