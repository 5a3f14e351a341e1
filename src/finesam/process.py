"""Everything finesam changes for the whole process, in one place, and only where a caller asks for it.

- `reuse_freed_memory()`: a setting of the C allocator (glibc on Linux) for large CPU tensors.
- `set_pixel_limit()`: PIL's decompression-bomb limit, the one images are read with (`finesam.inputs`).
- `configure_command()`: what a `finesam` command sets, once its arguments are parsed (the allocator for the
  commands that hold large tensors, the pixel limit where `--max-pixels` is given). Nothing else is set:
  torch's thread counts stay as torch chose them, the global random generators are never reseeded (training
  seeds its own generators; see `seeded_global_rng` for the weights of new adapters), and the encoder's
  compilation passes inductor's `freezing` to that compilation only (`SegmentAnything.compile_encoder`).

Why the allocator: by default glibc serves every allocation above 32 MB (ViT MLP activations, TinyViT's
256-channel maps) with a fresh `mmap` and gives it back to the kernel when freed, so each large tensor is paid
again in page faults: the kernel zeroes every 4 KB page on first touch. What reusing freed memory saves is
measured by `benchmarks/bench_allocator.py` (docs/performance.md).
"""

import contextlib
import ctypes
import sys
from collections.abc import Iterator

import torch
from PIL import Image

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory(limit: int = 1 << 30) -> bool:
    """Makes glibc serve allocations up to `limit` bytes from its heap and keep up to `limit` bytes of freed
    memory for reuse, instead of mapping and unmapping pages for each large tensor.

    Process-wide and for the rest of the process: memory freed after a peak stays with the process, which is
    why it is opt-in. The `finesam` commands that hold large tensors turn it on (`configure_command`).

    Args:
        limit: the largest allocation served from the heap, and the most freed memory kept, in bytes.

    Returns:
        Whether the setting was made: False (and nothing changed) where the C library is not glibc.
    """
    if limit < 1:
        raise ValueError(f"limit must be a positive number of bytes, got {limit}")
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None)  # the symbols already loaded into the process, the C library's among them
    if not hasattr(libc, "gnu_get_libc_version"):  # musl has a mallopt that does nothing
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    limit = min(limit, 2**31 - 1)  # mallopt takes an int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))


def set_pixel_limit(pixels: int) -> None:
    """Sets PIL's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`): images with more pixels are refused when read.

    Args:
        pixels: the most pixels an input image may have.
    """
    if pixels < 1:
        raise ValueError(f"the pixel limit must be a positive number, got {pixels}")
    Image.MAX_IMAGE_PIXELS = pixels


def configure_command(large_tensors: bool, max_pixels: int | None = None) -> None:
    """What a `finesam` command sets for its process, called once its arguments are parsed (so that `--help`
    or a bad option changes nothing).

    Args:
        large_tensors: the command runs a model or reads checkpoints: reuse freed memory (`reuse_freed_memory`).
        max_pixels: `--max-pixels`, if given: PIL's pixel limit (`set_pixel_limit`).
    """
    if large_tensors:
        reuse_freed_memory()
    if max_pixels is not None:
        set_pixel_limit(max_pixels)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seeds torch's global random generator for the code inside (the default initialisation of new layers
    draws from it) and restores its state afterwards, so that a caller's random stream is not changed.

    Args:
        seed: the seed inside.
        device: the device whose generator is saved and restored too, besides the CPU's (cuda, mps, ...).
    """
    device = torch.device(device)
    accelerator = [] if device.type == "cpu" else [device.index or 0]
    device_type = "cuda" if device.type == "cpu" else device.type
    with torch.random.fork_rng(devices=accelerator, device_type=device_type):
        torch.manual_seed(seed)
        yield
