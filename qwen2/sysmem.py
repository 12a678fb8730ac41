"""Keep the process's resident memory close to what it actually holds (glibc malloc only).

Loading a model frees many tensors of a few MB (dequantized GGUF blocks, float weights that were
just quantized). glibc raises its mmap threshold after the first large free, so later blocks of
that size come from the heap, which it rarely gives back: loading the demo model with int4 weights
peaked at 2.4 GB RSS for 0.55 GB of weights and kept 2.0 GB. Allocations of 4 MiB and more go
to their own mappings while loading (returned on free), and the heap is trimmed afterwards. Elsewhere (musl,
macOS) these are no-ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from typing import Iterator

_M_MMAP_THRESHOLD = -3
_LOADING_THRESHOLD = 4 << 20
_SERVING_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Give freed heap memory back to the OS."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def bounded_heap() -> Iterator[None]:
    """While loading: big temporaries never settle in the heap; afterwards, trim it."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _LOADING_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _SERVING_THRESHOLD)
            libc.malloc_trim(0)
