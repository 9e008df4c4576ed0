"""The C allocator's arena limit, set once at startup before any worker thread exists.

glibc gives each new thread that allocates an arena of its own (up to eight per core), and
every arena keeps the freed memory of its biggest moment. The decode workers' passes (encoder
attention, up to ``--pass-memory-mb`` each), their feature extraction and the event loop's buffers
each land in an arena of their own, so a loaded server's resident memory grows by the sum of
those high-water marks. Two arenas share them in heaps that the next pass reuses; one arena
saves a little more memory but made the event loop and the workers wait on each other's
allocations (numbers in the docs/benchmarks.md, "Capacity").

``MALLOC_ARENA_MAX`` in the environment is read by glibc before Python starts; ``mallopt`` does
the same from inside the process, which is what lets a plain ``stream-server`` get it. It only
takes effect for threads that have not yet asked for an arena, hence "before any worker thread".
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter number (malloc.h)


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at ``arenas``; True if applied.

    Not applied for 0 (glibc's own default), where the operator set ``MALLOC_ARENA_MAX`` (theirs
    wins), or where the C library is not glibc (musl, macOS: other allocators, no arenas).
    """
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    # The process's own symbols include libc's: no library search (find_library runs ldconfig).
    applied = bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
    if not applied:
        log.warning("mallopt(M_ARENA_MAX, %d) was refused; the allocator keeps its default arenas", arenas)
    return applied
