"""The malloc arena limit: applied before threads start, and left alone where it must be."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from stream_server.allocator import limit_malloc_arenas

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")

# Eight threads each allocate and free 1 MB blocks (malloc'd by bytearray), then glibc's own
# report (malloc_info) is read back: one <heap> element per arena in use.
_PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, sys, tempfile, threading
    from stream_server.allocator import limit_malloc_arenas
    applied = limit_malloc_arenas(int(sys.argv[1]))
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()
        for _ in range(50):
            block = bytearray(1 << 20)
            del block
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        heaps = open(f.name).read().count("<heap nr=")
    print(applied, heaps)
    """
)


def _probe(arenas: int, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(arenas)], capture_output=True, text=True, check=True, env={**clean, **env}, timeout=60
    )
    applied, heaps = out.stdout.split()
    return applied == "True", int(heaps)


@pytest.mark.parametrize("arenas", [1, 2])
def test_the_limit_holds_for_eight_allocating_threads(arenas: int) -> None:
    applied, heaps = _probe(arenas)
    assert applied
    assert 1 <= heaps <= arenas


def test_glibc_default_gives_threads_arenas_of_their_own() -> None:
    applied, heaps = _probe(0)
    assert not applied
    assert heaps > 1, "without the limit, worker threads get arenas of their own (what the limit is for)"


def test_operators_variable_wins() -> None:
    applied, heaps = _probe(1, MALLOC_ARENA_MAX="3")
    assert not applied
    assert 1 < heaps <= 3


def test_zero_is_a_no_op_in_this_process() -> None:
    assert limit_malloc_arenas(0) is False
