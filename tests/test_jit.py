"""gpucabac.jit: numba's compilations as the command line reports them."""

from __future__ import annotations

import numba

from gpucabac.jit import watch_compiles


def test_a_compilation_is_seen_once_with_its_inlined_functions():
    calls = []

    @numba.njit(inline="always", cache=False)
    def inner(x):
        return 2 * x

    @numba.njit(cache=False)
    def outer(x):
        return inner(x) + 1

    with watch_compiles(on_first=lambda: calls.append(1)) as watch:
        assert outer(3) == 7
    assert calls == [1]
    assert watch.count == 1  # outer and the inner one it compiles along are one compilation
    assert watch.seconds > 0


def test_compiled_code_raises_no_event():
    @numba.njit(cache=False)
    def f(x):
        return x - 1

    f(1)
    with watch_compiles(on_first=lambda: (_ for _ in ()).throw(AssertionError("no compile expected"))) as watch:
        assert f(5) == 4
    assert watch.count == 0 and watch.seconds == 0.0


def test_the_watch_ends_with_its_body():
    with watch_compiles() as watch:
        pass

    @numba.njit(cache=False)
    def g(x):
        return x

    g(1)
    assert watch.count == 0
