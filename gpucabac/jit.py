"""numba's compilations as a user sees them.

The first run after an install compiles gpucabac's coder to machine code (about half a minute on
a 2-core machine); numba caches the result next to the sources (or under NUMBA_CACHE_DIR, or a
user cache folder where the package folder is read-only), so later runs load it in a fraction of
a second. `watch_compiles` reports when a compilation starts and how long compilations took, so
that the command line can say it is compiling and leave that time out of its throughput.

numba is imported when a watch starts, not with this module: `gpucabac --help` stays light.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class CompileWatch:
    """What numba compiled while the watch ran: `count` top-level compilations (a function and
    the ones it inlines are one) and their wall time in `seconds`."""

    def __init__(self, on_first: Callable[[], None] | None):
        self.count = 0
        self.seconds = 0.0
        self._on_first = on_first
        self._depth = 0
        self._start = 0.0
        self._lock = threading.Lock()

    def _begin(self) -> None:
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return
            self._start = time.perf_counter()
            first = self.count == 0
            self.count += 1
        if first and self._on_first is not None:
            self._on_first()

    def _end(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self.seconds += time.perf_counter() - self._start


@contextlib.contextmanager
def watch_compiles(on_first: Callable[[], None] | None = None) -> Iterator[CompileWatch]:
    """Watch numba's compilations in the body; `on_first` is called when the first one starts
    (a cache miss: numba loads cached code without compiling, and without an event)."""
    from numba.core import event  # noqa: PLC0415  (see the module docstring)

    watch = CompileWatch(on_first)

    class _Listener(event.Listener):
        def on_start(self, ev):
            watch._begin()

        def on_end(self, ev):
            watch._end()

    with event.install_listener("numba:compile", _Listener()):
        yield watch
