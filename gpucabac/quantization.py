"""Quantization: weights -> integer levels, and levels -> reconstruction (docs/engine.md §3).

This is the simple quantizer of the codec core: uniform rounding, and a distortion-only
dependent-quantization trellis (NNCodec's default, lambda_scale = 0). The JAX rate-distortion
quantizer plugs in at `quantize_levels`; its CPU kernel (`rd_lanes`, the same algorithm in numba)
lives at the end of this module.

Levels are reconstruction indices r in scan order (row-major); the reconstruction is r * step,
computed in float32 (float64 for float64 tensors) and then rounded to the tensor's dtype, the
same way on every engine.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import threads as _threads  # noqa: F401  (numba's fork-safe layer, before any parallel loop)
from .binarize import dq_states
from .dtypes import cast_float, dtype_name
from .errors import InputError
from .layout import GT, SIGN
from .modes import step_from_qp as step_from_qp  # re-exported: part of the quantizer's surface
from .tables import BIT_COST, CURVE, DQ_NEXT_ALL, MAX_ABS_LEVEL

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


@nb.njit(cache=True)
def _quantize_slice(w, scale, dq, start, end, levels):
    """Levels of w[start:end] into levels[start:end]: 0 on success, 1 if a value is not finite,
    2 if a level would exceed MAX_ABS_LEVEL."""
    for i in range(start, end):
        u = np.float64(w[i] * scale)
        if not np.isfinite(u):
            return 1
        if abs(u) > MAX_ABS_LEVEL:
            return 2
        if not dq:
            a = abs(u)
            r = np.floor(a)
            if a - r >= 0.5:  # exact: a - floor(a) has no rounding error
                r += 1.0
            levels[i] = np.int32(r if u >= 0 else -r)
    if dq:
        _dq_slice(w, scale, start, end, levels, dq)
    return 0


@nb.njit(parallel=True, cache=True)  # only its loop: see slices.py on parallel drivers
def _quantize_parallel(w, scale, dq, slice_size, levels, status):
    n = w.shape[0]
    for s in nb.prange(status.shape[0]):
        start = s * slice_size
        status[s] = _quantize_slice(w, scale, dq, start, min(n, start + slice_size), levels)


def _quantize(w, scale, dq, slice_size, levels):
    """0 on success, 1 if a value is not finite, 2 if a level would exceed MAX_ABS_LEVEL."""
    n = w.shape[0]
    nslices = (n + slice_size - 1) // slice_size
    if nslices <= 1:
        return _quantize_slice(w, scale, dq, 0, n, levels) if nslices else 0
    status = np.zeros(nslices, np.int32)
    _quantize_parallel(w, scale, dq, slice_size, levels, status)
    return int(status.max())


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


# --- the rate-distortion quantizer's CPU kernel ----------------------------------------------
# rdquant._lane (JAX) and these functions are one algorithm, step for step: the same float32
# operations in the same order, the same integer estimator and context update, the same first-
# cheapest tie-breaking, so that they choose the same levels and report the same float32 bits and
# distortions (tests/test_rdquant.py compares them). JAX runs it on the GPU; on the CPU this kernel
# walks only the bins a level has instead of every context, and at lam = 0 (where the rate cannot
# change a decision) it finds the levels first and prices the one chosen path afterwards.

_RD_SIGN = SIGN
_RD_GT = GT
_RD_ONE_BIT = 32768  # BIT_COST units per bit (rdquant.ONE_BIT)
_RD_BIT_COST = BIT_COST.ravel().astype(np.int32)
_RD_CURVE = CURVE.astype(np.int32)


@intrinsic
def _fma32(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma.f32): what XLA's compiled loops compute for the JAX
    quantizer's `c + a * b` (LLVM contracts the multiply-add), so both round alike."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


@nb.njit(cache=True, inline="always")
def _rd_cost(s0, s1, o, c, bit):
    """BIT_COST of `bit` in context c of register slot o (docs/engine.md §2.8), in 2^15 units."""
    return _RD_BIT_COST[2 * (512 + ((np.int32(s1[o, c]) + 16 * np.int32(s0[o, c])) >> 3)) + bit]


@nb.njit(cache=True, inline="always")
def _rd_eg(s0, s1, o, a, n):
    """Cost of the Exp-Golomb remainder of |level| a > n: its prefix bins and its bypass bins."""
    rem1 = a - n
    m = 0
    while rem1 >> (m + 1):
        m += 1
    base = _RD_GT + 2 * n
    rate = _rd_cost(s0, s1, o, base + m, 0) + _RD_ONE_BIT * m
    for j in range(m):
        rate += _rd_cost(s0, s1, o, base + j, 1)
    return rate


@nb.njit(cache=True, inline="always")
def _rd_rate(s0, s1, o, k, nbr, sig, n):
    """Estimated cost of coded level k (regular bins at the given context registers, plus bypass
    bins) with neighbour class nbr; sig = 3 * (DQ state & 7), the state's sig contexts."""
    a = abs(k)
    if a == 0:
        return _rd_cost(s0, s1, o, sig + nbr, 0)
    neg = 1 if k < 0 else 0
    rate = _rd_cost(s0, s1, o, sig + nbr, 1) + _rd_cost(s0, s1, o, _RD_SIGN + nbr, neg)
    g = _RD_GT + neg
    for j in range(min(a - 1, n)):
        rate += _rd_cost(s0, s1, o, g + 2 * j, 1)
    if a <= n:
        return rate + _rd_cost(s0, s1, o, g + 2 * (a - 1), 0)
    return rate + _rd_eg(s0, s1, o, a, n)


@nb.njit(cache=True, inline="always")
def _rd_rate_pair(s0, s1, o, a, neg, nbr, sig, n):
    """(_rd_rate of |level| a, of |level| a + 1), a >= 1, both of sign neg: one walk over the bins
    they share (all but the last flag or the remainder; above n flags, levels whose remainders
    have prefixes of one length cost the same)."""
    p = _rd_cost(s0, s1, o, sig + nbr, 1) + _rd_cost(s0, s1, o, _RD_SIGN + nbr, neg)
    for j in range(1, min(a - 1, n) + 1):
        p += _rd_cost(s0, s1, o, _RD_GT + 2 * (j - 1) + neg, 1)
    if a <= n:
        c = _RD_GT + 2 * (a - 1) + neg
        ra = p + _rd_cost(s0, s1, o, c, 0)
        q = p + _rd_cost(s0, s1, o, c, 1)
        rb = q + (_rd_cost(s0, s1, o, c + 2, 0) if a < n else _rd_eg(s0, s1, o, a + 1, n))
        return ra, rb
    ea = _rd_eg(s0, s1, o, a, n)
    if (a + 1 - n) & (a - n):  # a - n + 1 not a power of two: the same prefix length
        return p + ea, p + ea
    return p + ea, p + _rd_eg(s0, s1, o, a + 1, n)


@nb.njit(cache=True, inline="always")
def _rd_up(s0, s1, o, sh0, sh1, c):
    """The engine's context update (engines/cpu.py `_update`) of context c in slot o after a 1."""
    a0 = np.int32(s0[o, c])
    a1 = np.int32(s1[o, c])
    s0[o, c] = a0 + (_RD_CURVE[16 + (a0 >> 3)] >> sh0[c])
    s1[o, c] = a1 + (_RD_CURVE[16 + (a1 >> 7)] >> sh1[c])


@nb.njit(cache=True, inline="always")
def _rd_down(s0, s1, o, sh0, sh1, c):
    """The same after a 0 (sigma = -1)."""
    a0 = np.int32(s0[o, c])
    a1 = np.int32(s1[o, c])
    s0[o, c] = a0 - (_RD_CURVE[16 + ((-a0) >> 3)] >> sh0[c])
    s1[o, c] = a1 - (_RD_CURVE[16 + ((-a1) >> 7)] >> sh1[c])


@nb.njit(cache=True, inline="always")
def _rd_advance(s0, s1, o, sh0, sh1, k, nbr, sig, n):
    """Update slot o's context registers with the bins of coded level k (each context sees at
    most one of them): sig, sign, the flags (1s, then a 0 below n + 1), the remainder's prefix."""
    if k == 0:
        _rd_down(s0, s1, o, sh0, sh1, sig + nbr)
        return
    _rd_up(s0, s1, o, sh0, sh1, sig + nbr)
    a = abs(k)
    neg = 1 if k < 0 else 0
    if neg:
        _rd_up(s0, s1, o, sh0, sh1, _RD_SIGN + nbr)
    else:
        _rd_down(s0, s1, o, sh0, sh1, _RD_SIGN + nbr)
    g = _RD_GT + neg
    for j in range(min(a - 1, n)):
        _rd_up(s0, s1, o, sh0, sh1, g + 2 * j)
    if a <= n:
        _rd_down(s0, s1, o, sh0, sh1, g + 2 * (a - 1))
        return
    rem1 = a - n
    m = 0
    while rem1 >> (m + 1):
        m += 1
    base = _RD_GT + 2 * n
    for j in range(m):
        _rd_up(s0, s1, o, sh0, sh1, base + j)
    _rd_down(s0, s1, o, sh0, sh1, base + m)


@nb.njit(cache=True, inline="always")
def _rd_class(k):
    return 0 if k == 0 else (1 if k < 0 else 2)


@nb.njit(cache=True, inline="always")
def _rd_coded(r, qid):
    """Coded level of reconstruction index r (an integer-valued float32) under quantizer qid."""
    ri = np.int32(r)
    if ri == 0:
        return 0
    return (ri + qid) // 2 if ri > 0 else (ri - qid) // 2


@nb.njit(cache=True)
def _rd_urq_lane(w, f, nv, scale, lam, s0i, s1i, sh0, sh1, n, levels):
    """Greedy RDOQ of one slice at one (scale, lam): (bits, weighted distortion, distortion)."""
    s0 = s0i.astype(np.int16).reshape(1, -1)
    s1 = s1i.astype(np.int16).reshape(1, -1)
    inv = np.float32(1.0 / _RD_ONE_BIT)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    bits = zero
    wd = zero
    dd = zero
    nbr = 0
    rated = lam != zero
    for i in range(nv):
        x = w[i] * scale
        fi = f[i]
        a = abs(x)
        fl = np.floor(a)
        nn = fl + (one if a - fl >= np.float32(0.5) else zero)
        sg = -one if x < zero else one
        r0 = sg * nn
        r1 = sg * max(nn - one, zero)
        e0 = x - r0
        e1 = x - r1
        d0 = e0 * e0
        d1 = e1 * e1
        d2 = x * x
        k0 = np.int32(r0)
        k1 = np.int32(r1)
        if rated:
            z = _rd_cost(s0, s1, 0, nbr, 0)
            if k1 != 0:  # n >= 2: n and n - 1 share their bins but the last
                q1, q0 = _rd_rate_pair(s0, s1, 0, abs(k1), 1 if k1 < 0 else 0, nbr, 0, n)
            else:
                q0 = _rd_rate(s0, s1, 0, k0, nbr, 0, n)
                q1 = z
            b0 = np.float32(q0) * inv
            b1 = np.float32(q1) * inv
            b2 = np.float32(z) * inv
            # J = 0 for the one state: the branch is (0 + F·d) + lam·bits, as in rdquant._lane
            c0 = _fma32(lam, b0, _fma32(fi, d0, zero))
            c1 = _fma32(lam, b1, _fma32(fi, d1, zero))
            c2 = _fma32(lam, b2, _fma32(fi, d2, zero))
        else:
            c0 = _fma32(fi, d0, zero)
            c1 = _fma32(fi, d1, zero)
            c2 = _fma32(fi, d2, zero)
        pick = 0
        best = c0
        if c1 < best:
            pick = 1
            best = c1
        if c2 < best:
            pick = 2
        if pick == 0:
            k, dist = k0, d0
        elif pick == 1:
            k, dist = k1, d1
        else:
            k, dist = 0, d2
        if rated:
            rb = b0 if pick == 0 else (b1 if pick == 1 else b2)
        else:
            rb = np.float32(_rd_rate(s0, s1, 0, k, nbr, 0, n)) * inv
        bits = bits + rb
        wd = _fma32(fi, dist, wd)
        dd = dd + dist
        _rd_advance(s0, s1, 0, sh0, sh1, k, nbr, 0, n)
        nbr = _rd_class(k)
        levels[i] = k
    for i in range(nv, levels.shape[0]):
        levels[i] = 0
    return bits, wd, dd


@nb.njit(cache=True)
def _rd_dq_lane(w, f, nv, scale, lam, s0i, s1i, sh0, sh1, n, nxt, pred, levels):
    """The rate-aware DQ trellis of one slice at one (scale, lam), every survivor path with its
    own context registers: (bits, weighted distortion, distortion); levels (reconstruction
    indices) of the best path into `levels`."""
    ns = nxt.shape[0]
    nc = s0i.shape[0]
    inf = np.float32(np.inf)
    inv = np.float32(1.0 / _RD_ONE_BIT)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    two = np.float32(2.0)
    rated = lam != zero
    J = np.full(ns, inf, np.float32)
    J[0] = zero
    Jn = np.empty(ns, np.float32)
    # Context registers live in 2·ns slots; a path owns one. A survivor takes over its source's
    # slot (updating it in place) unless another survivor took it first, then it gets a copy:
    # no copying where a path has one continuation.
    cs0 = np.empty((2 * ns, nc), np.int16)
    cs1 = np.empty((2 * ns, nc), np.int16)
    owner = np.arange(ns)
    owner_n = np.empty(ns, np.int64)
    taken = np.zeros(2 * ns, np.bool_)
    if rated:
        for s in range(ns):
            for c in range(nc):
                cs0[s, c] = s0i[c]
                cs1[s, c] = s1i[c]
    nbr = np.zeros((2, ns), np.int32)
    acc = np.zeros((2, 3, ns), np.float32)  # per path: bits, weighted distortion, distortion
    rq = np.empty((2, 3), np.float32)
    kq = np.empty((2, 3), np.int32)
    dq_ = np.empty((2, 3), np.float32)  # squared errors
    pair = np.empty(2, np.int64)
    dest = np.empty((ns, 3), np.int32)
    rb = np.zeros((ns, 3), np.float32)
    br = np.empty((ns, 3), np.float32)
    psrc = np.empty(ns, np.int64)
    pcand = np.empty(ns, np.int64)
    back = np.empty((max(nv, 1), ns), np.int16)  # source state of each state's survivor
    rec = np.empty((max(nv, 1), ns), np.int32)  # its reconstruction index
    cur = 0
    for i in range(nv):
        x = w[i] * scale
        fi = f[i]
        # the candidates of the two quantizers: reconstruction indices, coded levels, errors
        for q in range(2):
            lo = two * np.floor(x / two) if q == 0 else two * np.floor((x - one) / two) + one
            rq[q, 0] = lo
            rq[q, 1] = lo + two
            rq[q, 2] = zero
            for c in range(3):
                e = x - rq[q, c]
                dq_[q, c] = e * e
                kq[q, c] = _rd_coded(rq[q, c], q)
            # lo and hi coded as |levels| a and a + 1 of one sign: priced together
            k0 = kq[q, 0]
            k1 = kq[q, 1]
            if k0 != 0 and k1 != 0 and (k0 < 0) == (k1 < 0):
                pair[q] = min(abs(k0), abs(k1))
            else:
                pair[q] = 0
        for s in range(ns):
            q = s & 1
            for c in range(3):
                dest[s, c] = nxt[s, kq[q, c] & 1]
            if rated and J[s] != inf:
                sig = 3 * (s & 7)
                o = owner[s]
                nb_s = nbr[cur, s]
                z = _rd_cost(cs0, cs1, o, sig + nb_s, 0)
                a = pair[q]
                if a:
                    ra, rb1 = _rd_rate_pair(cs0, cs1, o, a, 1 if kq[q, 0] < 0 else 0, nb_s, sig, n)
                    if abs(kq[q, 0]) == a:
                        rb[s, 0] = np.float32(ra) * inv
                        rb[s, 1] = np.float32(rb1) * inv
                    else:
                        rb[s, 0] = np.float32(rb1) * inv
                        rb[s, 1] = np.float32(ra) * inv
                else:
                    for c in range(2):
                        kk = kq[q, c]
                        rb[s, c] = np.float32(z if kk == 0 else _rd_rate(cs0, cs1, o, kk, nb_s, sig, n)) * inv
                rb[s, 2] = np.float32(z) * inv
            for c in range(3):
                br[s, c] = _fma32(lam, rb[s, c], _fma32(fi, dq_[q, c], J[s]))
        nxt_buf = 1 - cur
        # per state the first cheapest branch that reaches it, in (source, candidate) order
        for d in range(ns):
            Jn[d] = inf
            psrc[d] = pred[d, 0]
            pcand[d] = 0
        for s in range(ns):
            for c in range(3):
                d = dest[s, c]
                if br[s, c] < Jn[d]:
                    Jn[d] = br[s, c]
                    psrc[d] = s
                    pcand[d] = c
        low = inf
        for d in range(ns):
            ps = psrc[d]
            pc = pcand[d]
            if Jn[d] < low:
                low = Jn[d]
            back[i, d] = ps
            rec[i, d] = np.int32(rq[ps & 1, pc])
            nbr[nxt_buf, d] = _rd_class(kq[ps & 1, pc])
            acc[nxt_buf, 0, d] = acc[cur, 0, ps] + rb[ps, pc]
            acc[nxt_buf, 1, d] = _fma32(fi, dq_[ps & 1, pc], acc[cur, 1, ps])
            acc[nxt_buf, 2, d] = acc[cur, 2, ps] + dq_[ps & 1, pc]
        if rated:
            taken[:] = False
            for d in range(ns):
                o = owner[psrc[d]]
                if Jn[d] != inf and not taken[o]:
                    taken[o] = True
                    owner_n[d] = o
                else:
                    owner_n[d] = -1
            free = 0
            for d in range(ns):
                if owner_n[d] < 0:
                    while taken[free]:
                        free += 1
                    taken[free] = True
                    owner_n[d] = free
                    if Jn[d] != inf:
                        o = owner[psrc[d]]
                        for c in range(nc):
                            cs0[free, c] = cs0[o, c]
                            cs1[free, c] = cs1[o, c]
            for d in range(ns):
                if Jn[d] != inf:
                    ps = psrc[d]
                    o = owner_n[d]
                    _rd_advance(cs0, cs1, o, sh0, sh1, kq[ps & 1, pcand[d]], nbr[cur, ps], 3 * (ps & 7), n)
                owner[d] = owner_n[d]
        for d in range(ns):
            J[d] = Jn[d] - low
        cur = nxt_buf
    best = 0
    for s in range(1, ns):
        if J[s] < J[best]:
            best = s
    s = best
    for i in range(nv - 1, -1, -1):
        levels[i] = rec[i, s]
        s = back[i, s]
    for i in range(nv, levels.shape[0]):
        levels[i] = 0
    if rated:
        return acc[cur, 0, best], acc[cur, 1, best], acc[cur, 2, best]
    # lam = 0: the rate never entered a decision; price the chosen path once, in scan order
    s0 = s0i.astype(np.int16).reshape(1, -1)
    s1 = s1i.astype(np.int16).reshape(1, -1)
    bits = zero
    st = 0
    nb_ = 0
    for i in range(nv):
        qid = st & 1
        k = _rd_coded(np.float32(levels[i]), qid)
        sig = 3 * (st & 7)
        bits = bits + np.float32(_rd_rate(s0, s1, 0, k, nb_, sig, n)) * inv
        _rd_advance(s0, s1, 0, sh0, sh1, k, nb_, sig, n)
        nb_ = _rd_class(k)
        st = nxt[st, k & 1]
    return bits, acc[cur, 1, best], acc[cur, 2, best]


@nb.njit(parallel=True, cache=True)
def rd_lanes(w, f, n_valid, scales, lams, s0, s1, sh0, sh1, n, nxt, pred, dq, levels):
    """rdquant.rd_batch on the CPU: w, f [B, S] float32, n_valid [B], scales [B, K] float32,
    lams [L] float32, s0, s1, sh0, sh1 [B, K, C] int32, nxt / pred [states, 2] int32 (the trellis,
    unused for URQ), levels [B, K, L, S] int32 (written; [B, K, L, 0] for none). Returns bits,
    weighted distortion, distortion [B, K, L] float32, as rdquant._lane computes them."""
    nb_, nk = scales.shape
    nl = lams.shape[0]
    out = np.zeros((3, nb_, nk, nl), np.float32)
    keep = levels.shape[3] > 0
    for lane in nb.prange(nb_ * nk * nl):
        b = lane // (nk * nl)
        k = (lane // nl) % nk
        li = lane % nl
        lv = levels[b, k, li] if keep else np.empty(w.shape[1], np.int32)
        if dq:
            res = _rd_dq_lane(w[b], f[b], n_valid[b], scales[b, k], lams[li], s0[b, k], s1[b, k], sh0[b, k],
                              sh1[b, k], n, nxt, pred, lv)
        else:
            res = _rd_urq_lane(w[b], f[b], n_valid[b], scales[b, k], lams[li], s0[b, k], s1[b, k], sh0[b, k],
                               sh1[b, k], n, lv)
        out[0, b, k, li] = res[0]
        out[1, b, k, li] = res[1]
        out[2, b, k, li] = res[2]
    return out
