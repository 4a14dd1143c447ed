"""Hand freed heap memory back to the OS between batches (glibc `malloc_trim`, pyarrow's pool).

A long-lived worker that allocates and frees arrays of many megabytes per batch (a Ray Data
map task, a scoring actor, a prepare process) otherwise keeps the freed memory resident:
glibc raises its mmap threshold after the first large free, so later large arrays come
from the heap and stay mapped after `free`, and mimalloc keeps pyarrow's freed buffers.
The resident size then grows with the number of batches a process has seen, i.e. with the
release (measured at 10,034 identities in `bench/bench_scale.py`: a scoring actor 1.28 GB
private without, 0.90 GB with the heap handed back; docs/benchmarks.md, issue 14).
"""

from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_memory() -> None:
    """Return this process's freed heap pages (glibc) and pyarrow's unused buffers to the OS.
    Cheap (a few ms on a ~1 GB heap); call it after each batch or task."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
