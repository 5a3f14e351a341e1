"""On-disk cache of image embeddings (and the per-image features adapters take from the encoder).

The encoder is frozen, so without image augmentation an image always gives the same embedding. An entry is
keyed on the image file's bytes and on the encoder (weights digest, input size, dtype, captured features):
changing any of them misses the cache instead of returning a stale embedding.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import Tensor

from finesam.weights.io import CheckpointError, format_metadata, read_safetensors, write_safetensors


class EmbeddingCache:
    """`get` / `put` the embedding and features of an image file for one encoder."""

    def __init__(self, directory: Path, encoder_key: dict[str, Any]) -> None:
        self.directory = directory
        self.encoder_key = json.dumps(encoder_key, sort_keys=True)
        self.hits = self.misses = 0

    def _path(self, image: Path) -> Path:
        content = hashlib.sha256(image.read_bytes()).hexdigest()
        key = hashlib.sha256(f"{self.encoder_key}/{content}".encode()).hexdigest()
        return self.directory / key[:2] / f"{key}.safetensors"

    def get(self, image: Path) -> tuple[Tensor, dict[str, Tensor]] | None:
        path = self._path(image)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors, _ = read_safetensors(path)
        except CheckpointError:
            self.misses += 1  # unreadable: encode again (and overwrite)
            return None
        self.hits += 1
        embedding = tensors.pop("embedding")
        return embedding, tensors

    def put(self, image: Path, embedding: Tensor, features: dict[str, Tensor]) -> None:
        tensors = {"embedding": embedding.contiguous(), **{k: v.contiguous() for k, v in features.items()}}
        write_safetensors(tensors, self._path(image), format_metadata("embedding_cache"))
