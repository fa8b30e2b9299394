"""Keep freed CPU memory in the process instead of returning it to the OS (glibc's malloc, Linux).

Why: the chunked CPU kernels create multi-MB temporaries. glibc serves blocks above its mmap threshold with fresh
``mmap`` pages and trims the heap top above its trim threshold, so every such temporary is page-faulted (and zeroed by
the kernel) again on each call: measured here at ~1 ms per 4 MB, 15-35% of a chunked gla / linear-attention forward +
backward at T = 8192. Raising both thresholds lets the heap keep and reuse those pages. glibc caps the mmap threshold
at 32 MiB, so blocks from 32 MiB up would still get fresh mappings: a (1, T, 512) float32 activation is exactly 32 MiB
at T = 16384, and mamba2's chunk-start states (1, 4, 256, 128, 128) are 64 MiB. Setting glibc's mmap count limit to 0
serves those from the heap too: measured at T = 16384 (layer fwd + bwd, dim 256, 2 threads) mamba2 2.2x, retnet
1.2-1.4x, mamba 1.2x, softmax 1.08x faster; no change at T <= 4096, where nothing reaches 32 MiB. This is the same
effect as the jemalloc / tcmalloc preloads that CPU inference guides recommend, without a preload.

It changes the whole process, so it is opt-in: nothing calls it on import or by default. A training run applies it
with ``tune_malloc=true`` (``attnzoo.training.run``); the benchmark scripts opt in, because their published numbers
were measured with it; users may call :func:`tune_malloc` in their own programs. The cost is that the process keeps
its peak heap size until it exits, plus what fragments between large blocks (peak RSS 0-32% higher in the T = 16384
measurements above).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc caps the mmap threshold at 32 MiB on 64-bit systems
DEFAULT_MMAP_MAX = 65536  # glibc's default limit on the number of mmapped blocks


def tune_malloc(
    trim_threshold: int = 2**40, mmap_threshold: int = MMAP_THRESHOLD_MAX, large_blocks_from_heap: bool = True
) -> bool:
    """Raise glibc's trim and mmap thresholds; True if applied, False where there is no glibc (macOS, Windows, musl).

    Args:
        trim_threshold: free bytes at the heap top kept before trimming (default: never trim in practice).
        mmap_threshold: allocations from this size up get their own mmap (default and maximum: 32 MiB).
        large_blocks_from_heap: serve blocks of any size from the heap (glibc's mmap count limit set to 0), so the
            ones above the 32 MiB cap are reused too; False restores glibc's default limit. Threads' arenas still
            map blocks too large for them, as glibc always does.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    clamp = lambda value: int(min(value, 2**31 - 1))  # mallopt takes an int
    ok = mallopt(M_MMAP_THRESHOLD, clamp(min(mmap_threshold, MMAP_THRESHOLD_MAX))) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, clamp(trim_threshold)) == 1
    ok &= mallopt(M_MMAP_MAX, 0 if large_blocks_from_heap else DEFAULT_MMAP_MAX) == 1
    return bool(ok)
