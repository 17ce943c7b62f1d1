"""The GPU engine: the CUDA kernels of kernels/gpucabac.cu through CuPy, behind the engine contract
(engines/base.py; `GpuEngine`).

CuPy is optional (`pip install "gpucabac[gpu]"`) and imported only when a GPU engine is made.
Same contract as the CPU engine: the same levels give the same bytes, the same bytes the same
tensors; tests/test_engines.py runs one suite over both (and over the kernels compiled for the
CPU), tests/test_kernels.py checks the kernels' code itself.

* Decoding a slice table: one launch decodes every slice of every tensor (one thread per slice),
  after checking each slice's CRC-32, and writes the dequantized values straight into one
  device array per tensor. The payload goes to the device once; results stay there.
* Encoding a tensor: a bound kernel sizes a scratch region per slice (and finds invalid levels),
  the encode kernel codes every slice into its region, a prefix sum of the slice sizes places
  them, a gather kernel compacts them and a CRC kernel checksums them.

Handing results to other frameworks without a host copy (DLPack; the arrays are CuPy arrays on
the current device and stream):

    >>> out = gpucabac.decode(data, device="gpu")                        # doctest: +SKIP
    >>> t = torch.from_dlpack(out["fc.weight"])                          # doctest: +SKIP
    >>> j = jax.dlpack.from_dlpack(out["fc.weight"])                     # doctest: +SKIP

bfloat16 tensors are CuPy arrays of dtype ml_dtypes.bfloat16 where the installed CuPy supports
it (CuPy >= 14); with an older CuPy they are uint16 arrays holding the bfloat16 bits (a warning
is logged once): `torch.from_dlpack(a).view(torch.bfloat16)`, or `to_numpy(a, "bfloat16")`.

Every kernel has one typed wrapper in `Kernels`: it checks dtypes, contiguity and shapes (CuPy
does not check raw kernel arguments), casts scalars to fixed-width NumPy types and owns the
launch geometry. The orchestration (`encode_slices`, `GpuEngine`) talks only to such a wrapper
object, so the tests run it on the CPU with the same kernels compiled by g++.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import ml_dtypes
import numpy as np

from ..errors import GpuUnavailableError
from ..layout import MAX_CONTEXTS, num_slices
from ..modes import dq_states
from ..tables import DQ_STATE_COUNTS, MAX_GT_FLAGS
from . import kernel_source
from .base import CodedSlices, EncodeJob, SliceTable, TensorOutput

log = logging.getLogger("gpucabac")

DTYPE_CODES = kernel_source.DTYPE_CODES
TENSOR_PARAMS = kernel_source.TENSOR_PARAMS  # ints per tensor in the decode table (jobs.cuh)

# Launch geometry. The coder kernels keep GC_MAX_CONTEXTS 32-bit context words per thread in
# shared memory: 64 threads use 25 KiB, under the 48 KiB a block gets without opting in.
CODER_BLOCK = 64
PLAIN_BLOCK = 128
GATHER_BLOCK = 128
_MAX_GRID = 1 << 20  # the kernels loop with a grid stride beyond this

KERNEL_NAMES = ("gc_decode_kernel", "gc_bound_kernel", "gc_encode_kernel", "gc_gather_kernel", "gc_crc_kernel")


# ---------------------------------------------------------------------------------------------
# Availability


def _import_cupy():
    try:
        import cupy  # noqa: PLC0415
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        raise GpuUnavailableError(
            f"the GPU engine needs CuPy (pip install 'gpucabac[gpu]'): importing it failed ({type(e).__name__}: {e})"
        ) from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise GpuUnavailableError(f"CuPy sees no CUDA device ({type(e).__name__}: {e})") from e
    if count < 1:
        raise GpuUnavailableError("CuPy sees no CUDA device")
    return cupy


def unavailable_reason() -> str | None:
    """None when the GPU engine can run (CuPy imports and sees a device), else why not."""
    try:
        _import_cupy()
    except GpuUnavailableError as e:
        return str(e)
    return None


def available() -> bool:
    return unavailable_reason() is None


def device_name() -> str:
    cupy = _import_cupy()
    dev = cupy.cuda.Device()
    try:
        name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # pragma: no cover - informational only
        name = "unknown"
    return f"CUDA device {dev.id} ({name})"


# ---------------------------------------------------------------------------------------------
# Argument checks shared by every backend (a wrong argument is a bug in gpucabac, not bad data).


def check_array(xp, name: str, a, dtype, size: int | None = None, min_size: int | None = None) -> None:
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{name}: expected a {xp.__name__} array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
    if a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError(f"{name}: expected a contiguous 1-D array, got shape {a.shape} (contiguous: {a.flags.c_contiguous})")
    if size is not None and a.size != size:
        raise ValueError(f"{name}: expected {size} elements, got {a.size}")
    if min_size is not None and a.size < min_size:
        raise ValueError(f"{name}: expected at least {min_size} elements, got {a.size}")


def _check_dq(v) -> np.int32:
    """The kernels index their trellis tables with dq: only 0 and the sizes of DQ_STATE_COUNTS."""
    if int(v) != 0 and int(v) not in DQ_STATE_COUNTS:
        raise ValueError(f"dq must be 0 or a trellis size {DQ_STATE_COUNTS}, got {v}")
    return np.int32(v)


def _check_gt_flags(v) -> np.int32:
    if not 0 <= int(v) <= MAX_GT_FLAGS:
        raise ValueError(f"num_gt_flags must be in 0..{MAX_GT_FLAGS}, got {v}")
    return np.int32(v)


def _grid(items: int, block: int) -> int:
    return max(1, min(_MAX_GRID, -(-items // block)))


class Kernels:
    """Typed wrappers of the kernels of gpucabac.cu, compiled once per process (see `kernels()`)."""

    def __init__(self):
        cupy = _import_cupy()
        self.xp = cupy
        self.source = kernel_source.assemble()
        self.module = cupy.RawModule(code=self.source, options=("--std=c++17",))
        self._fn = {name: self.module.get_function(name) for name in KERNEL_NAMES}

    # host <-> device and addresses
    def address(self, a) -> int:
        return int(a.data.ptr)

    def to_device(self, a: np.ndarray):
        return self.xp.asarray(a)

    def to_host(self, a) -> np.ndarray:
        return self.xp.asnumpy(a)

    def bfloat16_array(self, a):
        """a uint16 device array of bfloat16 bits as a bfloat16 array, where CuPy supports it."""
        try:
            return a.view(ml_dtypes.bfloat16)
        except Exception as e:  # CuPy < 14 has no bfloat16
            _warn_bfloat16_once(e)
            return a

    # kernels
    def bounds(self, levels, slice_size: int, dq: int, num_gt_flags: int, runs: bool = False):
        xp = self.xp
        check_array(xp, "levels", levels, np.int32, min_size=1)
        n = levels.size
        ns = num_slices(n, slice_size)
        bound = xp.empty(ns, np.int64)
        bad = xp.empty(ns, np.int64)
        self._fn["gc_bound_kernel"](
            (_grid(ns, PLAIN_BLOCK),), (PLAIN_BLOCK,),
            (levels, np.int64(n), np.int64(slice_size), np.int64(ns), _check_dq(dq),
             _check_gt_flags(num_gt_flags), np.int32(bool(runs)), bound, bad),
        )
        return bound, bad

    def encode(self, levels, slice_size: int, dq: int, num_gt_flags: int, init, scratch, scratch_offset, bound,
               runs: bool = False):
        xp = self.xp
        check_array(xp, "levels", levels, np.int32, min_size=1)
        n = levels.size
        ns = num_slices(n, slice_size)
        check_array(xp, "init", init, np.uint8, size=MAX_CONTEXTS)
        check_array(xp, "scratch", scratch, np.uint8)
        check_array(xp, "scratch_offset", scratch_offset, np.int64, size=ns)
        check_array(xp, "bound", bound, np.int64, size=ns)
        lengths = xp.empty(ns, np.int64)
        self._fn["gc_encode_kernel"](
            (_grid(ns, CODER_BLOCK),), (CODER_BLOCK,),
            (levels, np.int64(n), np.int64(slice_size), np.int64(ns), _check_dq(dq),
             _check_gt_flags(num_gt_flags), np.int32(bool(runs)), init, scratch, scratch_offset, bound, lengths),
            shared_mem=CODER_BLOCK * MAX_CONTEXTS * 4,
        )
        return lengths

    def gather(self, scratch, src_offset, lengths, dst_offset, out) -> None:
        xp = self.xp
        ns = lengths.size
        check_array(xp, "scratch", scratch, np.uint8)
        check_array(xp, "src_offset", src_offset, np.int64, size=ns)
        check_array(xp, "lengths", lengths, np.int64, size=ns)
        check_array(xp, "dst_offset", dst_offset, np.int64, size=ns)
        check_array(xp, "out", out, np.uint8)
        if ns:
            self._fn["gc_gather_kernel"](
                (max(1, min(_MAX_GRID, ns)),), (GATHER_BLOCK,),
                (scratch, src_offset, lengths, dst_offset, np.int64(ns), out),
            )

    def crc(self, data, offsets, lengths):
        xp = self.xp
        ns = lengths.size
        check_array(xp, "data", data, np.uint8)
        check_array(xp, "offsets", offsets, np.int64, size=ns)
        check_array(xp, "lengths", lengths, np.int64, size=ns)
        out = xp.empty(ns, np.uint32)
        if ns:
            self._fn["gc_crc_kernel"](
                (_grid(ns, PLAIN_BLOCK),), (PLAIN_BLOCK,), (data, offsets, lengths, np.int64(ns), out),
            )
        return out

    def decode(self, t: "DecodeTable", *, validate: bool = True):
        """Decode every slice of table t; `validate=False` skips `t.check` (four device reductions)
        for a table already checked, as when the same table is decoded again and again in a benchmark."""
        xp = self.xp
        if validate:
            t.check(xp)
        ns = t.num_slices
        errors = xp.zeros(ns, np.int32)
        if ns:
            self._fn["gc_decode_kernel"](
                (_grid(ns, CODER_BLOCK),), (CODER_BLOCK,),
                (np.int64(ns), t.payload, t.slice_offset, t.slice_length, t.slice_crc, t.slice_tensor,
                 t.slice_first, t.slice_count, t.tensor_params, t.tensor_step, t.tensor_out, t.tensor_init, errors),
                shared_mem=CODER_BLOCK * MAX_CONTEXTS * 4,
            )
        return errors


@functools.lru_cache(maxsize=1)
def kernels() -> Kernels:
    """The compiled kernels (compiled on first use; CuPy also caches the binary on disk)."""
    return Kernels()


_bfloat16_warned = []


def _warn_bfloat16_once(e: Exception) -> None:
    if _bfloat16_warned:
        return
    _bfloat16_warned.append(True)
    log.warning("this CuPy has no bfloat16 dtype (%s): bfloat16 tensors are returned as uint16 arrays of their bits", e)


def to_numpy(a, dtype_name: str | None = None) -> np.ndarray:
    """A decoded array (NumPy or CuPy) on the host; `dtype_name="bfloat16"` re-labels uint16 bits."""
    if not isinstance(a, np.ndarray):
        a = a.get()
    if dtype_name == "bfloat16" and a.dtype == np.uint16:
        a = a.view(ml_dtypes.bfloat16)
    return a


# ---------------------------------------------------------------------------------------------
# Encoding one tensor


def encode_slices(levels, slice_size: int, dq: bool | int, num_gt_flags: int, init: np.ndarray, *, k=None,
                  runs: bool = False):
    """The encode kernels on one tensor: int32 levels (host or device) coded in slices of
    `slice_size`, each from the context initialisation `init` (a preset index per context,
    MAX_CONTEXTS of them), the zeros as runs when `runs` is set.

    Returns (payload uint8, lengths uint32, crcs uint32, bad) as arrays of `k.xp`; `bad` is the
    index of the first level that cannot be coded (and the rest None), or -1."""
    k = k or kernels()
    xp = k.xp
    lv = levels if isinstance(levels, xp.ndarray) else k.to_device(np.ascontiguousarray(levels, dtype=np.int32))
    lv = xp.ascontiguousarray(lv.reshape(-1), dtype=np.int32)
    if lv.size == 0:
        return xp.zeros(0, np.uint8), xp.zeros(0, np.uint32), xp.zeros(0, np.uint32), -1
    init_dev = k.to_device(np.ascontiguousarray(init, dtype=np.uint8).reshape(-1))
    bound, bad = k.bounds(lv, slice_size, dq_states(dq), num_gt_flags, runs)
    bad_h = k.to_host(bad)
    if (bad_h >= 0).any():
        return None, None, None, int(bad_h[bad_h >= 0][0])
    ends = xp.cumsum(bound)
    offsets = ends - bound
    scratch = xp.empty(int(ends[-1]), np.uint8)
    lengths = k.encode(lv, slice_size, dq_states(dq), num_gt_flags, init_dev, scratch, offsets, bound, runs)
    out_ends = xp.cumsum(lengths)
    if int(lengths.min()) < 0:
        raise RuntimeError("gpucabac GPU encoder: a slice exceeded its byte bound (a bug; please report it)")
    dst = out_ends - lengths
    out = xp.empty(int(out_ends[-1]), np.uint8)
    k.gather(scratch, offsets, lengths, dst, out)
    crcs = k.crc(out, dst, lengths)
    return out, lengths.astype(np.uint32), crcs, -1


# ---------------------------------------------------------------------------------------------
# Decoding a slice table


class DecodeTable:
    """The flat slice table of jobs.cuh (GcDecodeTable), as arrays of one array module."""

    FIELDS = (
        ("payload", np.uint8), ("slice_offset", np.int64), ("slice_length", np.uint32), ("slice_crc", np.uint32),
        ("slice_tensor", np.int32), ("slice_first", np.int64), ("slice_count", np.int64),
        ("tensor_params", np.int32), ("tensor_step", np.float32), ("tensor_out", np.uint64), ("tensor_init", np.uint8),
    )

    def __init__(self, **arrays):
        for name, _ in self.FIELDS:
            setattr(self, name, arrays[name])
        self.num_slices = int(self.slice_offset.size)
        self.num_tensors = int(self.tensor_step.size)

    def check(self, xp) -> None:
        ns, nt = self.num_slices, self.num_tensors
        sizes = {"slice_": ns, "tensor_params": TENSOR_PARAMS * nt, "tensor_step": nt, "tensor_out": nt, "tensor_init": MAX_CONTEXTS * nt}
        for name, dtype in self.FIELDS:
            a = getattr(self, name)
            size = next((v for k, v in sizes.items() if name.startswith(k)), None)
            check_array(xp, name, a, dtype, size=size)
        # Preconditions of the kernel (the host built this table from a validated header; a
        # wrong table would read or write out of bounds, so check it once more here).
        if ns:
            off, ln = self.slice_offset, self.slice_length.astype(np.int64)
            if int(off.min()) < 0 or int((off + ln).max()) > self.payload.size:
                raise ValueError("decode table: a slice lies outside the payload")
            t = self.slice_tensor
            if int(t.min()) < 0 or int(t.max()) >= nt:
                raise ValueError("decode table: slice_tensor out of range")


def _out_code(out: TensorOutput) -> tuple[int, int]:
    """(work, out) dtype codes of the kernel's store (kernels/dequant.cuh): int32 stores levels."""
    if out.dtype == "int32":
        return DTYPE_CODES["int32"], DTYPE_CODES["int32"]
    return DTYPE_CODES[out.work], DTYPE_CODES[out.dtype]


def _device_dtype(name: str, k) -> np.dtype:
    if name == "bfloat16":  # written as its bits; bfloat16_array relabels them
        return np.dtype(np.uint16) if k.xp is not np else np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class GpuEngine:
    """The CUDA engine; `kernels` is a `Kernels` (default: compiled on first use), or any object
    with its methods, as the tests' g++ build of the same kernel bodies."""

    name = "gpu"

    def __init__(self, kernels_: Kernels | None = None):
        self.k = kernels_ if kernels_ is not None else kernels()
        self.xp = self.k.xp

    def describe(self) -> str:
        return device_name()

    def encode(self, jobs: Sequence[EncodeJob], progress=None) -> list[CodedSlices]:
        out = []
        for job in jobs:
            payload, lengths, crcs, bad = encode_slices(job.levels, job.slice_size, job.dq, job.num_gt_flags, job.init,
                                                        k=self.k, runs=job.runs)
            if bad >= 0:
                raise ValueError(f"level {int(np.asarray(job.levels).reshape(-1)[bad])} at position {bad} cannot be coded "
                                 "(the contract takes valid levels: slices.check_levels)")
            out.append(CodedSlices(self.k.to_host(payload), self.k.to_host(lengths), self.k.to_host(crcs)))
            if progress is not None:
                progress(int(np.size(job.levels)))
        return out

    def decode(self, table: SliceTable, outputs: Sequence[TensorOutput], progress=None) -> tuple[list, np.ndarray]:
        k, xp = self.k, self.xp
        nt = table.num_tensors
        params = np.zeros((nt, TENSOR_PARAMS), np.int32)
        steps = np.zeros(nt, np.float32)
        ptrs = np.zeros(nt, np.uint64)
        arrays = []
        for t, out in enumerate(outputs):
            work, code = _out_code(out)
            params[t] = (table.tensor_dq[t], table.tensor_gt[t], work, code, table.tensor_runs[t])
            steps[t] = np.float32(out.step)
            a = xp.empty(int(table.tensor_numel[t]), _device_dtype(out.dtype, k))
            ptrs[t] = k.address(a)
            arrays.append(a)
        host = dict(
            payload=table.payload, slice_offset=table.slice_offset, slice_length=table.slice_length,
            slice_crc=table.slice_crc, slice_tensor=table.slice_tensor, slice_first=table.slice_first,
            slice_count=table.slice_count, tensor_params=params.reshape(-1), tensor_step=steps,
            tensor_out=ptrs, tensor_init=np.ascontiguousarray(table.tensor_init, np.uint8).reshape(-1),
        )
        device_table = DecodeTable(**{name: k.to_device(np.ascontiguousarray(a)) for name, a in host.items()})
        errors = k.to_host(k.decode(device_table)).astype(np.int32)
        arrays = [k.bfloat16_array(a) if out.dtype == "bfloat16" else a for a, out in zip(arrays, outputs)]
        if progress is not None:
            progress(int(table.tensor_numel.sum()))
        return arrays, errors

    def upload(self, host: np.ndarray):
        if host.dtype == ml_dtypes.bfloat16 and self.xp is not np:
            return self.k.bfloat16_array(self.k.to_device(host.view(np.uint16)))
        return self.k.to_device(host)

    def to_host(self, a) -> np.ndarray:
        return to_numpy(a)


__all__ = [
    "GpuUnavailableError", "Kernels", "DecodeTable", "GpuEngine", "available", "unavailable_reason", "device_name",
    "kernels", "encode_slices", "to_numpy", "check_array",
]
