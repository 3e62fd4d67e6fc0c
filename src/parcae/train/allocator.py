"""glibc malloc tuning for CPU training: keep freed activation memory for reuse instead of returning it to the OS,
which glibc otherwise re-faults page by page every step (an embedding backward: 52.9 → 10.3 ms on a 2-core VM,
docs/LOG.md 2026-11-30). The cost: up to `trim_threshold` bytes of freed memory stay resident."""

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameter numbers (malloc.h)
MMAP_THRESHOLD = 1 << 30  # blocks below 1 GiB come from the (reusable) heap
TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB of freed heap before returning memory to the OS

_tuned = False


def tune_cpu_allocator(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the tuning to this process (idempotent); False where the C library is not glibc (nothing changed)."""
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return _tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: other C libraries lack these tunables
        return False
    _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _tuned
