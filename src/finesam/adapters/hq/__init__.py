"""HQ-SAM as an adapter of the base model."""

from finesam.adapters.hq.adapter import HQSAMAdapter, hq_mask_only_set_to

__all__ = ["HQSAMAdapter", "hq_mask_only_set_to"]
