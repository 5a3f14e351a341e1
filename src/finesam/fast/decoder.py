"""Fast versions of the mask decoder's attentions: the image side of the first two-way block remembered for
the image, and attentions between the few prompt tokens and the many image tokens that never project every
image token. Each computes its reference's formula up to float rounding (tests/test_fast_paths.py)."""

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from refiners.fluxion import layers as fl
from refiners.fluxion.adapters import LinearLora, LoraAdapter
from torch import Tensor

from finesam.adapters.lora import merged_weight
from finesam.fast.swap import fast_version_of, swapped_by_type
from finesam.model.layers import weights_key
from finesam.model.prompt_encoder import DensePositionalEncoding as ReferenceDensePositionalEncoding

_INTEGERS_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of the same shape, dtype and device hold the same bits: what a memory keyed on its
    input needs (an equal input gives an equal output; -0.0 and 0.0, or two NaNs, are told apart or matched by
    their bits). Compared as 64-bit integers where the memory allows, which on the CPU takes half the time of
    `torch.equal` on floats."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    size = a.element_size()
    integers = _INTEGERS_OF_SIZE.get(size)
    if integers is None:
        return torch.equal(a, b)

    def whole_words(t: Tensor) -> bool:  # a run of 64-bit words: contiguous, aligned start and length
        return t.is_contiguous() and (t.storage_offset() * size) % 8 == 0 and (t.numel() * size) % 8 == 0

    if whole_words(a) and whole_words(b):
        a, b, integers = a.reshape(-1), b.reshape(-1), torch.int64
    return torch.equal(a.view(integers), b.view(integers))


def linear_weights(module: fl.Module) -> tuple[Tensor, Tensor | None] | None:
    """The weight and bias that `module` applies, if it is a plain linear layer, alone or under LoRAs only
    (folded in); None for anything else (an adapter that might compute something else)."""
    if type(module) is fl.Linear:
        return module.weight, module.bias
    if isinstance(module, LoraAdapter) and type(linear := module.target) is fl.Linear:
        loras = list(module.lora_layers)
        if len(module) == 1 + len(loras) and all(type(lora) is LinearLora for lora in loras):
            return merged_weight(module), linear.bias
    return None


def _projection_identity(module: fl.Module) -> tuple[Any, ...] | None:
    """What identifies the function a projection computes: its weights (`weights_key`) and LoRA scales; None
    for a module that is not a linear layer, alone or under LoRAs."""
    if type(module) is fl.Linear:
        return weights_key(tuple(module.parameters()))
    if linear_weights(module) is not None:
        assert isinstance(module, LoraAdapter)
        return weights_key(tuple(module.parameters())), tuple(lora.scale for lora in module.lora_layers)
    return None


@dataclass(frozen=True)
class RememberedProjection:
    """One image-side projection of the first two-way block, kept with the image's features."""

    identity: tuple[Any, ...]  # the projection's weights when it was computed (`_projection_identity`)
    input: Tensor
    output: Tensor
    weights: tuple[Tensor, ...]  # referenced, so that the ids in `identity` stay theirs


@fast_version_of(fl.Distribute)
class Distribute(fl.Distribute):
    """The query, key and value projections of an attention of the first two-way block, where those at
    `image_side` read the image tokens only: before the first block they are the image embedding plus the
    dense prompt embedding, the same for every prompt without a mask input. At inference, for one image, their
    outputs are kept in the `image` context under `memory_key` (so in the `ImageEmbedding`'s features, next to
    HQ-SAM's) and used again for an input with the same bits and the same weights.

    Set by the swap: `image_side` (indices among q, k, v) and `memory_key`.
    """

    image_side: tuple[int, ...]
    memory_key: str

    def forward(self, *args: Tensor) -> tuple[Tensor, ...]:
        if torch.is_grad_enabled():
            return super().forward(*args)
        return tuple(self.project(index, x) for index, x in enumerate(args))

    def project(self, index: int, x: Tensor) -> Tensor:
        """Projection `index` of `x`, from the image's memory where it holds it."""
        module = self[index]
        if index not in self.image_side or x.shape[0] != 1 or torch.is_grad_enabled():
            return module(x)
        memory = self.provider.get_context("image")
        identity = _projection_identity(module)  # only for what may be remembered: it reads every weight
        if memory is None or identity is None:
            return module(x)
        key = f"{self.memory_key}.{index}"
        remembered = memory.get(key)
        if (
            isinstance(remembered, RememberedProjection)
            and remembered.identity == identity
            and same_bits(remembered.input, x)
        ):
            return remembered.output
        output = module(x)
        memory[key] = RememberedProjection(identity, x, output, tuple(module.parameters()))
        return output


def _remembers_queries(attention: fl.Attention) -> bool:
    projections = attention[0]
    return isinstance(projections, Distribute) and 0 in projections.image_side


@fast_version_of(fl.Attention)
class FewQueriesAttention(fl.Attention):
    """The prompt tokens query the image tokens without projecting the image tokens.

    For head h with key projection (W_h, b_h), `q_h . (W_h x + b_h) = (W_h^T q_h) . x + q_h . b_h`: the queries
    are taken back to the keys' input space, where the scores are one product with the image tokens (the
    `q_h . b_h` term is the same for every key, and the softmax drops it). The weights sum to 1, so the values'
    projection commutes with the weighted sum and is applied to the few mixed rows instead of every image
    token. LoRAs on the projections are folded into their weights.

    Used while heads x queries stays under the inner width (fewer multiply-adds), at inference, with a plain
    attention kernel and linear projections; otherwise the reference formula.
    """

    def forward(self, *args: Tensor) -> Tensor:
        query, key, value = args
        plain = type(self[1]) is fl.ScaledDotProductAttention
        if torch.is_grad_enabled() or not plain or query.shape[1] * self.num_heads >= self.inner_dim:
            return super().forward(query, key, value)
        to_query, to_key, to_value = self.ensure_find(fl.Distribute)
        key_weights, value_weights = linear_weights(to_key), linear_weights(to_value)
        if key_weights is None or value_weights is None:
            return super().forward(query, key, value)
        (key_weight, _), (value_weight, value_bias) = key_weights, value_weights
        q = to_query(query)
        batch, tokens, inner = q.shape
        heads = self.num_heads
        head_dim = inner // heads
        q = q.reshape(batch, tokens, heads, head_dim) * head_dim**-0.5
        queries_in_input_space = torch.einsum("bthd,hdc->bhtc", q, key_weight.unflatten(0, (heads, head_dim)))
        weights = (queries_in_input_space.flatten(1, 2) @ key.transpose(1, 2)).softmax(dim=-1)  # (B, H * T, N)
        mixed = (weights @ value).unflatten(1, (heads, tokens))  # (B, H, T, input width)
        out = torch.einsum("bhtc,hdc->bthd", mixed, value_weight.unflatten(0, (heads, head_dim)))
        out = out.reshape(batch, tokens, inner)
        if value_bias is not None:
            out = out + value_bias
        return self[2](out)


def _block_diagonal(x: Float[Tensor, "batch length heads*head_dim"], heads: int) -> Tensor:
    """(B, L, H * d) -> (B, H * d, H * L): head h's features feed only head h's L columns, zeros elsewhere."""
    batch, length, dim = x.shape
    one_hot = torch.eye(heads, device=x.device, dtype=x.dtype)
    split = x.reshape(batch, length, heads, dim // heads)
    return torch.einsum("blhd,hg->bhdgl", split, one_hot).reshape(batch, dim, heads * length)


def softmax_over_key_rows(scores: Float[Tensor, "batch heads*keys queries"], heads: int, keys: int) -> Tensor:
    """Softmax over each head's `keys` rows of (B, H * L, Q) scores (rows: one per head and key)."""
    grouped = scores.unflatten(1, (heads, keys))
    weights = (grouped - grouped.amax(dim=2, keepdim=True)).exp()
    return (weights / weights.sum(dim=2, keepdim=True)).flatten(1, 2)


@fast_version_of(fl.Attention)
class FewKeysAttention(fl.Attention):
    """The image tokens query the few prompt tokens, with every head in two matrix products.

    With a handful of keys, per-head kernels spend their time on per-row overheads (a softmax over 7 values,
    4096 times per head). Here the keys and values are block-diagonal (one row per head and key), the softmax
    runs over the key rows, and the output projection is applied to each head's few value rows before the
    weighted sum instead of to every image token after it. Unless the query projection is remembered for the
    image (the first block), the keys are taken to the queries' input space as in `FewQueriesAttention` (here
    the `k_h . b_h` term differs between keys and is kept).

    Used while heads x keys stays under the inner width, at inference, with a plain kernel and output
    projection; otherwise the reference formula.
    """

    def forward(self, *args: Tensor) -> Tensor:
        query, key, value = args
        heads, keys = self.num_heads, key.shape[1]
        plain = type(self[1]) is fl.ScaledDotProductAttention
        out_weights = linear_weights(self[2])
        if torch.is_grad_enabled() or not plain or out_weights is None or keys * heads >= self.inner_dim:
            return super().forward(query, key, value)
        projections = self.ensure_find(fl.Distribute)
        to_query, to_key, to_value = projections
        k = to_key(key)
        k_rows = _block_diagonal(k * (k.shape[2] // heads) ** -0.5, heads).transpose(1, 2)  # (B, H * L, inner)
        query_weights = None if _remembers_queries(self) else linear_weights(to_query)
        if query_weights is None:
            projected = projections.project(0, query) if isinstance(projections, Distribute) else to_query(query)
            scores = k_rows @ projected.transpose(1, 2)  # (B, H * L, N)
        else:
            query_weight, query_bias = query_weights
            scores = (k_rows @ query_weight) @ query.transpose(1, 2)
            if query_bias is not None:
                scores = scores + (k_rows @ query_bias).unsqueeze(2)
        weights = softmax_over_key_rows(scores, heads, keys)
        out_weight, out_bias = out_weights
        # each head's value rows through its slice of the output projection: (B, H * L, output width)
        projected_values = _block_diagonal(to_value(value), heads).transpose(1, 2) @ out_weight.T
        if out_bias is None:
            return weights.transpose(1, 2) @ projected_values  # (B, N, H * L) x (B, H * L, output width)
        return torch.baddbmm(out_bias, weights.transpose(1, 2), projected_values)  # the bias in the same pass


@swapped_by_type()
@fast_version_of(ReferenceDensePositionalEncoding)
class DensePositionalEncoding(ReferenceDensePositionalEncoding):
    """The dense positional encoding computed once and remembered while the Gaussian matrix is unchanged
    (`weights_key`): it depends on nothing else, and costs about 0.75 ms of sin / cos per call."""

    fast_state = ("_memory",)

    def forward(self, *args: Tensor) -> Float[Tensor, "1 dim grid grid"]:
        if torch.is_grad_enabled():
            return super().forward(*args)
        matrix = self.encoding.get_buffer("gaussian_matrix")
        key = weights_key((matrix,))
        memory = vars(self).get("_memory")  # one read: another thread may replace it
        if memory is not None and memory[0] == key:
            return memory[1]
        output = super().forward(*args)
        vars(self)["_memory"] = (key, output, matrix)
        return output
