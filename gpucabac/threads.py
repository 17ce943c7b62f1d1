"""The number of CPU threads numba's parallel loops use (the CPU engine, the plain quantizer and
the context-init choice), set for one call and restored after it."""

from __future__ import annotations

import contextlib

import numba

from .errors import InputError


@contextlib.contextmanager
def numba_threads(n: int | None):
    """Run the body with `n` numba threads (None: as they are)."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise InputError(f"threads must be in 1..{numba.config.NUMBA_NUM_THREADS}, got {n!r}")
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)
