"""What every engine shares about slices (docs/design.md §1): where they lie, which levels can be
coded, how large a coded slice can get, their checksums, and what a slice decoder reports.

The engines sit above this module and never below it: the CPU engine runs `slice_bounds` to size
its scratch space, the GPU engine runs the same rule as a kernel (kernels/jobs.cuh), and the codec
checks levels with `check_levels` before it chooses a context initialisation for them.
"""

from __future__ import annotations

import zlib

import numba as nb
import numpy as np

from . import threads as _threads  # noqa: F401  (numba's fork-safe layer, before any parallel loop)
from .binarize import dq_coded_level, dq_next_state
from .errors import FormatError, InputError
from .layout import num_slices as num_slices, slice_counts as slice_counts, slice_offsets as slice_offsets
from .tables import CRC32, MAX_ABS_LEVEL

# Error codes of a slice decoder, one per slice (0: decoded, and ended exactly at its last byte).
DECODE_OK = 0
DECODE_OVERRUN = 1  # the arithmetic decoder needed bytes past the slice's end
DECODE_BAD_LEVEL = 2  # an Exp-Golomb prefix longer than any valid level allows
DECODE_BAD_END = 3  # missing terminate bin or stop pattern, or unused bytes at the end
DECODE_CRC = 4  # the slice's bytes do not match its CRC-32 (it was not decoded)
DECODE_BAD_RUN = 5  # a zero run longer than what is left of the slice
DECODE_ERROR_MESSAGES = {
    DECODE_BAD_RUN: "a run of zeros passes the slice's end",
    DECODE_OVERRUN: "the arithmetic decoder ran past the slice's end",
    DECODE_BAD_LEVEL: "an Exp-Golomb prefix is longer than any valid level",
    DECODE_BAD_END: "the slice does not end with the terminate bin and stop pattern",
}


def raise_slice_errors(name: str, errors: np.ndarray) -> None:
    """FormatError for the first bad slice of one tensor's error codes (a checksum mismatch first,
    as a decoder must not trust a slice whose bytes are corrupt); nothing when all are DECODE_OK."""
    errors = np.asarray(errors)
    bad_crc = np.flatnonzero(errors == DECODE_CRC)
    if bad_crc.size:
        raise FormatError(f"tensor {name!r}: checksum mismatch in slice {int(bad_crc[0])} of {errors.size} ({bad_crc.size} corrupt)")
    bad = np.flatnonzero(errors)
    if bad.size:
        s = int(bad[0])
        raise FormatError(f"tensor {name!r}, slice {s}: {DECODE_ERROR_MESSAGES.get(int(errors[s]), 'decoding failed')}")


# ---------------------------------------------------------------------------------------------
# Level validity and the byte bound of a coded slice


@nb.njit(inline="always", cache=True)
def _level_bound_bits(q, num_gt_flags):
    """Upper bound on the coded bits of one level: 7 per regular bin (an LPS of the smallest
    sub-range, 2, renormalises 7 times), 1 per bypass bin."""
    a = q if q >= 0 else -q
    if a == 0:
        return 7
    if a <= num_gt_flags:
        return 7 * (2 + a)
    rem = a - (num_gt_flags + 1)
    m = 0
    base = 0
    while rem >= base + (1 << m):
        base += 1 << m
        m += 1
    return 7 * (2 + num_gt_flags + m + 1) + m


@nb.njit(inline="always", cache=True)
def _run_bound_bits(r):
    """Upper bound on the coded bits of a run of r zeros: m + 1 regular prefix bins, m bypass bins."""
    m = 0
    base = 0
    while r >= base + (1 << m):
        base += 1 << m
        m += 1
    return 7 * (m + 1) + m


@nb.njit(cache=True)
def _slice_bound(levels, start, end, dq, num_gt_flags, runs):
    """(the byte bound of levels[start:end] coded as one slice, the index of its first invalid level or -1)."""
    bits = 0
    state = 0
    run = 0
    for i in range(start, end):
        q = levels[i]
        if dq:
            q = dq_coded_level(q, state)
        if q > MAX_ABS_LEVEL or q < -MAX_ABS_LEVEL:
            return 0, i
        if not runs:
            bits += _level_bound_bits(q, num_gt_flags)
        elif q == 0:
            run += 1
        else:
            bits += _run_bound_bits(run) + _level_bound_bits(q, num_gt_flags) - 7
            run = 0
        if dq:
            state = dq_next_state(dq, state, q)
    if run:
        bits += _run_bound_bits(run)
    # terminate (7 bits), flush and stop bit: at most 5 more bytes with pending 0xFF runs
    return (bits + 7) // 8 + 8, -1


# The parallel drivers in this package hold nothing but their loop over slices: numba makes
# every array expression of a parallel function a parallel region of its own, each launch
# costing 0.05-0.2 ms on the workqueue layer. Their callers run a single slice in their own
# thread, without a launch: a small tensor is one slice, and so is every tensor of an FL update.
@nb.njit(parallel=True, cache=True)
def _slice_bounds_parallel(levels, slice_size, dq, num_gt_flags, runs, bound, bad):
    n = levels.shape[0]
    for s in nb.prange(bound.shape[0]):
        start = s * slice_size
        bound[s], bad[s] = _slice_bound(levels, start, min(n, start + slice_size), dq, num_gt_flags, runs)


def slice_bounds(levels, slice_size, dq, num_gt_flags, runs=False):
    """Per slice: an upper bound on its coded bytes, and the index of the first invalid level
    (|level| too large, or under DQ not on the current state's quantizer), or -1. With `runs`
    the zeros cost their runs' bits and a non-zero level none for its (absent) sig bin."""
    n = levels.shape[0]
    nslices = (n + slice_size - 1) // slice_size
    if nslices == 1:
        b, i = _slice_bound(levels, 0, n, int(dq), int(num_gt_flags), bool(runs))
        return np.array([b], np.int64), np.array([i], np.int64)
    bound = np.empty(nslices, np.int64)
    bad = np.empty(nslices, np.int64)
    _slice_bounds_parallel(levels, int(slice_size), int(dq), int(num_gt_flags), bool(runs), bound, bad)
    return bound, bad


def bad_level_error(levels: np.ndarray, i: int, dq: int) -> InputError:
    """The InputError for the invalid level at position i (both engines raise this one)."""
    q = int(levels[i])
    what = "is not on the dependent quantizer of its state" if dq and abs(q) <= MAX_ABS_LEVEL else f"exceeds the largest codable level {MAX_ABS_LEVEL}"
    return InputError(f"level {q} at position {i} {what}")


def check_levels(levels: np.ndarray, slice_size: int, dq: int, num_gt_flags: int, runs: bool = False) -> np.ndarray:
    """The byte bound of every slice of int32 `levels` (coded with zero runs or not); InputError
    naming the first level that cannot be coded."""
    bound, bad = slice_bounds(levels, slice_size, dq, num_gt_flags, bool(runs))
    if (bad >= 0).any():
        raise bad_level_error(levels, int(bad[bad >= 0][0]), dq)
    return bound


# ---------------------------------------------------------------------------------------------
# Checksums


@nb.njit(parallel=True, cache=True)
def _slice_crcs(data, offsets, lengths, out):
    for s in nb.prange(lengths.shape[0]):
        c = np.uint32(0xFFFFFFFF)
        o = offsets[s]
        for j in range(lengths[s]):
            c = CRC32[(c ^ data[o + j]) & 0xFF] ^ (c >> np.uint32(8))
        out[s] = c ^ np.uint32(0xFFFFFFFF)


def slice_crcs(data: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """CRC-32 (zlib's polynomial) of every slice data[offsets[s]:offsets[s]+lengths[s]]."""
    if np.shape(lengths)[0] == 1:  # zlib's, without a parallel launch
        o, n = int(offsets[0]), int(lengths[0])
        return np.array([zlib.crc32(memoryview(np.ascontiguousarray(data[o : o + n])))], np.uint32)
    out = np.empty(np.shape(lengths)[0], np.uint32)
    _slice_crcs(data, np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), out)
    return out
