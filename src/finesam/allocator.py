"""Large CPU tensors without fresh pages: an opt-in setting of the C allocator (glibc on Linux).

By default glibc serves every allocation above 32 MB (ViT MLP activations, TinyViT's 256-channel maps) with
a fresh `mmap` and gives it back to the kernel when freed, so each large tensor is paid again in page faults:
the kernel zeroes every 4 KB page on first touch. What reusing freed memory saves is measured by
`benchmarks/bench_allocator.py` (docs/performance.md).
"""

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory(limit: int = 1 << 30) -> bool:
    """Makes glibc serve allocations up to `limit` bytes from its heap and keep up to `limit` bytes of freed
    memory for reuse, instead of mapping and unmapping pages for each large tensor.

    Process-wide and for the rest of the process: memory freed after a peak stays with the process, which is
    why it is opt-in. The `finesam` command turns it on. Returns False (and changes nothing) where the C
    library is not glibc.
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
