"""Memory a scan frees goes back to the operating system, so a process's peak is what it holds.

Scanning a wide table (a memory per row) allocates and frees buffers of megabytes, batch after
batch, from Lance's reader threads (Rust, on the C allocator) and Arrow (its own pool: mimalloc
here, which returns pages by itself; jemalloc where that is the pool, which returns them only
after a delay unless told otherwise). Freed, the C allocator's stayed in the process: glibc
raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which such
blocks come from its arenas and are kept there, one arena per reader thread. Measured on a 385 MB
table read in 16 MB batches: peak RSS 477-548 MiB against 181 MiB for its id column alone; with
a fixed 8 MiB mmap threshold 328 MiB (4 MiB: 328; 16 MiB: 363; glibc's M_ARENA_MAX=1 alone:
413). Called the first time a process opens or writes a wide table (storage/bank.py), not at
import: below 8 MiB nothing changes, and a process that never scans one keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 8 << 20

_done = False


def return_freed_memory() -> None:
    """Blocks of MMAP_THRESHOLD and more are mapped and unmapped by themselves (glibc), and Arrow's
    jemalloc returns freed pages at once; once per process, a no-op where neither applies."""
    global _done
    if _done:
        return
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators differ
        pass
    import pyarrow as pa

    try:
        pa.jemalloc_set_decay_ms(0)
    except (NotImplementedError, pa.ArrowNotImplementedError, AttributeError):  # a pyarrow without jemalloc
        pass
