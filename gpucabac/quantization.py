"""Quantization: weights -> integer levels, and levels -> reconstruction (docs/engine.md §3).

This is the simple quantizer of the codec core: uniform rounding, and a distortion-only
dependent-quantization trellis (NNCodec's default, lambda_scale = 0). The JAX rate-distortion
quantizer plugs in at `quantize_levels`.

Levels are reconstruction indices r in scan order (row-major); the reconstruction is r * step,
computed in float32 (float64 for float64 tensors) and then rounded to the tensor's dtype, the
same way on every engine.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import threads as _threads  # noqa: F401  (numba's fork-safe layer, before any parallel loop)
from .binarize import dq_states
from .dtypes import cast_float, dtype_name
from .errors import InputError
from .modes import step_from_qp as step_from_qp  # re-exported: part of the quantizer's surface
from .tables import DQ_NEXT_ALL, MAX_ABS_LEVEL

_DQ_NEXT = DQ_NEXT_ALL.copy()
# The trellis keeps a back pointer per weight and state (2 bytes); above this a slice is refused.
MAX_TRELLIS_BYTES = 4 << 30


def quantize_levels(x: np.ndarray, step: float, *, dq: bool | int = False, slice_size: int | None = None) -> np.ndarray:
    """Integer levels (reconstruction indices) of x at `step`, flattened in scan order.

    Uniform: round half away from zero. DQ: a Viterbi search per slice over the trellis of `dq`
    states (True: NNC's 8; the DQ state restarts at every slice, docs/design.md §1) minimising the
    squared error.
    """
    try:
        dq = dq_states(dq)
    except ValueError as e:
        raise InputError(str(e)) from None
    if not np.isfinite(step) or step <= 0:
        raise InputError(f"step must be a positive finite number, got {step}")
    w = np.ascontiguousarray(x).reshape(-1)
    if w.dtype.kind != "f" or w.dtype.itemsize < 4:  # float16/bfloat16 widen exactly
        w = w.astype(np.float32)
    # w * (1/step) in the tensor's precision, as NNCodec's quantizer computes it, so that both
    # give the same levels (also where 1/step is inexact and w/step lies next to a tie).
    scale = w.dtype.type(1.0 / w.dtype.type(np.float32(step)))
    if not np.isfinite(scale):
        raise InputError(f"step {step:g} is too small: its reciprocal overflows {w.dtype}")
    n = w.shape[0]
    size = max(1, min(n, n if slice_size is None else int(slice_size)))
    if dq and 2 * size * dq > MAX_TRELLIS_BYTES:
        raise InputError(f"a {dq}-state trellis over slices of {size} weights needs {2 * size * dq / 2**30:.1f} GiB; "
                         f"use a smaller slice size")
    levels = np.empty(n, np.int32)
    status = _quantize(w, scale, dq, size, levels)
    if status == 1:
        raise InputError("tensor has NaN or infinite values; they cannot be quantized")
    if status == 2:
        peak = float(np.max(np.abs(w.astype(np.float64)))) * float(scale)
        raise InputError(
            f"step {step:g} is too small for this tensor: |w|/step reaches {peak:.3g}, "
            f"above the largest codable level {MAX_ABS_LEVEL}; use a larger step (higher qp)"
        )
    return levels


@nb.njit(parallel=True, cache=True)
def _quantize(w, scale, dq, slice_size, levels):
    """0 on success, 1 if a value is not finite, 2 if a level would exceed MAX_ABS_LEVEL."""
    n = w.shape[0]
    nslices = (n + slice_size - 1) // slice_size
    status = np.zeros(nslices, np.int32)
    for s in nb.prange(nslices):
        start = s * slice_size
        end = min(n, start + slice_size)
        for i in range(start, end):
            u = np.float64(w[i] * scale)
            if not np.isfinite(u):
                status[s] = 1
                break
            if abs(u) > MAX_ABS_LEVEL:
                status[s] = 2
                break
            if not dq:
                a = abs(u)
                r = np.floor(a)
                if a - r >= 0.5:  # exact: a - floor(a) has no rounding error
                    r += 1.0
                levels[i] = np.int32(r if u >= 0 else -r)
        if dq and status[s] == 0:
            _dq_slice(w, scale, start, end, levels, dq)
    return status.max() if nslices else 0


def _work_dtype(dtype) -> np.dtype:
    """The precision a tensor of `dtype` is reconstructed in: float64 for float64, else float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def dequantize(levels: np.ndarray, step: float, shape, dtype) -> np.ndarray:
    """r * step in float32 (float64 for float64 tensors), rounded to `dtype`, shaped."""
    work = _work_dtype(dtype)
    with np.errstate(over="ignore"):  # only corrupt levels overflow; the decoder checks for them
        out = levels.astype(work) * work.type(np.float32(step))
        return out.astype(dtype, copy=False).reshape(shape)


def dequantize_into(levels: np.ndarray, step: float, dtype, out: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """Write cast_float(dequantize(levels, step, levels.shape, dtype), out's dtype) into `out`
    (flat, as long as `levels`), bit for bit the same values, without temporaries of the size of
    `levels`: when `out` is of the tensor's dtype `dtype` and that is the reconstruction's own
    precision (float32, float64), the product goes straight into `out`; otherwise it is made in
    `scratch` (an array of the work precision at least as long, allocated when not given) and
    rounded from there. Returns the scratch array to pass to the next call (`scratch` itself, or
    the one allocated)."""
    dtype = np.dtype(dtype)
    work = _work_dtype(dtype)
    s = work.type(np.float32(step))
    if out.dtype == dtype == work:
        with np.errstate(over="ignore"):  # as in dequantize
            np.multiply(levels, s, out=out, dtype=work)
        return scratch
    if scratch is None or scratch.dtype != work or scratch.size < levels.size:
        scratch = np.empty(levels.size, work)
    tmp = scratch[: levels.size]
    with np.errstate(over="ignore"):
        np.multiply(levels, s, out=tmp, dtype=work)
        rec = tmp.astype(dtype, copy=False)
    out[...] = cast_float(rec, dtype_name(out.dtype))
    return scratch


# --- dependent quantization (§3.5) -----------------------------------------------------------


@nb.njit(cache=True)
def _candidates(x, qid):
    """The two reconstruction indices of quantizer `qid` (0: even, 1: odd) around x."""
    if qid == 0:
        lo = 2.0 * np.floor(x / 2.0)
    else:
        lo = 2.0 * np.floor((x - 1.0) / 2.0) + 1.0
    return lo, lo + 2.0


@nb.njit(cache=True)
def _dq_slice(w, scale, start, end, out, dq):
    n = end - start
    inf = np.inf
    base = 2 * dq - 16  # this trellis' table in _DQ_NEXT
    cost = np.full(dq, inf)
    cost[0] = 0.0
    new = np.empty(dq)
    # per weight and state reached: the previous state, and which candidate (0: lo, 1: hi, 2: zero)
    prev_state = np.empty((n, dq), np.uint8)
    choice = np.empty((n, dq), np.uint8)
    for i in range(n):
        x = np.float64(w[start + i] * scale)
        for s in range(dq):
            new[s] = inf
        for s in range(dq):
            c0 = cost[s]
            if c0 == inf:
                continue
            qid = s & 1
            lo, hi = _candidates(x, qid)
            for which in range(3):
                r = lo if which == 0 else (hi if which == 1 else 0.0)
                d = x - r
                c = c0 + d * d
                if r == 0.0:
                    k = 0
                else:
                    ri = np.int64(r)
                    k = (ri + qid) // 2 if ri > 0 else -((-ri + qid) // 2)
                ns = _DQ_NEXT[base + 2 * s + (k & 1)]
                if c < new[ns]:
                    new[ns] = c
                    prev_state[i, ns] = s
                    choice[i, ns] = which
        for s in range(dq):
            cost[s] = new[s]
    best = 0
    for s in range(dq):
        if cost[s] < cost[best]:
            best = s
    s = best
    for i in range(n - 1, -1, -1):
        prev = prev_state[i, s]
        which = choice[i, s]
        lo, hi = _candidates(np.float64(w[start + i] * scale), prev & 1)
        r = lo if which == 0 else (hi if which == 1 else 0.0)
        out[start + i] = np.int32(r)
        s = prev


def fit_dtype_range(levels: np.ndarray, step: float, dtype, *, dq: bool) -> np.ndarray:
    """Move levels whose reconstruction overflows `dtype` (a finite weight near the dtype's
    largest value, rounded up) towards zero: by one, or under DQ by four, which keeps
    the parity of the coded level and so every later DQ state."""
    dtype = np.dtype(dtype)
    if dtype.itemsize > 4 or levels.size == 0:  # float64 reconstructions cannot overflow
        return levels
    if dtype.kind == "f":
        big = float(np.finfo(dtype).max)
    else:  # bfloat16: its array brought ml_dtypes in already
        import ml_dtypes  # noqa: PLC0415

        big = float(ml_dtypes.finfo(dtype).max)
    limit = big / float(np.float32(step))  # in float64: no overflow for tiny steps
    # the largest |level| without np.abs's int32 copy of the levels (|int32 min| fits in Python's int)
    if max(int(levels.max()), -int(levels.min())) < limit - 2:
        return levels
    levels = levels.copy()
    delta = 4 if dq else 1
    while True:
        with np.errstate(over="ignore"):
            rec = (levels.astype(np.float32) * np.float32(step)).astype(dtype)
        over = ~np.isfinite(rec.astype(np.float32))
        if not over.any():
            return levels
        levels[over] -= np.sign(levels[over]).astype(np.int32) * delta
