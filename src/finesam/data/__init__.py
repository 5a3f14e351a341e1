"""Data on disk and drawn from it: image / mask pairs, prompts sampled from masks, synthetic datasets."""

from finesam.data.pairs import IMAGE_SUFFIXES, list_pairs, load_pair

__all__ = ["IMAGE_SUFFIXES", "list_pairs", "load_pair"]
