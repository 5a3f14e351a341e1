"""The one model a server holds: adapters switched per request, embeddings kept in a bounded LRU.

Every use of the model goes through `ModelHost`'s lock: a request sees the adapters it asked for, injected in
full, and no other request can switch them while it decodes.
"""

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from finesam.adapters.hq import HQAdapter
from finesam.adapters.lora import SAMLoraAdapter
from finesam.adapters.order import injection_order
from finesam.amg import AutomaticMaskGenerator
from finesam.amg.rle import mask_to_rle, to_coco
from finesam.detection import TextDetector
from finesam.model.config import describe
from finesam.model.sam import ImageEmbedding, SegmentAnything

HQ = "hq"


class NotFound(LookupError):
    """An image id the host does not hold (never uploaded, or evicted from the cache)."""


@dataclass(frozen=True)
class MaskRequest:
    """A prompt and the model setup to decode it with (coordinates in pixels of the original image)."""

    points: list[list[float]] | None = None
    labels: list[int] | None = None
    box: list[float] | None = None
    multimask: bool = False
    hq: bool = False
    hq_only: bool = False
    loras: tuple[str, ...] = ()


@dataclass(frozen=True)
class DetectionRequest:
    """Phrases to find in an image, and the detector's options (None: its defaults)."""

    text: str
    box_threshold: float | None = None
    text_threshold: float | None = None
    max_detections: int | None = None


@dataclass
class _Entry:
    image: Image.Image
    # by the LoRAs injected into the encoder when it ran (decoder-only LoRAs do not change an embedding)
    embeddings: dict[frozenset[str], ImageEmbedding] = field(default_factory=dict)


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class ModelHost:
    """A `SegmentAnything` with its optional HQ adapter and LoRAs, shared by the requests of a server.

    Args:
        model: the base model (no adapter injected).
        hq: the HQ-SAM adapter, not injected, or None.
        loras: LoRA adapters by name, not injected.
        cache_images: images (and their embeddings) kept; the least recently used is dropped first.
        detector: the zero-shot detector of text prompts, or None (the page then has none).
    """

    def __init__(
        self,
        model: SegmentAnything,
        hq: HQAdapter | None = None,
        loras: Sequence[SAMLoraAdapter] = (),
        cache_images: int = 8,
        detector: TextDetector | None = None,
    ) -> None:
        if cache_images < 1:
            raise ValueError(f"cache_images must be at least 1, got {cache_images}")
        self.model, self.hq, self.cache_images, self.detector = model, hq, cache_images, detector
        self.loras = {lora.name: lora for lora in loras}
        if HQ in self.loras:
            raise ValueError("a LoRA named 'hq' would shadow the HQ adapter: rename it")
        encoder = type(model.image_encoder).__name__
        self._in_encoder = {n for n, lora in self.loras.items() if any(p.startswith(encoder) for p in lora.paths)}
        self._images: OrderedDict[str, _Entry] = OrderedDict()
        self._injected: list[str] = []  # in injection order
        self._lock = threading.Lock()

    # -- adapters -------------------------------------------------------------------------------------------

    def _adapter(self, name: str) -> HQAdapter | SAMLoraAdapter:
        adapter = self.hq if name == HQ else self.loras[name]
        assert adapter is not None
        return adapter

    def _switch(self, hq: bool, loras: Iterable[str]) -> None:
        """Injects and ejects adapters until exactly these are injected, in finesam's one order (HQ-SAM, then
        the LoRAs; `finesam.adapters.order`), keeping what is already injected in that order (lock held)."""
        wanted = injection_order(HQ if hq else None, sorted(set(loras)))
        kept = 0
        while kept < min(len(wanted), len(self._injected)) and self._injected[kept] == wanted[kept]:
            kept += 1
        for name in reversed(self._injected[kept:]):
            self._adapter(name).eject()
        del self._injected[kept:]
        for name in wanted[kept:]:
            self._adapter(name).inject()
            self._injected.append(name)

    def check_adapters(self, hq: bool, loras: Sequence[str]) -> None:
        """Raises `ValueError` for adapters the host does not have."""
        if hq and self.hq is None:
            raise ValueError("this server has no HQ-SAM adapter (start it with --hq)")
        if unknown := sorted(set(loras) - set(self.loras)):
            raise ValueError(f"unknown LoRA {', '.join(unknown)} (available: {', '.join(self.loras) or 'none'})")

    @contextmanager
    def _setup(self, hq: bool, loras: Sequence[str], hq_only: bool = False) -> Iterator[None]:
        """The model with exactly these adapters injected (lock held; `check_adapters` already passed)."""
        self._switch(hq, loras)
        if self.hq is not None:
            self.hq.hq_mask_only = hq_only
        yield

    # -- images ---------------------------------------------------------------------------------------------

    def add_image(self, image: Image.Image) -> str:
        """Keeps an RGB image and returns its id; the least recently used image is dropped past the bound."""
        image_id = uuid.uuid4().hex[:16]
        with self._lock:
            self._images[image_id] = _Entry(image)
            while len(self._images) > self.cache_images:
                self._images.popitem(last=False)
        return image_id

    def image(self, image_id: str) -> Image.Image:
        with self._lock:
            return self._entry(image_id).image

    def _entry(self, image_id: str) -> _Entry:
        if image_id not in self._images:
            raise NotFound(
                f"unknown image id {image_id!r} (never uploaded, or dropped: the server keeps the last "
                f"{self.cache_images} images; upload it again)"
            )
        self._images.move_to_end(image_id)
        return self._images[image_id]

    def _embedding(self, entry: _Entry, loras: Sequence[str]) -> tuple[ImageEmbedding, float]:
        """The embedding for the encoder LoRAs asked for, computed (with HQ injected, so that its early ViT
        features are kept) on first use; and the encoding time in ms (0 when cached)."""
        key = frozenset(self._in_encoder & set(loras))
        if key in entry.embeddings:
            return entry.embeddings[key], 0.0
        self._switch(self.hq is not None, key)
        start = time.perf_counter()
        embedding = self.model.encode_image(entry.image)
        entry.embeddings[key] = embedding
        return embedding, 1000 * (time.perf_counter() - start)

    # -- work -----------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def masks(self, image_id: str, request: MaskRequest) -> dict[str, Any]:
        """The masks `SegmentAnything.predict` gives for the prompt, as COCO RLE with their predicted IoU.

        Raises:
            NotFound: unknown image id.
            ValueError: a bad prompt or an adapter the host does not have.
        """
        self.check_adapters(request.hq, request.loras)
        with self._lock:
            entry = self._entry(image_id)
            embedding, encode_ms = self._embedding(entry, request.loras)
            with self._setup(request.hq, request.loras, request.hq_only):
                start = time.perf_counter()
                prediction = self.model.predict(
                    embedding,
                    points=request.points,
                    labels=request.labels,
                    boxes=request.box,
                    multimask_output=request.multimask,
                )
                ms = 1000 * (time.perf_counter() - start)
        masks, scores = prediction.masks[0], prediction.iou_predictions[0]
        return {
            "masks": [
                {"rle": to_coco(mask_to_rle(mask)), "score": float(score)}
                for mask, score in zip(masks.cpu(), scores.tolist(), strict=True)
            ],
            "ms": round(ms, 2),
            "encode_ms": round(encode_ms, 2),
        }

    @torch.inference_mode()
    def everything(
        self, image_id: str, options: dict[str, Any], hq: bool = False, hq_only: bool = False, loras: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The automatic mask generator's masks as COCO-style annotations (RLE with string counts)."""
        self.check_adapters(hq, loras)
        AutomaticMaskGenerator.check_options(**options)
        with self._lock:
            entry = self._entry(image_id)
            with self._setup(hq, loras, hq_only):
                start = time.perf_counter()
                records = AutomaticMaskGenerator(self.model, **options, output_mode="coco_rle").generate(entry.image)
                ms = 1000 * (time.perf_counter() - start)
        annotations = [
            {
                "id": i,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": record["segmentation"],
                "area": record["area"],
                "bbox": record["bbox"],
                "score": record["predicted_iou"],
                "stability_score": record["stability_score"],
                "point_coords": record["point_coords"],
            }
            for i, record in enumerate(records)
        ]
        return {"annotations": annotations, "ms": round(ms, 2)}

    def detections(self, image_id: str, request: DetectionRequest) -> dict[str, Any]:
        """The boxes the detector finds for the phrases (`TextDetector.detect`), highest score first: the page
        makes each one an object, whose mask it then asks for like any box.

        Raises:
            NotFound: unknown image id.
            ValueError: no detector, no phrase, or options the detector does not take.
        """
        if self.detector is None:
            raise ValueError("this server has no text detector (start it with --detector HUB_ID_OR_FOLDER)")
        with self._lock:
            image = self._entry(image_id).image
            start = time.perf_counter()
            found = self.detector.detect(
                image, request.text, request.box_threshold, request.text_threshold, request.max_detections
            )
            ms = 1000 * (time.perf_counter() - start)
        return {"detections": [d.as_json() for d in found], "ms": round(ms, 2)}

    def describe(self) -> dict[str, Any]:
        """What `/api/model` reports: the model, its adapters and the cache."""
        with self._lock:
            cached = sum(
                entry.image.width * entry.image.height * 3
                + sum(_nbytes([e.embedding, e.features]) for e in entry.embeddings.values())
                for entry in self._images.values()
            )
            return {
                "model": describe(self.model.config),
                "image_size": self.model.config.image_size,
                "adapters": {"hq": self.hq is not None, "loras": sorted(self.loras)},
                "detector": None if self.detector is None else self.detector.name,
                "injected": list(self._injected),
                "cache": {"images": len(self._images), "limit": self.cache_images, "bytes": cached},
            }
