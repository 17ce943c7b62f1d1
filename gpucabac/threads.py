"""numba's threads: which threading layer runs gpucabac's parallel loops (the CPU engine, the plain
quantizer, the context-init choice), and how many threads one call uses.

Worker pools, Flower and Ray fork processes after the parent has used gpucabac; GNU OpenMP, the
layer numba picks first on Linux, kills such a child ("fork() called from a process already using
GNU OpenMP"). So unless the user chose a layer (NUMBA_THREADING_LAYER, or numba.config before
importing gpucabac), gpucabac asks numba for a fork-safe one when it is imported: TBB where numba
can load it, else numba's own workqueue. This must happen before the first parallel call of the
process, which is why every module with a parallel loop (slices, context_init, quantization,
engines/cpu) imports this one before it defines any; `import gpucabac` alone loads no numba.

The price, measured on MiniLM's 2-D weights (2-core EPYC VM, QP -32, best of 5): workqueue encodes
about 5-9% slower than GNU OpenMP (1 thread 3.7-4.0 vs 4.0-4.3 M weights/s, 2 threads 6.3-7.3 vs
6.9-7.5); decoding is within the run-to-run spread. A process that never forks can ask for OpenMP
with NUMBA_THREADING_LAYER=omp.
"""

from __future__ import annotations

import contextlib
import os

import numba

from .errors import InputError

FORK_SAFE_LAYER = "forksafe"


def use_fork_safe_layer() -> None:
    """Select numba's fork-safe threading layer, unless the user has chosen one."""
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = FORK_SAFE_LAYER


use_fork_safe_layer()


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
