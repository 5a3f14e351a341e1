"""Words to boxes: a Hugging Face transformers zero-shot object detector (`AutoModelForZeroShotObjectDetection`:
Grounding DINO, OWLv2, OWL-ViT, ...) run with its own processor and post-processing.

transformers is an optional dependency (`pip install 'finesam[text]'`): it is imported when a detector loads.

Two kinds of post-processing exist, and the processor says which one it has (no model is named here):

- phrase grounding (Grounding DINO): the phrases go in as one lower-case, dot-separated text ("a dog. a cat."),
  and `post_process_grounded_object_detection(outputs, input_ids, threshold, text_threshold, target_sizes)` keeps
  the queries whose best token probability passes `threshold`. Each kept box is named by the phrase whose tokens
  score highest for it; a box whose best phrase token stays at or under `text_threshold` names no phrase and is
  left out.
- class queries (OWLv2, OWL-ViT): the phrases are one query each, and the post-processing
  (`post_process_grounded_object_detection(outputs, threshold, target_sizes, text_labels)`, or the older
  `post_process_object_detection`) gives each kept box the index of its query.
"""

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
TEXT_EXTRA = "pip install 'finesam[text]' (transformers)"
GROUNDING = "phrase grounding"
CLASSES = "class queries"


class DetectorError(ValueError):
    """A detector that cannot be used: transformers missing, an id or folder that does not load, a model that is
    not a zero-shot detector, options its post-processing does not take."""


def parse_phrases(text: str | Sequence[str]) -> list[str]:
    """The phrases of a text prompt: "a dog. a cat." (Grounding DINO's form) or a list of class names, each
    stripped, spaces collapsed and lower-cased (the detectors' tokenizers lower-case), duplicates dropped.

    Raises:
        ValueError: no phrase, or a listed name with a '.' (the phrase separator).
    """
    if isinstance(text, str):
        parts = text.split(".")
    else:
        parts = list(text)
        if dotted := [p for p in parts if not isinstance(p, str) or "." in p]:
            raise ValueError(f"class names are separated by '.', so a name cannot hold one: {dotted!r}")
    phrases: list[str] = []
    for part in parts:
        phrase = " ".join(part.split()).lower()
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    if not phrases:
        raise ValueError(f'no phrase in the text {text!r}: give names separated by dots ("a dog. a cat.")')
    return phrases


def grounding_text(phrases: Sequence[str]) -> str:
    """Grounding DINO's text for phrases: lower case, each followed by a dot ("a dog. a cat.")."""
    return " ".join(f"{phrase}." for phrase in phrases)


@dataclass(frozen=True)
class Detection:
    """One box the detector found for a phrase."""

    label: str  # the phrase
    phrase: int  # its index in the phrases asked for
    score: float  # the detector's
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image, inside it

    def as_json(self) -> dict[str, Any]:
        return {"label": self.label, "score": self.score, "box": list(self.box)}


def check_detector_source(source: str | Path) -> str:
    """The cheap checks of a detector before anything loads: transformers is installed, and a source written as a
    path (a `Path`, or text starting with /, ./, ../ or ~) is a folder. Returns the name to load.

    Raises:
        DetectorError: either is not so.
    """
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise DetectorError(
            f"text prompts run a transformers detector, and transformers is missing: {TEXT_EXTRA}"
        ) from None
    name = str(source)
    if isinstance(source, Path) or name.startswith(("/", "./", "../", "~")):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise DetectorError(f"the detector folder {name} does not exist (or is not a folder)")
        name = str(folder)
    return name


def _call_defaults(function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)


class TextDetector:
    """A transformers zero-shot object detector and its processor, on a device and in a dtype.

    Args:
        model: a model of `AutoModelForZeroShotObjectDetection`.
        processor: its processor (`AutoProcessor`).
        name: the Hub id or folder it was loaded from.
        device, dtype: where and in what precision it runs (the inputs follow; post-processing runs in float32).

    Raises:
        DetectorError: the processor has no post-processing finesam knows.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor: Any,
        name: str = "",
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.name, self.device, self.dtype = name, torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.processor = processor
        grounded = getattr(processor, "post_process_grounded_object_detection", None)
        parameters = _call_defaults(grounded) if grounded is not None else {}
        if grounded is not None and {"input_ids", "text_threshold"} <= parameters.keys():
            self.kind, self._post = GROUNDING, grounded
        elif grounded is not None and "text_labels" in parameters and "input_ids" not in parameters:
            self.kind, self._post = CLASSES, grounded
        elif (older := self._object_detection_post_processing()) is not None:
            self.kind, self._post, parameters = CLASSES, older, _call_defaults(older)
        else:
            raise DetectorError(
                f"{name or type(processor).__name__}: its processor has no post-processing of zero-shot detections "
                "that finesam knows (post_process_grounded_object_detection with input_ids and text_threshold, or "
                "with text_labels; or post_process_object_detection)"
            )
        self._parameters = parameters

    def _object_detection_post_processing(self) -> Callable[..., Any] | None:
        for owner in (self.processor, getattr(self.processor, "image_processor", None)):
            function = getattr(owner, "post_process_object_detection", None)
            if function is not None and "threshold" in _call_defaults(function):
                return function
        return None

    @classmethod
    def load(
        cls,
        source: str | Path = DEFAULT_DETECTOR,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "TextDetector":
        """The detector of a Hub id or of a local folder (what `save_pretrained` wrote: model and processor).

        Raises:
            DetectorError: transformers is not installed, or the source does not load as a zero-shot detector
                (offline and not cached, an unknown id, a folder without the files); the message says which.
        """
        name = check_detector_source(source)
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(name)
            model = AutoModelForZeroShotObjectDetection.from_pretrained(name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
            raise DetectorError(
                f"cannot load the detector {name!r}: {reason}. Give the Hub id of a zero-shot object detector "
                "(Grounding DINO, OWLv2, OWL-ViT, ...: transformers' AutoModelForZeroShotObjectDetection) that can be "
                "downloaded or is cached, or a folder holding its model and processor (save_pretrained)"
            ) from None
        return cls(model, processor, name, device, dtype)

    def default_thresholds(self) -> tuple[float | None, float | None]:
        """The post-processing's own defaults: (box threshold, text threshold; None where it has none)."""
        box = self._parameters.get("threshold")
        text = self._parameters.get("text_threshold")
        return (
            None if box is None or box.default is inspect.Parameter.empty else float(box.default),
            None if text is None or text.default is inspect.Parameter.empty else float(text.default),
        )

    def inputs(self, image: Image.Image, phrases: Sequence[str]) -> dict[str, torch.Tensor]:
        """The processor's tensors for the image and phrases, on the detector's device (floats in its dtype)."""
        text: Any = grounding_text(phrases) if self.kind == GROUNDING else [list(phrases)]
        encoded = self.processor(images=image, text=text, return_tensors="pt")
        return {
            key: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            for key, value in encoded.items()
        }

    @torch.inference_mode()
    def outputs(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The model's raw outputs, with its logits and boxes in float32 on the CPU (what post-processing reads)."""
        outputs = self.model(**inputs)
        outputs.logits = outputs.logits.float().cpu()
        outputs.pred_boxes = outputs.pred_boxes.float().cpu()
        return outputs

    def detect(
        self,
        image: Image.Image,
        phrases: str | Sequence[str],
        box_threshold: float | None = None,
        text_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[Detection]:
        """The boxes of the phrases in the image, highest score first.

        Args:
            image: an RGB image.
            phrases: "a dog. a cat." or ["dog", "cat"] (see `parse_phrases`).
            box_threshold: the post-processing's `threshold` (None: its default).
            text_threshold: the post-processing's `text_threshold` (phrase grounding only; None: its default).
            max_detections: keep at most this many (the highest scores).

        Raises:
            DetectorError: a text threshold for a detector whose post-processing has none.
            ValueError: no phrase, or a threshold outside [0, 1].
        """
        phrases = parse_phrases(phrases)
        box_threshold, text_threshold = self.check_thresholds(box_threshold, text_threshold)
        if max_detections is not None and max_detections < 1:
            raise ValueError(f"max_detections must be at least 1, got {max_detections}")
        inputs = self.inputs(image, phrases)
        outputs = self.outputs(inputs)
        size = [(image.height, image.width)]
        if self.kind == GROUNDING:
            input_ids = inputs["input_ids"].cpu()
            result = self._post(
                outputs, input_ids, threshold=box_threshold, text_threshold=text_threshold, target_sizes=size
            )[0]
            named = self._phrases_of_grounded(
                outputs.logits[0], input_ids[0], len(phrases), box_threshold, text_threshold
            )
            if len(named) != len(result["scores"]):
                raise RuntimeError(
                    f"{self.name}: its post-processing kept {len(result['scores'])} boxes, finesam's reading of its "
                    f"logits {len(named)}: this transformers version post-processes differently"
                )
        else:
            keywords: dict[str, Any] = {"threshold": box_threshold, "target_sizes": size}
            if "text_labels" in self._parameters:
                keywords["text_labels"] = [phrases]
            result = self._post(outputs, **keywords)[0]
            named = [int(label) for label in result["labels"]]
        detections = []
        height, width = image.height, image.width
        for phrase, score, box in zip(named, result["scores"].tolist(), result["boxes"].tolist(), strict=True):
            if phrase is None:
                continue
            x1, y1, x2, y2 = (float(np.clip(v, 0, limit)) for v, limit in zip(box, (width, height) * 2, strict=True))
            detections.append(Detection(phrases[phrase], phrase, float(score), (x1, y1, x2, y2)))
        detections.sort(key=lambda d: -d.score)  # stable: equal scores keep the detector's order
        return detections[:max_detections]

    def check_thresholds(
        self, box_threshold: float | None, text_threshold: float | None
    ) -> tuple[float | None, float | None]:
        """The thresholds to use (the post-processing's defaults for None), checked."""
        default_box, default_text = self.default_thresholds()
        if text_threshold is not None and self.kind != GROUNDING:
            raise DetectorError(
                f"{self.name}: a text threshold is for phrase-grounding detectors (Grounding DINO); this one scores "
                "each class name as a whole (use the box threshold)"
            )
        box_threshold = default_box if box_threshold is None else box_threshold
        text_threshold = default_text if text_threshold is None else text_threshold
        for what, value in (("box threshold", box_threshold), ("text threshold", text_threshold)):
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"the {what} must be between 0 and 1, got {value}")
        return box_threshold, text_threshold

    def _phrases_of_grounded(
        self,
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        phrase_count: int,
        box_threshold: float | None,
        text_threshold: float | None,
    ) -> list[int | None]:
        """For each query the post-processing keeps (in its order), the phrase whose tokens score highest for
        it, or None where no token of any phrase passes the text threshold."""
        spans = self._phrase_spans(input_ids.tolist())
        if len(spans) != phrase_count:
            raise ValueError(
                f"{self.name}: the tokenized text holds {len(spans)} phrases, not {phrase_count} (too long for the "
                "detector's text length?): ask for fewer phrases at a time"
            )
        probabilities = logits.sigmoid()  # (queries, text positions)
        kept = probabilities.max(dim=-1).values > (0.25 if box_threshold is None else box_threshold)
        named: list[int | None] = []
        for query in probabilities[kept]:
            best = [float(query[span].max()) for span in spans]
            phrase = int(np.argmax(best))
            named.append(phrase if best[phrase] > (text_threshold or 0.0) else None)
        return named

    def _phrase_spans(self, ids: list[int]) -> list[list[int]]:
        """The token positions of each phrase in a tokenized grounding text: runs of tokens between the
        tokenizer's special tokens and the '.' separators."""
        tokenizer = self.processor.tokenizer
        separators = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(".")}
        spans: list[list[int]] = []
        run: list[int] = []
        for position, token in enumerate(ids):
            if token in separators:
                if run:
                    spans.append(run)
                run = []
            else:
                run.append(position)
        if run:
            spans.append(run)
        return spans
