"""numba's threading layer: a process that has used gpucabac can fork workers (multiprocessing's
default on Linux, worker pools, Flower and Ray), and a layer the user chose is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FORK_AFTER_USE = """
import multiprocessing as mp, sys
import numpy as np, numba, gpucabac
data = gpucabac.encode({"w": np.linspace(-1, 1, 64 * 64, dtype=np.float32).reshape(64, 64)}, qp=-30, dq=True)
want = gpucabac.decode(data)["w"]

def child(q):
    q.put(bool(np.array_equal(gpucabac.decode(data)["w"], want)))

q = mp.get_context("fork").SimpleQueue()
p = mp.get_context("fork").Process(target=child, args=(q,))
p.start(); p.join()
print(numba.threading_layer(), p.exitcode, q.get() if p.exitcode == 0 else None)
"""


def _run(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environ)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork is the default start method on Linux")
def test_a_fork_after_use_works():
    r = _run(FORK_AFTER_USE)
    assert r.returncode == 0, r.stderr
    layer, code, same = r.stdout.split()
    assert layer in ("tbb", "workqueue") and code == "0" and same == "True", (r.stdout, r.stderr)


def test_a_layer_the_user_chose_is_kept():
    code = "import numpy as np, numba, gpucabac; gpucabac.decode(gpucabac.encode({'w': np.ones((9, 9), np.float32)})); print(numba.threading_layer())"
    r = _run(code, NUMBA_THREADING_LAYER="workqueue")
    assert r.returncode == 0 and r.stdout.strip() == "workqueue", r.stderr
    r = _run("import numba, numpy as np; numba.config.THREADING_LAYER = 'workqueue'; import gpucabac; "
             "gpucabac.encode({'w': np.ones((9, 9), np.float32)}); print(numba.threading_layer())")
    assert r.returncode == 0 and r.stdout.strip() == "workqueue", r.stderr


def test_the_fork_safe_layer_comes_with_the_first_coder_module():
    """`import gpucabac` loads no numba; the first module with a parallel loop sets the layer."""
    code = ("import sys, gpucabac; print('numba' in sys.modules); import numpy as np; "
            "gpucabac.quantize({'w': np.ones((9, 9), np.float32)}); import numba; print(numba.config.THREADING_LAYER)")
    r = _run(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "forksafe"], r.stdout
