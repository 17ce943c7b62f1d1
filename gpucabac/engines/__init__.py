"""The entropy-coding engines behind one contract (base.py), and the registry that picks one.

    >>> from gpucabac.engines import available_engines, get_engine
    >>> "cpu" in available_engines()
    True
    >>> get_engine("cpu").name
    'cpu'

`get_engine("gpu")` raises GpuUnavailableError when CuPy or a CUDA device is missing (never a
silent fallback); `get_engine("auto")` takes the GPU when there is one and logs (logger
"gpucabac", level INFO) which engine runs and why. Engines import nothing of each other; the GPU
engine's module, and CuPy with it, loads only when a GPU engine is asked for.
"""

from __future__ import annotations

import logging

from ..errors import GpuUnavailableError, InputError
from .base import CodedSlices as CodedSlices, Engine as Engine, EncodeJob as EncodeJob
from .base import SliceTable as SliceTable, TensorOutput as TensorOutput

log = logging.getLogger("gpucabac")

ENGINES = ("cpu", "gpu")  # what get_engine builds; "auto" picks one of them
DEVICES = (*ENGINES, "auto")


def _gpu_module():
    from . import gpu  # noqa: PLC0415  (CuPy is imported only by what this module calls)

    return gpu


def unavailable_reason(name: str) -> str | None:
    """None when engine `name` can run here, else why not."""
    if name == "cpu":
        return None
    if name == "gpu":
        return _gpu_module().unavailable_reason()
    raise InputError(f"unknown engine {name!r}; engines are {', '.join(ENGINES)}")


def available_engines() -> list[str]:
    """The engines that can run here, in ENGINES order ("cpu" always)."""
    return [name for name in ENGINES if unavailable_reason(name) is None]


def get_engine(device: str | Engine = "cpu", what: str = "gpucabac") -> Engine:
    """The engine for a `device` argument: "cpu", "gpu", "auto", or an Engine itself (returned as
    it is; the tests hand in the CUDA engine running on a CPU build of its kernels). `what`
    names the caller in errors and logs."""
    if not isinstance(device, str):
        if not isinstance(device, Engine):
            raise InputError(f"device must be one of {', '.join(map(repr, DEVICES))} or an engine, got {device!r}")
        return device
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")
    if device == "cpu":
        return _cpu()
    reason = unavailable_reason("gpu")
    if device == "gpu" and reason is not None:
        raise GpuUnavailableError(f"{what}(device='gpu'): {reason}")
    if reason is None:
        gpu = _gpu_module()
        log.info("gpucabac.%s: running on the GPU, %s", what, gpu.device_name())
        return gpu.GpuEngine()
    log.info("gpucabac.%s: running on the CPU (device='auto', no usable GPU: %s)", what, reason)
    return _cpu()


def _cpu() -> Engine:
    from .cpu import CpuEngine  # noqa: PLC0415  (numba compiles the coder on first use)

    return CpuEngine()


__all__ = ["DEVICES", "ENGINES", "CodedSlices", "Engine", "EncodeJob", "SliceTable", "TensorOutput",
           "available_engines", "get_engine", "unavailable_reason"]
