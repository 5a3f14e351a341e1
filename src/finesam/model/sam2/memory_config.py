"""Hyper-parameters of SAM 2's video memory: the memory encoder, the memory attention, the object pointers and the
temporal encodings, with the values of the official SAM 2.1 and SAM 2.0 configurations (every size shares them).
"""

from dataclasses import dataclass

from finesam.model.config import check_config


@dataclass(frozen=True)
class SAM2MemoryConfig:
    """SAM 2's memory path (`SAM2Base`'s memory options). Defaults: SAM 2.1 (all four sizes).

    Attributes:
        dim: width of the image embedding and of the object pointers (`hidden_dim`, the neck's `d_model`).
        memory_dim: width of a spatial memory (the memory encoder's `out_dim`).
        num_maskmem: memories a frame attends to: the conditioning frames plus `num_maskmem - 1` previous frames;
            also the number of learned temporal encodings (`maskmem_tpos_enc`).
        attention_layers: memory attention layers.
        attention_heads: heads of both RoPE attentions.
        feedforward_dim: hidden width of each memory attention layer's MLP.
        dropout: dropout of the memory attention (active in training only).
        rope_theta: base of the rotary frequencies.
        rope_grid: (width, height) of the token grid the rotary frequencies are made for (other square grids are
            computed when met).
        position_at_input: 0.1 x the current frame's position encoding is added to its tokens first
            (`pos_enc_at_input`).
        position_at_self_attention: positions added to the self-attention's queries and keys (`pos_enc_at_attn`).
        position_at_cross_queries: positions added to the cross-attention's queries.
        position_at_cross_keys: the memories' positions added to the cross-attention's keys.
        mask_kernel / mask_stride / mask_padding / mask_total_stride: the mask downsampler's convolutions.
        fuser_layers: ConvNeXt blocks of the fuser.
        fuser_kernel: their depth-wise kernel.
        layer_scale_init: initial value of the blocks' layer scale (`gamma`).
        sigmoid_scale / sigmoid_bias: the mask's sigmoid probability is mapped to `scale * p + bias` before the
            memory encoder (`sigmoid_scale_for_mem_enc`, `sigmoid_bias_for_mem_enc`).
        binarize_prompted_masks: on frames with clicks, the mask is thresholded instead of the sigmoid
            (`binarize_mask_from_pts_for_mem_enc`: what the official video predictor sets).
        non_overlapping_masks: where objects overlap, only the highest logit is kept before the memory encoder
            (`non_overlap_masks_for_mem_enc`).
        no_object_spatial: a learned embedding is added to the memory of a frame where the object is predicted
            absent (`no_obj_embed_spatial`, new in 2.1).
        max_pointers: object pointers a frame attends to at most (`max_obj_ptrs_in_encoder`).
        pointer_mlp_layers: layers of the pointer projection (`obj_ptr_proj`; 1: a linear).
        pointer_time_encoding: the pointers' temporal sine encoding (`add_tpos_enc_to_obj_ptrs`).
        pointer_time_projection: that encoding is made at `dim` and projected to `memory_dim`
            (`proj_tpos_enc_in_obj_ptrs`).
        signed_pointer_time: the pointers' distances are signed (`use_signed_tpos_enc_to_obj_ptrs`).
        only_past_pointers: conditioning frames' pointers only from the past in evaluation
            (`only_obj_ptrs_in_the_past_for_eval`).
        fixed_no_object_pointer: an absent object's pointer is `no_obj_ptr` alone (else it is added).
        soft_no_object_pointer: the absent weight is the object score's sigmoid instead of a hard threshold.
    """

    dim: int = 256
    memory_dim: int = 64
    num_maskmem: int = 7
    attention_layers: int = 4
    attention_heads: int = 1
    feedforward_dim: int = 2048
    dropout: float = 0.1
    rope_theta: float = 10000.0
    rope_grid: tuple[int, ...] = (64, 64)
    position_at_input: bool = True
    position_at_self_attention: bool = False
    position_at_cross_queries: bool = False
    position_at_cross_keys: bool = True
    mask_kernel: int = 3
    mask_stride: int = 2
    mask_padding: int = 1
    mask_total_stride: int = 16
    fuser_layers: int = 2
    fuser_kernel: int = 7
    layer_scale_init: float = 1e-6
    sigmoid_scale: float = 20.0
    sigmoid_bias: float = -10.0
    binarize_prompted_masks: bool = True
    non_overlapping_masks: bool = False
    no_object_spatial: bool = True
    max_pointers: int = 16
    pointer_mlp_layers: int = 3
    pointer_time_encoding: bool = True
    pointer_time_projection: bool = True
    signed_pointer_time: bool = True
    only_past_pointers: bool = True
    fixed_no_object_pointer: bool = True
    soft_no_object_pointer: bool = False

    def __post_init__(self) -> None:
        check_config(
            self,
            lambda: [
                (self.dim % self.attention_heads == 0, "attention_heads must divide dim"),
                ((self.dim // self.attention_heads) % 4 == 0, "the rotary encoding needs a head width divisible by 4"),
                (self.dim % self.memory_dim == 0, "memory_dim must divide dim (a pointer is split into tokens)"),
                (len(self.rope_grid) == 2, "rope_grid is (width, height)"),
                (
                    self.mask_stride**self.mask_layers == self.mask_total_stride,
                    "mask_total_stride must be a power of mask_stride",
                ),
                (
                    not self.pointer_time_projection or self.pointer_time_encoding,
                    "pointer_time_projection needs pointer_time_encoding",
                ),
            ],
            {
                "dropout": (0.0, 1.0),
                "rope_theta": (1.0, 1e9),
                "layer_scale_init": (0.0, 1e3),
                "sigmoid_scale": (-1e3, 1e3),
                "sigmoid_bias": (-1e3, 1e3),
                "num_maskmem": (1, 256),
                "mask_stride": (2, 64),
                "mask_total_stride": (2, 1024),
                "pointer_mlp_layers": (1, 16),
            },
        )

    @property
    def mask_layers(self) -> int:
        """Strided convolutions of the mask downsampler."""
        layers, stride = 0, 1
        while stride < self.mask_total_stride and layers < 16:
            stride *= self.mask_stride
            layers += 1
        return layers

    @property
    def pointer_tokens(self) -> int:
        """Memory tokens per object pointer (a pointer is split into `dim / memory_dim` tokens)."""
        return self.dim // self.memory_dim


SAM2_1_MEMORY = SAM2MemoryConfig()
# SAM 2.0: no spatial no-object embedding, object pointers without a temporal encoding
SAM2_MEMORY = SAM2MemoryConfig(
    no_object_spatial=False, pointer_time_encoding=False, pointer_time_projection=False, signed_pointer_time=False
)
