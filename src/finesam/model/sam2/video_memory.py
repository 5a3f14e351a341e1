"""`SAM2VideoMemory`: every module of SAM 2's memory path, beside the image model (`SegmentAnything2`).

The image model (Hiera encoder, prompt encoder, SAM 2 decoder, `no_mem_embed`) segments a frame; these parts turn
a segmented frame into a memory (`memory_encoder`, `object_pointer`), and condition a new frame on the memories
of others (`memory_attention`, with the temporal encodings `memory_time` and `pointer_time`). The weights are the
official ones a converted SAM 2 file keeps (`finesam.weights.sam2_memory`).
"""

import torch
from refiners.fluxion import layers as fl
from torch import device as Device
from torch import dtype as DType

from finesam.model.sam2.memory_attention import MemoryAttention
from finesam.model.sam2.memory_config import SAM2_1_MEMORY, SAM2MemoryConfig
from finesam.model.sam2.memory_encoder import MemoryEncoder
from finesam.model.sam2.memory_layers import SinePositionEncoding2d
from finesam.model.sam2.object_pointers import MemoryTimeEncoding, ObjectPointer, OccludedMasks, PointerTimeEncoding


class MaskInputDownsample(fl.Chain):
    """A mask given as input (image size, 0 / 1) to the decoder's mask-prompt size: a 4 x 4 convolution of stride
    4 (`mask_downsample`), used to make a pointer for a frame whose mask the user gave."""

    def __init__(self, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(fl.Conv2d(1, 1, kernel_size=4, stride=4, device=device, dtype=dtype))


class SAM2VideoMemory(fl.Module):
    """The modules of SAM 2's memory path (no forward of its own: the tracking step calls them).

    Attributes:
        config: the memory's hyper-parameters.
        memory_encoder: (image embedding, mask logits, object scores) -> (memory, positions).
        memory_attention: image tokens conditioned on memory tokens.
        object_pointer: (decoder output token, object score) -> the frame's object pointer.
        pointer_time: normalised frame distances -> the pointers' positions (`None` without that encoding:
            their positions are zeros).
        memory_time: the memory slots' learned temporal encodings.
        image_positions: the sine positions of the current frame's image tokens (the neck's level-2 encoding).
        occluded_masks: mask logits -> -1024 where the object is predicted absent.
        mask_input_downsample: a given mask to the decoder's mask-prompt size.
        no_memory_positions: `no_mem_pos_enc`, stored for the weights; unused by the released configurations
            (they add `no_mem_embed` to a frame without memories instead of attending to it).
    """

    def __init__(
        self, config: SAM2MemoryConfig = SAM2_1_MEMORY, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.memory_encoder = MemoryEncoder(config, device=device, dtype=dtype)
        self.memory_attention = MemoryAttention(config, device=device, dtype=dtype)
        self.object_pointer = ObjectPointer(config, device=device, dtype=dtype)
        self.pointer_time = (
            PointerTimeEncoding(config, device=device, dtype=dtype) if config.pointer_time_encoding else None
        )
        self.memory_time = MemoryTimeEncoding(config.num_maskmem, config.memory_dim, device=device, dtype=dtype)
        self.image_positions = SinePositionEncoding2d(config.dim)
        self.occluded_masks = OccludedMasks()
        self.mask_input_downsample = MaskInputDownsample(device=device, dtype=dtype)
        self.no_memory_positions = torch.nn.Parameter(torch.zeros(config.dim, device=device, dtype=dtype))
