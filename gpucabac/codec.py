"""The public encode / decode / info / quantize functions: tensors <-> container bytes.

Pipeline per tensor: plan (mode and step) -> quantize -> choose context initialisation ->
engine (slices coded in parallel) -> container. Decoding runs the same stages backwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import numba
import numpy as np

from . import container, engine_cpu
from .binarize import dq_states, full_context_init, used_contexts
from .container import TensorRecord, check_int_range, dq_mode, mode_dq, raw_values
from .dtypes import FLOAT_DTYPES, cast_float, dtype_name, numpy_dtype
from .errors import FormatError, GpuUnavailableError, InputError, TensorNotFoundError
from .quantize import dequantize, fit_dtype_range, quantize_levels, step_from_qp
from .tables import MAX_ABS_LEVEL, MAX_GT_FLAGS

DEFAULT_QP = -32
DEFAULT_SLICE_SIZE = 8192  # experiments/results/slice_size_curve_qp-32.md: +0.29% against one slice per tensor
DEFAULT_GT_FLAGS = 11  # NNCodec 2 codes N = 11 greater-than flags (methods_spec §1.1)
# Tensors of at most one dimension (biases, norms) get step / SMALL_STEP_DIVISOR by default:
# they are a tiny share of the weights and sensitive, so fine steps cost little (DESIGN §4).
SMALL_STEP_DIVISOR = 16
# Slices are encoded in batches whose worst-case output fits this scratch budget.
_SCRATCH_BYTES = 64 << 20

Progress = Callable[[int], None]

log = logging.getLogger("gpucabac")
DEVICES = ("cpu", "gpu", "auto")


def resolve_device(device: str, what: str) -> str:
    """'cpu' or 'gpu' for a `device` argument. 'gpu' raises GpuUnavailableError when CuPy or a
    CUDA device is missing (never a silent fallback); 'auto' takes the GPU when there is one, and
    logs (logger "gpucabac", level INFO) which engine ran and why."""
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(map(repr, DEVICES))}, got {device!r}")
    if device == "cpu":
        return "cpu"
    from . import engine_gpu  # noqa: PLC0415  (imports CuPy only when asked)

    reason = engine_gpu.unavailable_reason()
    if device == "gpu" and reason is not None:
        raise GpuUnavailableError(f"{what}(device='gpu'): {reason}")
    if reason is None:
        log.info("gpucabac.%s: running on the GPU, %s", what, engine_gpu.device_name())
        return "gpu"
    log.info("gpucabac.%s: running on the CPU (device='auto', no usable GPU: %s)", what, reason)
    return "cpu"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    mode: str  # 'urq' | 'dq' (or 'dq16' .. 'dq256') | 'int' | 'raw'
    step: float
    slice_size: int
    num_slices: int
    num_gt_flags: int
    coded_bytes: int  # payload bytes of all its slices
    header_bytes: int  # bytes of its record in the tensor table
    scan: str = "rows"  # or "columns": the order its slices hold the values in

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * (self.coded_bytes + self.header_bytes) / max(1, self.numel)


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    version: int
    total_bytes: int
    tensors: list[TensorInfo]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclasses.dataclass(frozen=True)
class _Settings:
    step: float
    dq: int  # trellis size, 0 without dependent quantization
    slice_size: int | None
    num_gt_flags: int
    small_step: float | str | None


@dataclasses.dataclass(frozen=True)
class _Plan:
    mode: str
    step: float
    slice_size: int
    dtype: str
    lam: float = 0.0  # rate weight of the RD quantizer (rdquant), in step² per bit; 0: plain


def _rd_plan(plan: _Plan, name: str, ndim: int, lam, tensor_steps) -> _Plan:
    """Apply per-tensor steps and the RD lambda (a number applies to tensors of two or more
    dimensions, a mapping to the tensors it names) to a coded float tensor's plan."""
    if plan.mode != "urq" and not mode_dq(plan.mode):
        return plan
    step = plan.step
    if tensor_steps is not None and name in tensor_steps:
        step = float(tensor_steps[name])
        if not (math.isfinite(step) and step > 0 and np.float32(step) > 0):
            raise InputError(f"tensor_steps[{name!r}] must be a positive float32 number, got {step}")
    lam_t = lam.get(name, 0.0) if isinstance(lam, Mapping) else (lam if ndim >= 2 else 0.0)
    lam_t = float(lam_t)
    if not (math.isfinite(lam_t) and lam_t >= 0):
        raise InputError(f"lam must be finite and >= 0, got {lam_t} for tensor {name!r}")
    return dataclasses.replace(plan, step=float(np.float32(step)), lam=lam_t)


def _settings(step, qp, qp_density, dq, slice_size, num_gt_flags, small_step) -> _Settings:
    if step is not None and qp is not None:
        raise InputError("give either step or qp, not both")
    if step is None:
        step = step_from_qp(DEFAULT_QP if qp is None else int(qp), qp_density)
    step = float(step)
    if not (math.isfinite(step) and step > 0) or not np.isfinite(np.float32(step)) or np.float32(step) == 0:
        raise InputError(f"step must be a positive float32 number, got {step}")
    if slice_size is not None and not 1 <= int(slice_size) <= 0xFFFFFFFF:
        raise InputError(f"slice_size must be between 1 and 2**32-1 (or None for one slice per tensor), got {slice_size}")
    if not 0 <= int(num_gt_flags) <= MAX_GT_FLAGS:
        raise InputError(f"num_gt_flags must be in 0..{MAX_GT_FLAGS}, got {num_gt_flags}")
    if isinstance(small_step, str) and small_step != "lossless":
        raise InputError(f"small_step must be a number, 'lossless' or None, got {small_step!r}")
    if small_step is not None and not isinstance(small_step, str):
        small_step = float(small_step)
        if not (math.isfinite(small_step) and small_step > 0):
            raise InputError(f"small_step must be a positive number, got {small_step}")
    try:
        dq = dq_states(dq)
    except ValueError as e:
        raise InputError(str(e)) from None
    return _Settings(step, dq, None if slice_size is None else int(slice_size), int(num_gt_flags), small_step)


def _plan(x: np.ndarray, s: _Settings) -> _Plan:
    dtype = dtype_name(x)
    n = x.size
    if dtype in FLOAT_DTYPES:
        step = s.step
        if x.ndim <= 1:
            if s.small_step == "lossless":
                return _Plan("raw", 0.0, 0, dtype)
            step = s.small_step if s.small_step is not None else s.step / SMALL_STEP_DIVISOR
        mode = dq_mode(s.dq)
    else:
        wide = x.astype(np.int64) if dtype != "uint64" else x
        if n and (wide.max() > MAX_ABS_LEVEL or wide.min() < -MAX_ABS_LEVEL):
            return _Plan("raw", 0.0, 0, dtype)
        mode, step = "int", 1.0
    size = n if s.slice_size is None else min(s.slice_size, n)
    return _Plan(mode, float(np.float32(step)), max(1, size), dtype)


def _levels(x: np.ndarray, plan: _Plan) -> np.ndarray:
    """Levels of a tensor that the plain quantizer codes (rounding or the distortion-only trellis)."""
    if plan.mode == "int":
        return np.ascontiguousarray(x, dtype=np.int64).reshape(-1).astype(np.int32)
    levels = quantize_levels(x, plan.step, dq=mode_dq(plan.mode), slice_size=plan.slice_size)
    return fit_dtype_range(levels, plan.step, numpy_dtype(plan.dtype), dq=mode_dq(plan.mode))


def _rd_levels(arrays: Mapping, plans: Mapping, num_gt_flags: int, importance: Mapping,
               one_slice_per_tensor: bool, progress: Progress | None = None) -> dict:
    """Levels of every array whose plan asks for the rate-distortion quantizer (lam > 0, or
    importance weights, shaped like the array): the JAX quantizer (DESIGN §4) over the slices of
    all arrays that share a method and lam as one stream (rdquant.rd_quantize_tensors; the same
    levels as one rd_levels call each). The three mappings share their keys. `progress` gets
    the weights quantized."""
    groups: dict = {}
    for key, plan in plans.items():
        if plan.mode not in ("raw", "int") and (plan.lam > 0 or key in importance):
            # one slice per tensor: slice sizes differ, so such tensors cannot share a stream
            group = (plan.mode, plan.lam, plan.slice_size if one_slice_per_tensor else 0)
            groups.setdefault(group, []).append(key)
    if not groups:
        return {}
    from .rdquant import rd_quantize_tensors  # noqa: PLC0415  (jax loads only when used)

    out = {}
    for (mode, lam, _), keys in groups.items():
        res = rd_quantize_tensors({k: arrays[k] for k in keys}, {k: [plans[k].step] for k in keys}, [lam],
                                  dq=mode_dq(mode), slice_size=max(plans[k].slice_size for k in keys),
                                  num_gt_flags=num_gt_flags, importance={k: importance[k] for k in keys if k in importance} or None,
                                  progress=progress)
        for k in keys:
            out[k] = fit_dtype_range(res[k].levels[0, 0], plans[k].step, numpy_dtype(plans[k].dtype), dq=mode_dq(mode))
    return out


def _reconstruct(levels: np.ndarray, plan: _Plan, shape, scan: str = "rows") -> np.ndarray:
    if plan.mode == "int":
        return levels.astype(numpy_dtype(plan.dtype)).reshape(shape)
    return container.unscan(dequantize(levels, plan.step, (levels.size,), numpy_dtype(plan.dtype)), tuple(shape), scan)


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise InputError(f"threads must be in 1..{numba.config.NUMBA_NUM_THREADS}, got {n}")
    old = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(old)


def _as_array(name, x) -> np.ndarray:
    if not isinstance(name, str) or not name or len(name.encode("utf-8")) > 0xFFFF:
        raise InputError(f"tensor names must be non-empty strings of at most 65535 bytes, got {name!r}")
    a = np.asarray(x)
    if a.ndim > container.MAX_NDIM:
        raise InputError(f"tensor {name!r} has {a.ndim} dimensions, at most {container.MAX_NDIM} are supported")
    return a


# --- encoding ------------------------------------------------------------------------------------

def _bad_level(levels: np.ndarray, i: int, dq: bool) -> InputError:
    what = "is not on the dependent quantizer of its state" if dq and abs(int(levels[i])) <= MAX_ABS_LEVEL else f"exceeds the largest codable level {MAX_ABS_LEVEL}"
    return InputError(f"level {int(levels[i])} at position {i} {what}")


def encode_levels_gpu(levels: np.ndarray, slice_size: int, dq: bool | int, num_gt_flags: int,
                      ctx_init: np.ndarray | None = None, k=None):
    """encode_levels on the GPU engine (context initialisation still chosen on the CPU).
    Returns host arrays (ctx_init, payload, slice lengths, slice CRCs)."""
    from . import engine_gpu  # noqa: PLC0415

    dq = dq_states(dq)
    k = k or engine_gpu.kernels()
    levels = np.ascontiguousarray(levels, dtype=np.int32).reshape(-1)
    if ctx_init is None:
        if levels.size == 0:
            ctx_init = np.zeros(len(used_contexts(num_gt_flags, dq)), np.uint8)
        else:
            # validity first, so that invalid levels raise the same InputError as the CPU path
            _, bad = engine_cpu.slice_bounds(levels, slice_size, dq, num_gt_flags)
            if (bad >= 0).any():
                raise _bad_level(levels, int(bad[bad >= 0][0]), dq)
            ctx_init = engine_cpu.choose_context_init(levels, slice_size, dq, num_gt_flags)
    init = full_context_init(ctx_init, num_gt_flags, dq)
    payload, lengths, crcs, bad = engine_gpu.encode_slices(levels, slice_size, dq, num_gt_flags, init, k=k)
    if bad >= 0:
        raise _bad_level(levels, bad, dq)
    return ctx_init, k.to_host(payload), k.to_host(lengths), k.to_host(crcs)


def encode_levels(levels: np.ndarray, slice_size: int, dq: bool | int, num_gt_flags: int,
                  ctx_init: np.ndarray | None = None, progress: Progress | None = None):
    """Engine entry: code int32 levels in slices (`dq`: a bool, or the trellis size 8..256).
    Returns (ctx_init, payload, slice lengths)."""
    dq = dq_states(dq)
    levels = np.ascontiguousarray(levels, dtype=np.int32)
    n = levels.size
    if n == 0:
        return np.zeros(len(used_contexts(num_gt_flags, dq)), np.uint8), np.zeros(0, np.uint8), np.zeros(0, np.uint32)
    bounds, bad = engine_cpu.slice_bounds(levels, slice_size, dq, num_gt_flags)
    if (bad >= 0).any():
        raise _bad_level(levels, int(bad[bad >= 0][0]), dq)
    if ctx_init is None:
        ctx_init = engine_cpu.choose_context_init(levels, slice_size, dq, num_gt_flags)
    init = full_context_init(ctx_init, num_gt_flags, dq)
    nslices = bounds.size
    lengths = np.zeros(nslices, np.int64)
    pieces = []
    first = 0
    while first < nslices:
        ends = np.cumsum(bounds[first:])
        count = max(1, int(np.searchsorted(ends, _SCRATCH_BYTES, side="right")))
        offsets = np.concatenate([[0], ends[: count - 1]]).astype(np.int64)
        scratch = np.empty(int(ends[count - 1]), np.uint8)
        batch_lengths = np.zeros(count, np.int64)
        engine_cpu.encode_slices_into(levels, slice_size, first, count, dq, num_gt_flags, init, scratch, offsets, batch_lengths)
        out_offsets = np.concatenate([[0], np.cumsum(batch_lengths)[:-1]]).astype(np.int64)
        out = np.empty(int(batch_lengths.sum()), np.uint8)
        engine_cpu.gather_slices(scratch, offsets, batch_lengths, out, out_offsets)
        pieces.append(out)
        lengths[first : first + count] = batch_lengths
        if progress is not None:
            progress(min(n, (first + count) * slice_size) - first * slice_size)
        first += count
    return ctx_init, np.concatenate(pieces), lengths.astype(np.uint32)


SCAN_CHOICES = ("rows", "columns", "auto")


class _Coded(NamedTuple):
    """One tensor as coded: what its record and payload need, and its levels (in scan order)."""

    ctx_init: np.ndarray | None
    payload: np.ndarray | None  # None: not coded (quantize with a single candidate order)
    slice_lengths: np.ndarray | None
    slice_crcs: np.ndarray | None
    num_gt_flags: int
    scan: str
    levels: np.ndarray | None  # None for raw tensors


def _code_tensors(tensors, s: _Settings, lam, tensor_steps, importance, scan: str, engine: str,
                  progress: Progress | None, *, need_bytes: bool):
    """Per tensor, in order: (name, array, plan, _Coded). The RD quantizer runs first over all
    tensors that need it (_rd_levels);
    with scan="auto" every eligible tensor is coded both ways and the smaller kept. Without
    `need_bytes` (quantize) a tensor with one candidate order is not coded at all."""
    if scan not in SCAN_CHOICES:
        raise InputError(f"scan must be one of {SCAN_CHOICES}, got {scan!r}")
    arrays = {name: _as_array(name, x) for name, x in tensors.items()}
    plans = {name: _rd_plan(_plan(x, s), name, x.ndim, lam, tensor_steps) for name, x in arrays.items()}
    # 1-D, integer and raw tensors keep the row-major order
    orders = {name: (["rows", "columns"] if scan == "auto" else [scan])
              if container.can_scan_columns(plans[name].mode, plans[name].dtype, x.ndim) else ["rows"]
              for name, x in arrays.items()}
    views, view_plans, view_importance = {}, {}, {}
    for name, x in arrays.items():
        imp = None if importance is None else importance.get(name)
        if imp is not None and np.shape(imp) not in ((), x.shape):
            raise InputError(f"importance weights of shape {np.shape(imp)} do not match the tensor's {x.shape} ({name!r})")
        for order in orders[name]:
            views[name, order] = container.scan_view(x, order)
            view_plans[name, order] = plans[name]
            if imp is not None:
                view_importance[name, order] = container.scan_view(np.broadcast_to(imp, x.shape), order)
    # the RD quantizer's share of the work dominates: its tensors advance `progress` as they are
    # quantized (unless each is tried in two orders), the others as they are coded
    single = all(len(o) == 1 for o in orders.values())
    rd = _rd_levels(views, view_plans, s.num_gt_flags, view_importance, s.slice_size is None,
                    progress if single else None)
    for name, x in arrays.items():
        plan = plans[name]
        if plan.mode == "raw":
            data = np.frombuffer(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes(), np.uint8)
            coded = _Coded(np.zeros(0, np.uint8), data, np.array([data.size], np.uint32),
                           np.array([zlib.crc32(data)], np.uint32), 0, "rows", None)
        else:
            candidates = []
            for order in orders[name]:
                key = (name, order)
                levels = rd[key] if key in rd else _levels(views[key], plan)
                if not need_bytes and len(orders[name]) == 1:
                    candidates.append(_Coded(None, None, None, None, s.num_gt_flags, order, levels))
                    continue
                quiet = key in rd or not single
                candidates.append(_Coded(*_code_levels(levels, plan, s.num_gt_flags, engine, None if quiet else progress),
                                         s.num_gt_flags, order, levels))
            # the smaller payload; of equal ones the first, rows
            coded = min(candidates, key=lambda c: 0 if c.payload is None else c.payload.size)
        if progress is not None and (plan.mode == "raw" or not single):
            progress(x.size)
        yield name, x, plan, coded


def _code_levels(levels: np.ndarray, plan: _Plan, ngt: int, engine: str, progress: Progress | None):
    """(ctx_init, payload, slice lengths, slice CRCs) of one tensor's levels on the chosen engine."""
    if engine == "gpu":
        init, data, lengths, crcs = encode_levels_gpu(levels, plan.slice_size, mode_dq(plan.mode), ngt)
        if progress is not None:
            progress(levels.size)
        return init, data, lengths, crcs
    init, data, lengths = encode_levels(levels, plan.slice_size, mode_dq(plan.mode), ngt, progress=progress)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
    return init, data, lengths, container.slice_crcs(data, offsets, lengths)


def encode(tensors: Mapping[str, np.ndarray], *, step: float | None = None, qp: int | None = None,
           qp_density: int = 2, dq: bool | int = False, slice_size: int | None = DEFAULT_SLICE_SIZE,
           num_gt_flags: int = DEFAULT_GT_FLAGS, small_step: float | str | None = None,
           threads: int | None = None, progress: Progress | None = None, device: str = "cpu",
           lam: float | Mapping[str, float] = 0.0, tensor_steps: Mapping[str, float] | None = None,
           importance: Mapping[str, np.ndarray] | None = None, scan: str = "rows") -> bytes:
    """Compress named tensors into one gpucabac container.

    step or qp (NNC QP, step_from_qp) sets the step of tensors with two or more dimensions
    (default qp -32); tensors with at most one dimension get `small_step` (default step/16, or
    'lossless'); integer tensors are coded losslessly. `dq` selects dependent quantization:
    True (or 8) is NNC's 8-state trellis; 16, 32, 64, 128 or 256 a larger Ungerboeck trellis
    (format version 2: closer to the rate-distortion bound, same decoding speed, encoding cost
    growing with the states); `slice_size` the number of levels per independently coded slice (None: one per tensor).
    `progress` is called with the number of weights finished since the last call. `device`:
    "cpu" (numba), "gpu" (the CUDA engine through CuPy: same bytes; quantization and the choice
    of context initialisation stay on the CPU) or "auto" (the GPU when CuPy sees one).
    `lam` > 0 turns on the rate-distortion quantizer (gpucabac.rdquant: greedy RDOQ, or the
    rate-aware trellis with dq) minimising F·(w − w')² + lam·step²·bits; a number applies to
    tensors of two or more dimensions, a mapping to the tensors it names. `tensor_steps` gives
    named tensors their own step; `importance` maps names to weights F (default 1). lam = 0
    without importance is the plain quantizer, byte for byte. `scan`: the order in which the
    values of coded float tensors of two or more dimensions are quantized and coded: "rows"
    (row-major), "columns" (the transpose of the tensor viewed as [shape[0], rest]; format
    version 2), or "auto" (each such tensor both ways, the smaller kept; twice the work).
    """
    s = _settings(step, qp, qp_density, dq, slice_size, num_gt_flags, small_step)
    engine = resolve_device(device, "encode")
    records, payloads, offset = [], [], 0
    with _threads(threads):
        for name, x, plan, coded in _code_tensors(tensors, s, lam, tensor_steps, importance, scan, engine, progress,
                                                  need_bytes=True):
            records.append(TensorRecord(name, plan.dtype, tuple(int(d) for d in x.shape), plan.mode, plan.step,
                                        coded.num_gt_flags, plan.slice_size, coded.ctx_init, offset,
                                        coded.slice_lengths, coded.slice_crcs, coded.scan))
            payloads.append(coded.payload)
            offset += coded.payload.size
    return container.write(records, np.concatenate(payloads) if payloads else b"")


def quantize(tensors: Mapping[str, np.ndarray], *, step: float | None = None, qp: int | None = None,
             qp_density: int = 2, dq: bool | int = False, slice_size: int | None = DEFAULT_SLICE_SIZE,
             num_gt_flags: int = DEFAULT_GT_FLAGS, small_step: float | str | None = None,
             threads: int | None = None, lam: float | Mapping[str, float] = 0.0,
             tensor_steps: Mapping[str, float] | None = None,
             importance: Mapping[str, np.ndarray] | None = None, scan: str = "rows") -> dict[str, np.ndarray]:
    """The tensors exactly as `decode(encode(tensors, **same settings))` returns them (with
    scan="auto" the tensors are coded, to make the same choice)."""
    s = _settings(step, qp, qp_density, dq, slice_size, num_gt_flags, small_step)
    out = {}
    with _threads(threads):
        for name, x, plan, coded in _code_tensors(tensors, s, lam, tensor_steps, importance, scan, "cpu", None,
                                                  need_bytes=False):
            out[name] = x.copy() if plan.mode == "raw" else _reconstruct(coded.levels, plan, x.shape, coded.scan)
    return out


# --- decoding ------------------------------------------------------------------------------------

def decode_levels(rec: TensorRecord, payload: np.ndarray) -> np.ndarray:
    """Engine entry: the int32 levels of one coded tensor from its payload bytes."""
    n = rec.numel
    offsets = np.concatenate([[0], np.cumsum(rec.slice_lengths, dtype=np.int64)[:-1]]).astype(np.int64)
    lengths = rec.slice_lengths.astype(np.int64)
    crcs = container.slice_crcs(payload, offsets, lengths)
    bad = np.flatnonzero(crcs != rec.slice_crcs)
    if bad.size:
        raise FormatError(f"tensor {rec.name!r}: checksum mismatch in slice {int(bad[0])} of {rec.num_slices} ({bad.size} corrupt)")
    dq = mode_dq(rec.mode)
    init = full_context_init(rec.ctx_init, rec.num_gt_flags, dq)  # count checked by container.parse
    out = np.empty(n, np.int32)
    errors = np.zeros(rec.num_slices, np.int32)
    engine_cpu.decode_slices_into(payload, offsets, lengths, 0, rec.num_slices, n, rec.slice_size, dq, rec.num_gt_flags, init, out, errors)
    bad = np.flatnonzero(errors)
    if bad.size:
        s = int(bad[0])
        raise FormatError(f"tensor {rec.name!r}, slice {s}: {engine_cpu.DECODE_ERROR_MESSAGES.get(int(errors[s]), 'decoding failed')}")
    return out


def _decode_record(rec: TensorRecord, payload: np.ndarray, dtype) -> np.ndarray:
    if rec.mode == "raw":
        x = raw_values(rec, payload).reshape(rec.shape)
    else:
        levels = decode_levels(rec, payload)
        if rec.mode == "int" and levels.size:
            check_int_range(rec, int(levels.min()), int(levels.max()))
        x = _reconstruct(levels, _Plan(rec.mode, rec.step, rec.slice_size, rec.dtype), rec.shape, rec.scan)
    if dtype is not None and rec.dtype in FLOAT_DTYPES:
        x = cast_float(x, dtype_name(dtype))
    return x


def _select(header: container.Header, names) -> list[TensorRecord]:
    if names is None:
        return header.records
    names = [names] if isinstance(names, str) else list(names)
    known = {r.name: r for r in header.records}
    missing = [n for n in names if n not in known]
    if missing:
        raise TensorNotFoundError(f"no tensor named {', '.join(map(repr, missing))} in this container")
    return [known[n] for n in names]


def decode(data: bytes | bytearray | memoryview, names: Iterable[str] | None = None, *, dtype=None,
           threads: int | None = None, progress: Progress | None = None, device: str = "cpu") -> dict[str, np.ndarray]:
    """Decompress a container (bytes) into named numpy arrays of their original dtype (or
    `dtype` for floating-point tensors). `names` selects tensors; only their slices are read.

    `device="gpu"` decodes all selected slices in one CUDA launch and returns CuPy arrays that
    stay on the device (hand them to PyTorch or JAX with DLPack: `torch.from_dlpack(a)`);
    "auto" takes the GPU when CuPy sees one (logged on the "gpucabac" logger). Same values either way."""
    buf = memoryview(data).cast("B")
    header = container.parse_container(buf)
    if resolve_device(device, "decode") == "gpu":
        from . import engine_gpu  # noqa: PLC0415

        def payload_of(rec):
            start = header.payload_start + rec.offset
            return np.frombuffer(buf[start : start + rec.payload_length], np.uint8)

        return engine_gpu.decode_records(_select(header, names), payload_of, dtype=dtype, progress=progress)
    out = {}
    with _threads(threads):
        for rec in _select(header, names):
            start = header.payload_start + rec.offset
            payload = np.frombuffer(buf[start : start + rec.payload_length], np.uint8)
            out[rec.name] = _decode_record(rec, payload, dtype)
            if progress is not None:
                progress(rec.numel)
    return out


def _read_header_file(f) -> container.Header:
    size = os.fstat(f.fileno()).st_size
    pre = f.read(container.PREAMBLE_SIZE)
    version, count, table_len, crc = container.read_preamble(pre)
    if container.PREAMBLE_SIZE + table_len > size:
        raise FormatError(f"tensor table of {table_len} bytes runs past the end of the file ({size} bytes)")
    return container.parse(f.read(table_len), count, crc, size, version)


def load(path, names: Iterable[str] | None = None, *, dtype=None, threads: int | None = None,
         progress: Progress | None = None, device: str = "cpu") -> dict[str, np.ndarray]:
    """Decode tensors from a .gcb file, reading only the header and the selected tensors' bytes.
    `device` as for `decode`."""
    engine = resolve_device(device, "load")
    with open(path, "rb") as f:
        header = _read_header_file(f)
        if engine == "gpu":
            from . import engine_gpu  # noqa: PLC0415

            def payload_of(rec):
                f.seek(header.payload_start + rec.offset)
                raw = f.read(rec.payload_length)
                if len(raw) != rec.payload_length:
                    raise FormatError(f"tensor {rec.name!r}: file truncated inside its payload")
                return np.frombuffer(raw, np.uint8)

            return engine_gpu.decode_records(_select(header, names), payload_of, dtype=dtype, progress=progress)
        out = {}
        with _threads(threads):
            for rec in _select(header, names):
                f.seek(header.payload_start + rec.offset)
                raw = f.read(rec.payload_length)
                if len(raw) != rec.payload_length:
                    raise FormatError(f"tensor {rec.name!r}: file truncated inside its payload")
                out[rec.name] = _decode_record(rec, np.frombuffer(raw, np.uint8), dtype)
                if progress is not None:
                    progress(rec.numel)
    return out


def info(data) -> ContainerInfo:
    """Describe a container given as bytes or as a path (of which only the header is read)."""
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            header = _read_header_file(f)
            total = os.fstat(f.fileno()).st_size
    else:
        buf = memoryview(data).cast("B")
        header = container.parse_container(buf)
        total = len(buf)
    tensors = [
        TensorInfo(r.name, r.dtype, r.shape, r.mode, r.step, r.slice_size, r.num_slices, r.num_gt_flags,
                   r.payload_length, container.record_size(r), r.scan)
        for r in header.records
    ]
    return ContainerInfo(header.version, total, tensors)
