"""Binarization of integer levels and context selection (docs/engine.md §1.1, §1.3; docs/format.md §4.2).

A level q (under dependent quantization the coded level k, §3.5) becomes:
  sig, sign (both context coded), up to N greater-than flags, then an order-0 Exp-Golomb remainder
  of |q| - (N+1) with context-coded prefix bins and bypass suffix bins.
With zero runs (docs/format.md §4.2) the sig bins go: a run of r zeros becomes an order-0
Exp-Golomb code of r (context-coded prefix, bypass suffix), and a non-zero level the bins above
after its sig bin.

The context layout (which context index each bin uses) is gpucabac/layout.py's.

`dq` below is the trellis size: 0 without dependent quantization, else 8, 16, ..., 256.

Functions here are numba-compiled and called by the CPU engine; the CUDA kernels implement the
same rules and are tested against them.
"""

from __future__ import annotations

import numba as nb

# the context layout, re-exported for the engines and the tests
from .layout import GT as GT, MAX_CONTEXTS as MAX_CONTEXTS, MAX_REGULAR_BINS as MAX_REGULAR_BINS, SIG as SIG, SIGN as SIGN
from .layout import RUN as RUN, RUN_CONTEXTS as RUN_CONTEXTS, RUN_PREFIX_BINS as RUN_PREFIX_BINS
from .layout import full_context_init as full_context_init, num_contexts as num_contexts, used_contexts as used_contexts
from .modes import dq_states as dq_states  # re-exported: the engines' `dq` argument
from .tables import DQ_NEXT_ALL, MAX_ABS_LEVEL

_DQ_NEXT = DQ_NEXT_ALL.copy()


@nb.njit(inline="always", cache=True)
def neighbour_class(prev: int) -> int:
    return 0 if prev == 0 else (1 if prev < 0 else 2)


@nb.njit(inline="always", cache=True)
def dq_coded_level(r: int, state: int) -> int:
    """Reconstruction index r -> coded level k in `state` (§3.5); returns a value with
    |k| > MAX_ABS_LEVEL when r is not on the state's quantizer (caller rejects it)."""
    if r == 0:
        return 0
    qid = state & 1
    t = r + qid if r > 0 else r - qid
    if t & 1:
        return MAX_ABS_LEVEL + 1
    return t >> 1


@nb.njit(inline="always", cache=True)
def dq_reconstruction_index(k: int, state: int) -> int:
    if k == 0:
        return 0
    qid = state & 1
    return 2 * k - qid if k > 0 else 2 * k + qid


@nb.njit(inline="always", cache=True)
def dq_next_state(dq: int, state: int, k: int) -> int:
    """Next state in the trellis of size dq (tables.DQ_NEXT_ALL, table at 2 * dq - 16)."""
    return _DQ_NEXT[2 * dq - 16 + 2 * state + (k & 1)]


@nb.njit(inline="always", cache=True)
def binarize_level(q, prev, dq_state, num_gt_flags, ctx_out, bin_out):
    """Regular bins of level q as (context, value) pairs into ctx_out/bin_out.

    Returns (number of regular bins, bypass suffix value, number of suffix bins). The bypass
    suffix follows the regular bins (§1.1); |q| must be <= MAX_ABS_LEVEL.
    """
    nbc = neighbour_class(prev)
    ctx_out[0] = SIG + 3 * (dq_state & 7) + nbc
    if q == 0:
        bin_out[0] = 0
        return 1, 0, 0
    bin_out[0] = 1
    ctx_out[1] = SIGN + nbc
    bin_out[1] = 1 if q < 0 else 0
    n = 2
    a = q if q > 0 else -q
    neg = 1 if q < 0 else 0
    for j in range(1, num_gt_flags + 1):
        ctx_out[n] = GT + 2 * (j - 1) + neg
        g = 1 if a > j else 0
        bin_out[n] = g
        n += 1
        if g == 0:
            return n, 0, 0
    # Order-0 Exp-Golomb remainder: m ones then a zero (contexts by position), m suffix bits.
    rem = a - (num_gt_flags + 1)
    eg = GT + 2 * num_gt_flags
    base = 0
    m = 0
    while rem >= base + (1 << m):
        ctx_out[n] = eg + m
        bin_out[n] = 1
        n += 1
        base += 1 << m
        m += 1
    ctx_out[n] = eg + m
    bin_out[n] = 0
    n += 1
    return n, rem - base, m


@nb.njit(inline="always", cache=True)
def run_context(j: int) -> int:
    """Context of prefix bin j of a zero run: the first 23 bins their own, the rare rest one shared."""
    return RUN + (j if j < RUN_CONTEXTS - 1 else RUN_CONTEXTS - 1)


@nb.njit(inline="always", cache=True)
def binarize_run(r, ctx_out, bin_out):
    """Regular bins of a run of r >= 0 zeros (order-0 Exp-Golomb: m ones then a zero) into
    ctx_out/bin_out; returns (number of regular bins, bypass suffix value, number of suffix bins)."""
    n = 0
    base = 0
    m = 0
    while r >= base + (1 << m):
        ctx_out[n] = run_context(m)
        bin_out[n] = 1
        n += 1
        base += 1 << m
        m += 1
    ctx_out[n] = run_context(m)
    bin_out[n] = 0
    n += 1
    return n, r - base, m


@nb.njit(inline="always", cache=True)
def coded_symbol(levels, i, end, dq, state, runs, run):
    """What the coder writes at position i of a slice that ends at `end` (docs/format.md §4.2), the
    walk every coder and rate model takes, from i = start to i = end inclusive: one step past the
    last level is where a slice ending in zeros codes its final run. `run` counts the zeros since
    the last coded run. Returns (q, code_run, code_level, run): the coded level (0 past the end),
    whether the run before it is coded, whether q itself is, and the count with q's zero added
    (the caller restarts it after coding the run). The walk stops where i == end and not code_run."""
    last = i == end
    q = 0
    if not last:
        q = levels[i]
        if dq:
            q = dq_coded_level(q, state)
    code_run = runs and (q != 0 or (last and run > 0))
    code_level = not last and not (runs and q == 0)
    if runs and q == 0 and not last:
        run += 1
    return q, code_run, code_level, run


@nb.njit(inline="always", cache=True)
def symbol_bins(part, code_run, code_level, run, q, prev, state, num_gt_flags, runs, ctx_out, bin_out):
    """The bins of one part of a coded position, in the coder's order: part 0 the run of zeros
    before it, part 1 the level (under runs without its sig bin, which the run already says).
    Returns (first regular bin, number of regular bins, bypass suffix value, number of suffix
    bins); no bins where coded_symbol says the part is not coded."""
    if part == 0:
        if not code_run:
            return 0, 0, 0, 0
        nreg, suffix, nsuffix = binarize_run(run, ctx_out, bin_out)
        return 0, nreg, suffix, nsuffix
    if not code_level:
        return 0, 0, 0, 0
    nreg, suffix, nsuffix = binarize_level(q, prev, state, num_gt_flags, ctx_out, bin_out)
    return (1 if runs else 0), nreg, suffix, nsuffix
