"""`SegmentAnything`: image encoder -> prompt encoder -> mask decoder, as one fluxion chain."""

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
from jaxtyping import Float, Int
from PIL import Image
from refiners.fluxion import layers as fl
from refiners.fluxion.context import Contexts
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from finesam.inputs import CROP_THEN_RESIZE, LONGEST_SIDE_PADDED, POINTS_FIRST, resized_shape
from finesam.model.config import SAM_VIT_B, SAM_VIT_H, SAM_VIT_L, SAM_VIT_TINY, SAMConfig
from finesam.model.layers import ImageFeature, missing_features_message
from finesam.model.mask_decoder import MaskDecoder
from finesam.model.processing import (
    MASK_THRESHOLD,
    ImageLike,
    as_rgb,
    postprocess_masks,
    preprocess_image,
    resized_and_normalised,
)
from finesam.model.prompt_encoder import PromptEncoder, labelled_points
from finesam.model.prompts import Prompts, prepare_prompts
from finesam.model.quantized import quantize_linears
from finesam.model.registry import EncoderChain, family_of
from finesam.model.transformer import TwoWayTransformer


@dataclass(frozen=True)
class ImageEmbedding:
    """An encoded image, to be prompted any number of times."""

    embedding: Float[Tensor, "1 dim grid grid"]
    original_size: tuple[int, int]  # (height, width) of the image
    input_size: tuple[int, int]  # (height, width) of the image resized inside the model input
    # what adapters computed from the image (and may add to at inference, e.g. HQ-SAM's fused features)
    features: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """Masks for a batch of B prompts, C masks each (C = 3 with multimask output, else 1)."""

    masks: Tensor  # (B, C, H, W) at the original size: bool, or float logits with return_logits=True
    iou_predictions: Float[Tensor, "batch masks"]
    low_res_logits: Float[Tensor, "batch masks low low"]  # feed back as `mask_input` to refine
    # SAM 2: the logit that the prompted object is in the image at all (B, 1); None for SAM
    object_score_logits: Float[Tensor, "batch 1"] | None = None

    def best(self) -> tuple[Tensor, Float[Tensor, " batch"]]:
        """The mask with the highest predicted IoU for each prompt: (B, H, W) and its score (B,)."""
        scores, index = self.iou_predictions.max(dim=1)
        return self.masks[torch.arange(len(index)), index], scores


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where bf16 outruns int8."""
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up defensively
    return bool(is_supported()) if is_supported is not None else False


class SegmentAnything(fl.Chain):
    """Segment Anything as a chain: `ImageEncoder`, `PromptEncoder`, `MaskDecoder`.

    Called as a chain it maps a preprocessed image to (low-resolution mask logits, IoU predictions) for the
    prompt in the `sam` context (see `set_prompt`). `encode_image` / `predict` wrap that with the official
    pre- and postprocessing; stages after the first can be run on a cached embedding (`decode`).

    Adapters that compute more from the image than the embedding (HQ-SAM's fused features) write it to the
    `image` context while the first stage runs; `encode_image` keeps it in `ImageEmbedding.features` and
    `decode` puts it back, so a cached embedding serves every later prompt.

    Other model generations (SAM 2) and decoder variants (EfficientSAM) subclass it, with their decoder
    (`decoder_class`, `transformer_class`), prompt encoder (`prompt_encoder_class`, `takes_mask_input`,
    `fixed_prompt_points`) and their pre- and postprocessing (`preprocess` with its training twin `input_frame`,
    `sparse_points`, `postprocess`, `returned_low_res`).
    """

    decoder_class: ClassVar[type[fl.Chain]] = MaskDecoder
    # the decoder's two-way transformer (what the `decoder` LoRA preset adapts)
    transformer_class: ClassVar[type[fl.Chain]] = TwoWayTransformer
    # the prompt encoder: SAM's, or a variant's (EfficientSAM: fixed point count, no mask input)
    prompt_encoder_class: ClassVar[type[fl.Chain]] = PromptEncoder
    # whether prompts may hold a mask input (the low-resolution logits of an earlier prediction)
    takes_mask_input: ClassVar[bool] = True
    # what `preprocess`, `sparse_points` and `postprocess` do, by name: an ONNX export declares them in its
    # model.json, and the ONNX predictor (no torch model there) runs the numpy twins of these names
    processing_names: ClassVar[dict[str, str]] = {
        "preprocessing": LONGEST_SIDE_PADDED,
        "prompt_order": POINTS_FIRST,
        "postprocessing": CROP_THEN_RESIZE,
    }
    # the decoder's outputs after the mask logits and IoUs, by name, each (batch, 1) (SAM 2: object scores)
    extra_decoder_outputs: ClassVar[tuple[str, ...]] = ()
    # the automatic mask generator's defaults for this model (`finesam.amg.options.GENERATOR_PRESETS`)
    generator_preset: ClassVar[str] = "sam"

    def __init__(
        self, config: SAMConfig = SAM_VIT_B, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        # the encoder chain of the config's family (`finesam.model.registry`): no code here branches on a family
        family = family_of(config.encoder)
        if family.model is not None and not isinstance(self, family.model):
            raise ValueError(f"the {family.name} family's model is {family.model.__name__}: build it with build_sam")
        encoder = family.build(config.encoder, config.image_size, config.decoder.prompt_dim, device=device, dtype=dtype)
        super().__init__(
            encoder,
            cast(Callable[..., fl.Chain], self.prompt_encoder_class)(config, device=device, dtype=dtype),
            cast(Callable[..., fl.Chain], self.decoder_class)(config, device=device, dtype=dtype),
        )
        self.config = config
        self.prompt_chunk_size: int | None = 2  # see `decode`; None decodes a batch of prompts at once

    def init_context(self) -> Contexts:
        return {
            "image": {},
            "sam": {"point_coords": None, "point_labels": None, "mask_prompt": None, "multimask_output": False},
            "mask_decoder": {
                "sparse_prompt_embedding": None,
                "dense_prompt_embedding": None,
                "dense_positional_encoding": None,
                "query_pe": None,
                "key_pe": None,
                "image_with_pe": None,
            },
        }

    @property
    def image_encoder(self) -> EncoderChain[Any]:
        """The encoder chain of the configured family (`ImageEncoder` for ViT, `TinyViTEncoder` for TinyViT, ...)."""
        return self.ensure_find(family_of(self.config.encoder).encoder)

    @property
    def prompt_encoder(self) -> fl.Chain:
        """The prompt encoder chain (`prompt_encoder_class`)."""
        return self.ensure_find(self.prompt_encoder_class)

    @property
    def mask_decoder(self) -> fl.Chain:
        return self.ensure_find(self.decoder_class)

    def decoder_image_features(self) -> dict[str, tuple[int, ...]]:
        """The features, besides the embedding, that the image encoder itself writes to the `image` context for
        the decoder (context key -> shape for one image): none for SAM (adapters' features are theirs)."""
        return {}

    @property
    def encoder_input_size(self) -> int:
        """The side of the image encoder's input: the prompt frame (`config.image_size`) for SAM; a family may
        encode at another size (EfficientViT-SAM L: 512) while prompts and masks stay in the prompt frame."""
        return self.config.image_size

    def encoder_input_from_frame(self, pixels: Float[Tensor, "batch 3 size size"]) -> Float[Tensor, "batch 3 s s"]:
        """The encoder's input from normalised pixels drawn in the prompt frame (the trainer's samples, which
        hold the image and its masks in one frame): the same pixels where the encoder reads that frame."""
        return pixels

    @staticmethod
    def input_frame(image: Image.Image, side: int) -> Float[Tensor, "3 height width"]:
        """The image as `preprocess` frames it with `side` as the model size, before any padding: the training
        data draws its samples with it (at a jittered `side`). SAM: the longest side at `side`, the aspect ratio
        kept, normalised. A static method, so that the data pipeline holds a plain function, not the model."""
        return resized_and_normalised(image, resized_shape(image.height, image.width, side))

    def square_frame_input(self, image: Image.Image) -> tuple[Float[Tensor, "1 3 size size"], tuple[int, int]]:
        """`preprocess` of a model whose `input_frame` is a square (SAM 2, EfficientSAM): that frame at the model
        size, so that training and inference see the same pixels; the whole model input is the image."""
        size = self.config.image_size
        pixels = self.input_frame(image, size)[None]
        return pixels.to(device=self.device, dtype=self.dtype or torch.float32), (size, size)

    def preprocess(self, image: Image.Image) -> tuple[Float[Tensor, "1 3 size size"], tuple[int, int]]:
        """The model input for an RGB image, and the (height, width) the image occupies inside it: SAM resizes
        the longest side and pads (`finesam.model.processing.preprocess_image`)."""
        dtype = self.dtype or torch.float32
        return preprocess_image(image, self.config.image_size, device=self.device, dtype=dtype)

    def sparse_points(self, prompts: Prompts) -> tuple[Float[Tensor, "batch n 2"], Int[Tensor, "batch n"]]:
        """Points and boxes as one labelled point sequence, as the official encoder embeds them
        (`finesam.model.prompt_encoder.labelled_points`)."""
        return labelled_points(prompts)

    def postprocess(
        self,
        low_res: Float[Tensor, "batch masks low low"],
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> Float[Tensor, "batch masks height width"]:
        """Mask logits at the original image size (`finesam.model.processing.postprocess_masks`)."""
        return postprocess_masks(low_res, self.config.image_size, input_size, original_size)

    def fixed_prompt_points(self) -> int | None:
        """The number of points every prompt is padded to, for a model that embeds a fixed number (EfficientSAM);
        None for SAM (an ONNX export writes it to model.json for the predictor's prompt order)."""
        return None

    def returned_low_res(self, low_res: Float[Tensor, "batch masks low low"]) -> Float[Tensor, "batch masks low low"]:
        """The low-resolution logits `predict` returns (to feed back as a mask input): SAM's as they are."""
        return low_res

    def set_prompt(self, prompts: Prompts, multimask_output: bool = False) -> None:
        """Puts prompts, in model-input pixel coordinates, in the `sam` context for the next forward pass.

        Args:
            prompts: a batch of prompts (points with labels, boxes, mask inputs).
            multimask_output: three masks per prompt instead of one.
        """
        mask_input = prompts.mask_input
        if mask_input is not None and not self.takes_mask_input:
            raise ValueError(
                f"{type(self).__name__} takes no mask input (its prompt encoder has none): prompt it with points "
                "or boxes"
            )
        coords, kinds = self.sparse_points(prompts)
        device = self.device
        self.set_context(
            "sam",
            {
                "point_coords": coords.to(device=device, dtype=torch.float32),
                "point_labels": kinds.to(device=device),
                "mask_prompt": None
                if mask_input is None
                else mask_input.to(device=device, dtype=self.prompt_encoder.dtype),
                "multimask_output": multimask_output,
            },
        )

    @torch.no_grad()
    def encode_image(self, image: ImageLike) -> ImageEmbedding:
        """Encodes an image once, for any number of prompts.

        Args:
            image: PIL of any mode (EXIF-oriented) or a numpy array (H, W), (H, W, 3) or (H, W, 4); see `as_rgb`.

        Returns:
            The embedding, with the sizes and adapter features that decoding needs.
        """
        return self.encode_images([image])[0]

    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageLike]) -> list[ImageEmbedding]:
        """Encodes several images in one batch through the image encoder.

        Args:
            images: as `encode_image` takes them, of any sizes.

        Returns:
            One embedding per image, in order.
        """
        if not images:
            raise ValueError("no image to encode")
        rgb = [as_rgb(image) for image in images]
        inputs = [self.preprocess(image) for image in rgb]
        embeddings = self.encode(torch.cat([pixels for pixels, _ in inputs]))
        features = self.image_features()
        return [
            ImageEmbedding(
                embeddings[i : i + 1],
                (image.height, image.width),
                input_size,
                {k: v[i : i + 1] if isinstance(v, Tensor) else v for k, v in features.items()},
            )
            for i, (image, (_, input_size)) in enumerate(zip(rgb, inputs, strict=True))
        ]

    def encode(self, pixels: Float[Tensor, "batch 3 size size"]) -> Float[Tensor, "batch dim grid grid"]:
        """Runs the first stage (the image encoder and whatever adapts it) on preprocessed pixels, cast to the
        encoder's precision."""
        image = self._reset_image_features()  # a new image: nothing computed for the previous one applies
        encoder_dtype = self.image_encoder.dtype
        embedding = next(iter(self))(pixels if encoder_dtype is None else pixels.to(encoder_dtype))
        embedding = embedding[0] if isinstance(embedding, tuple) else embedding  # a Passthrough returns a 1-tuple
        # the encoder may run in another precision than the decoder (see `set_encoder_dtype`)
        decoder_dtype = self.mask_decoder.dtype
        for key, value in image.items():
            if isinstance(value, Tensor) and value.is_floating_point():
                image[key] = value.to(decoder_dtype)
        return embedding.to(decoder_dtype)

    def set_encoder_dtype(self, dtype: DType) -> "SegmentAnything":
        """Runs the image encoder (nearly all the compute) in `dtype`, e.g. `torch.bfloat16`, and keeps the
        prompt encoder and mask decoder in their own precision; embeddings are cast at the boundary.

        On a CPU without native bf16 matrix products (no AVX512-BF16 / AMX) bf16 is emulated and runs several
        times slower than float32: that case is warned about (`quantize_encoder` is the fast mode there).
        """
        device = next(self.image_encoder.parameters()).device
        if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                "this CPU has no native bfloat16 matrix units (AVX512-BF16 / AMX): the bfloat16 encoder runs "
                "several times slower than float32 here; int8 (quantize_encoder, --dtype int8) is the fast mode",
                stacklevel=2,
            )
        self.image_encoder.to(dtype=dtype)
        return self

    def quantize_encoder(self) -> "SegmentAnything":
        """Runs the image encoder's linear layers in int8 (dynamic quantisation; CPU only, inference only, not
        undone): per-channel int8 weights, activations quantised at each call; the rest stays in float32.
        Faster than bf16 except on CPUs with AMX, where bf16 is faster and closer to float32, which is warned
        about (see docs/performance.md). HQ-SAM, which only reads the encoder,
        works with it; a LoRA on the encoder's linear layers does not (refused; decoder LoRAs work).

        Raises:
            ValueError: the encoder is not on the CPU, not in float32, or has a LoRA on a linear layer.
        """
        parameter = next(self.image_encoder.parameters())
        if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            raise ValueError(f"int8 runs a float32 CPU encoder (this one: {parameter.dtype} on {parameter.device})")
        if cpu_has_amx():
            warnings.warn(
                "this CPU has AMX: the bfloat16 encoder (set_encoder_dtype, --dtype bfloat16) "
                "is faster than int8 here and closer to float32",
                stacklevel=2,
            )
        quantize_linears(self.image_encoder)
        return self

    def compile_encoder(self, freeze: bool = True) -> "SegmentAnything":
        """Compiles the image encoder with `torch.compile` (inductor) on its first call: minutes once, then a
        faster encoder (see docs/performance.md). Off by default.

        `freeze` (inductor's `freezing`) folds the weights into the compiled graph, which is where most of the
        CPU gain comes from; it applies to inference (`torch.no_grad`). It is passed to this compilation only
        (inductor's options, applied around each of its compilations and recompilations): inductor's global
        configuration is left as it was. Compiled kernels are cached on disk by inductor, so a later process
        compiles faster. Injecting an adapter into the encoder afterwards triggers a recompilation.

        Args:
            freeze: fold the weights into the compiled graph (inductor's `freezing`).

        Returns:
            The model itself.
        """
        self.image_encoder.compile(dynamic=False, options={"freezing": freeze})
        return self

    def _reset_image_features(self) -> dict[str, Any]:
        """Clears the `image` context, in place: that dict is shared by every chain of the tree."""
        image = self.use_context("image")
        image.update(dict.fromkeys(image))
        return image

    def _check_image_features(self) -> None:
        """Raises `ValueError` before decoding when an adapter injected after the encoder needs an image feature
        (an `ImageFeature` layer) that the current image's features lack: refiners would bury the same error in
        a dump of the whole chain."""
        image = self.use_context("image")
        stages = [stage for stage in list(self)[1:] if isinstance(stage, fl.Chain)]
        needed = {layer.key for stage in stages for layer, _ in stage.walk(ImageFeature)}
        if missing := sorted(key for key in needed if image.get(key) is None):
            raise ValueError(missing_features_message(missing))

    def image_features(self) -> dict[str, Any]:
        """The adapter features of the last encoded image (see `ImageEmbedding.features`)."""
        return {k: v for k, v in self.use_context("image").items() if v is not None}

    def decode(
        self,
        image_embedding: Float[Tensor, "batch dim grid grid"],
        prompts: Prompts,
        multimask_output: bool = False,
        image_features: dict[str, Any] | None = None,
    ) -> tuple[Float[Tensor, "batch masks low low"], Float[Tensor, "batch masks"]]:
        """Runs every stage after the image encoder on an embedding, for prompts as in `set_prompt`.

        On the CPU a batch of prompts for one image is decoded `prompt_chunk_size` prompts at a time: the
        per-prompt image tokens then stay in cache, which is faster than one large batch.

        Args:
            image_embedding: one embedding (shared by every prompt) or one per prompt.
            prompts: prompts in pixels of the model input.
            multimask_output: three masks per prompt instead of one.
            image_features: what adapters computed with the embedding (`ImageEmbedding.features`); it also
                receives what they cache for the image while decoding (HQ-SAM's fused features). By default
                the features of the last encoded image stay in use.

        Returns:
            Low-resolution mask logits and predicted IoUs.
        """
        masks, iou, *_ = self.decode_outputs(image_embedding, prompts, multimask_output, image_features)
        return masks, iou

    def decode_outputs(
        self,
        image_embedding: Float[Tensor, "batch dim grid grid"],
        prompts: Prompts,
        multimask_output: bool = False,
        image_features: dict[str, Any] | None = None,
    ) -> tuple[Tensor, ...]:
        """`decode` with every output of the decoder: mask logits, IoUs, then what a decoder adds (SAM 2's
        object-score logits)."""
        if image_features is not None:
            self._reset_image_features().update(image_features)
        self._check_image_features()
        batch = prompts.batch_size
        chunk = self.prompt_chunk_size if self.device is None or self.device.type == "cpu" else None
        if not chunk or batch <= chunk or image_embedding.shape[0] != 1:
            result = self._decode(image_embedding, prompts, multimask_output)
        else:
            parts = [
                self._decode(image_embedding, prompts[i : i + chunk], multimask_output) for i in range(0, batch, chunk)
            ]
            result = tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))
        if image_features is not None:
            image_features.update(self.image_features())  # keep what the decoder cached for this image
        return result

    def _decode(self, image_embedding: Tensor, prompts: Prompts, multimask_output: bool) -> tuple[Tensor, ...]:
        self.set_prompt(prompts, multimask_output)
        x: Any = image_embedding
        for stage in list(self)[1:]:
            x = stage(*x) if isinstance(x, tuple) else stage(x)
        self._reset_context()
        return x

    def decode_prompts(
        self,
        embedding: ImageEmbedding,
        *,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        mask_input: Any = None,
        multimask_output: bool = False,
    ) -> tuple[Float[Tensor, "batch masks low low"], Float[Tensor, "batch masks"]]:
        """Low-resolution mask logits and predicted IoUs for prompts on a cached embedding; what the decoder
        caches for the image (HQ-SAM's fused features) is kept in the embedding.

        Args:
            embedding: from `encode_image`.
            points, labels, boxes, mask_input: as `predict` takes them, in pixels of the original image.
            multimask_output: three masks per prompt instead of one.

        Returns:
            float32 logits (B, C, 256, 256) and predicted IoUs (B, C).
        """
        prompt = dict(points=points, labels=labels, boxes=boxes, mask_input=mask_input)
        low_res, iou, *_ = self._prompt_outputs(embedding, **prompt, multimask_output=multimask_output)
        return low_res, iou

    def _prompt_outputs(
        self,
        embedding: ImageEmbedding,
        *,
        points: Any,
        labels: Any,
        boxes: Any,
        mask_input: Any,
        multimask_output: bool,
    ) -> tuple[Tensor, ...]:
        """Every decoder output for prompts in pixels of the original image, in float32."""
        prompts = prepare_prompts(
            points=points,
            labels=labels,
            boxes=boxes,
            mask_input=mask_input,
            original_size=embedding.original_size,
            input_size=embedding.input_size,
            mask_input_size=self.config.mask_input_size,
        )
        outputs = self.decode_outputs(embedding.embedding, prompts, multimask_output, embedding.features)
        return tuple(output.float() for output in outputs)

    @torch.no_grad()
    def predict(
        self,
        image: ImageLike | ImageEmbedding,
        *,
        points: Any = None,
        labels: Any = None,
        boxes: Any = None,
        mask_input: Any = None,
        multimask_output: bool = False,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for one image and a batch of B prompts, given in pixels of the original image.

        Args:
            image: an image (as `encode_image` takes it) or its `ImageEmbedding`, to prompt many times.
            points: (N, 2) or (B, N, 2) x, y clicks.
            labels: (N,) or (B, N): 1 foreground, 0 background (default: all foreground).
            boxes: (4,) or (B, 4) as x1, y1, x2, y2.
            mask_input: the `low_res_logits` of an earlier prediction, to refine it.
            multimask_output: three candidate masks per prompt instead of one.
            return_logits: float logits at the original size instead of boolean masks.

        Returns:
            A `Prediction`: masks (B, C, H, W), iou_predictions (B, C), low_res_logits (B, C, 256, 256).

        Raises:
            ValueError: a prompt is malformed or outside the image; the message says what is wrong.
        """
        embedding = image if isinstance(image, ImageEmbedding) else self.encode_image(image)
        prompt = dict(points=points, labels=labels, boxes=boxes, mask_input=mask_input)
        low_res, iou, *extra = self._prompt_outputs(embedding, **prompt, multimask_output=multimask_output)
        scores = extra[0] if extra else None
        sizes = (embedding.input_size, embedding.original_size)
        if return_logits:
            return Prediction(self.postprocess(low_res, *sizes), iou, self.returned_low_res(low_res), scores)
        # one prompt at a time: the float logits of a huge image never exist for the whole batch at once
        height, width = embedding.original_size
        masks = torch.empty(low_res.shape[0], low_res.shape[1], height, width, dtype=torch.bool, device=low_res.device)
        for i in range(low_res.shape[0]):
            masks[i] = self.postprocess(low_res[i : i + 1], *sizes)[0] > MASK_THRESHOLD
        return Prediction(masks, iou, self.returned_low_res(low_res), scores)


def build_sam(config: SAMConfig, device: Device | str | None = None, dtype: DType | None = None) -> SegmentAnything:
    """The model chain of `config`'s family: `SegmentAnything`, or the family's own subclass (SAM 2's).

    Args:
        config: any registered family's configuration.
        device, dtype: where and in which precision the weights are made.

    Returns:
        The model, with freshly initialised weights.
    """
    model = family_of(config.encoder).model or SegmentAnything
    return model(config, device=device, dtype=dtype)


class SegmentAnythingB(SegmentAnything):
    """SAM ViT-B (`sam_vit_b_01ec64.pth`)."""

    def __init__(self, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(SAM_VIT_B, device=device, dtype=dtype)


class SegmentAnythingL(SegmentAnything):
    """SAM ViT-L (`sam_vit_l_0b3195.pth`)."""

    def __init__(self, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(SAM_VIT_L, device=device, dtype=dtype)


class SegmentAnythingH(SegmentAnything):
    """SAM ViT-H (`sam_vit_h_4b8939.pth`)."""

    def __init__(self, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(SAM_VIT_H, device=device, dtype=dtype)


class SegmentAnythingTiny(SegmentAnything):
    """MobileSAM / Light HQ-SAM base (`mobile_sam.pt`, `sam_hq_vit_tiny.pth`): TinyViT encoder."""

    def __init__(self, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(SAM_VIT_TINY, device=device, dtype=dtype)
