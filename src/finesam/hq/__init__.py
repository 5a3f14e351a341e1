"""HQ-SAM as an adapter of the base model."""

from finesam.hq.adapter import HQSAMAdapter
from finesam.hq.weights import convert_hq_state_dict, load_hq, save_hq

__all__ = ["HQSAMAdapter", "convert_hq_state_dict", "load_hq", "save_hq"]
