"""`rayvid.release.memory.release_memory`: freed heap memory goes back to the OS.

The case it exists for (issue 14): a long-lived worker (a Ray Data map task, a scoring
actor) frees arrays of megabytes every batch, glibc keeps them in its heap (after the
first large free its mmap threshold rises, so later arrays come from the heap), and the
resident size grows with the batches the process has seen, i.e. with the release.
"""

import numpy as np
import pytest

from rayvid.release.memory import _MALLOC_TRIM, release_memory

pytestmark = pytest.mark.skipif(_MALLOC_TRIM is None, reason="glibc's malloc_trim only")


def _rss_anon_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


def test_freed_heap_arrays_are_handed_back():
    big = np.ones(16 << 20, np.uint8)  # an mmapped chunk: freeing it raises the threshold
    del big
    arrays = [np.ones(4 << 20, np.uint8) for _ in range(100)]  # now from the heap: 400 MiB
    keep = arrays.pop()  # the last one pins the heap's top: nothing is trimmed by free()
    del arrays
    before = _rss_anon_mib()
    release_memory()
    after = _rss_anon_mib()
    assert before - after > 200, (before, after)  # most of the 396 MiB freed go back
    assert keep.sum() == keep.size  # still intact
