"""Process-wide CPU settings for metafunc's many small per-task graphs.

A meta-batch on the CPU allocates and frees thousands of activation buffers of one to a few
MiB per task. glibc's default ``malloc`` serves buffers that size with fresh ``mmap`` pages, or
returns the freed top of its heap to the system, so every meta-batch pays the kernel to zero
the same memory again, in page faults, and under the ``'threads'`` strategy the workers contend
for the process's memory map while they fault (measurements: HISTORY "The allocator").
``tune_cpu_allocator`` has glibc keep that memory instead (``mallopt``). The ``metafunc train``
and ``metafunc eval`` commands call it; call it yourself at the start of a script, before
starting threads.
"""

from __future__ import annotations

import os

__all__ = [
    "MALLOC_ENV",
    "OPT_OUT_ENV",
    "environment_allocator",
    "glibc_malloc",
    "tune_cpu_allocator",
]

#: glibc's environment variable for each setting, with ``tune_cpu_allocator``'s value. Exported
#: before a process starts, they give it the same settings; when any is set, it wins.
MALLOC_ENV = {  # page faults vs memory kept after a peak, see HISTORY "The allocator"
    "MALLOC_MMAP_THRESHOLD_": 32 << 20,
    "MALLOC_TRIM_THRESHOLD_": 512 << 20,
    "MALLOC_TOP_PAD_": 64 << 20,
}
#: ``METAFUNC_TUNE_ALLOCATOR=0`` makes ``tune_cpu_allocator`` (and so ``metafunc train``) a no-op.
OPT_OUT_ENV = "METAFUNC_TUNE_ALLOCATOR"

_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad")
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def environment_allocator() -> str | None:
    """The environment's own settings for these glibc parameters (``MALLOC_*`` variables or
    ``GLIBC_TUNABLES=glibc.malloc.*``), as ``NAME=value`` text, or None when it sets none."""
    found = [f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(t in tunables for t in _TUNABLES):
        found.append(f"GLIBC_TUNABLES={tunables}")
    return " ".join(found) or None


def glibc_malloc() -> bool:
    """True when glibc's own ``malloc`` serves this process (not musl, macOS, or a jemalloc or
    tcmalloc put in front of it with ``LD_PRELOAD``)."""
    try:
        if os.confstr("CS_GNU_LIBC_VERSION") is None:
            return False
        import ctypes

        process, libc = ctypes.CDLL(None), ctypes.CDLL("libc.so.6")
        return (
            ctypes.cast(process.malloc, ctypes.c_void_p).value
            == ctypes.cast(libc.malloc, ctypes.c_void_p).value
        )
    except (ValueError, OSError, AttributeError):
        return False


def tune_cpu_allocator(
    *,
    mmap_threshold: int = MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"],
    trim_threshold: int = MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"],
    top_pad: int = MALLOC_ENV["MALLOC_TOP_PAD_"],
) -> bool:
    """Make glibc's ``malloc`` reuse freed memory instead of returning it to the system.

    Allocations below ``mmap_threshold`` bytes come from the heap (not from fresh ``mmap``
    pages), up to ``trim_threshold`` bytes of free memory stay with each allocator arena, and
    the heap grows ``top_pad`` bytes beyond each request, so a meta-batch reuses the previous
    one's pages instead of faulting in fresh ones (measurements: HISTORY "The allocator").

    The cost: after a peak, up to ``trim_threshold`` bytes per arena stay resident (glibc makes
    up to 8 arenas per core as threads allocate; ``MALLOC_ARENA_MAX`` caps them). The settings
    are process-wide, last until the process ends and are inherited by a ``fork``. ``mallopt``
    is not thread-safe: call this early, before starting threads (torch's intra-op pool, the
    ``'threads'`` strategy, ``DataLoader`` workers).

    Returns:
        True when applied. False, changing nothing, where glibc's ``malloc`` does not serve the
        process (macOS, Windows, musl, a preloaded jemalloc or tcmalloc), where the environment
        sets these parameters itself (:func:`environment_allocator`; yours win), or where
        ``METAFUNC_TUNE_ALLOCATOR=0``.
    """
    call = "tune_cpu_allocator"
    for name, value in (
        ("mmap_threshold", mmap_threshold),
        ("trim_threshold", trim_threshold),
        ("top_pad", top_pad),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 31:
            raise ValueError(
                f"{call}({name}): must be an int of bytes in [0, 2**31), got {value!r}."
            )
    if os.environ.get(OPT_OUT_ENV, "1") == "0" or environment_allocator() is not None:
        return False
    if not glibc_malloc():
        return False
    import ctypes

    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # glibc since 2.26 takes any value; older ones refuse an mmap threshold above 32 MiB
    # (64-bit), and a refusal changes nothing, so the threshold goes first.
    for param, name, value in (
        (_M_MMAP_THRESHOLD, "mmap_threshold", mmap_threshold),
        (_M_TRIM_THRESHOLD, "trim_threshold", trim_threshold),
        (_M_TOP_PAD, "top_pad", top_pad),
    ):
        if mallopt(param, value) != 1:
            raise ValueError(
                f"{call}({name}): glibc's mallopt refused {value} (an older glibc caps "
                "mmap_threshold at 32 MiB); pass a smaller value."
            )
    return True
