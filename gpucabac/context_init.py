"""The choice of a tensor's context initialisation (docs/design.md §3): for every context the preset
(tables.PRESETS) whose start costs the fewest estimated bits over the tensor's slices.

An encoder decision, made once per tensor on the host for either engine; the decoder only reads
the chosen indices from the header, so streams never depend on how they were found.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from . import threads as _threads  # noqa: F401  (numba's fork-safe layer, before any parallel loop)
from .binarize import MAX_CONTEXTS, MAX_REGULAR_BINS, coded_symbol, dq_next_state, symbol_bins, used_contexts
from .modes import dq_states
from .slices import num_slices
from .tables import BIT_COST, CURVE, NUM_PRESETS, PRESET_STATES, PRESETS

# numba indexes global 2-D arrays far slower than 1-D ones, so the hot paths use flat copies.
_STATES = PRESET_STATES.ravel().copy()
_BIT_COST = BIT_COST.ravel().copy()

# ---------------------------------------------------------------------------------------------
# Context initialisation: the cost of every preset for every context, over all slices (docs/engine.md §2.5).
#
# Presets that share their shifts (adaptation rates) differ only in the starting state, and that
# difference fades within the first bins a context sees. So each context is followed from every
# preset for its first _TRANSIENT_BINS bins in a slice, and afterwards only from one preset per
# shift group, whose cost is charged to the whole group: 4 instead of 16 updates per bin, for an
# encoder decision that the decoder never depends on.
_TRANSIENT_BINS = 96
_shift_pairs = [tuple(r) for r in PRESETS[:, :2].tolist()]
_GROUP_LEADERS = np.array(sorted({_shift_pairs.index(sp) for sp in _shift_pairs}), np.int64)
_SHIFT_GROUP = np.array([list(_GROUP_LEADERS).index(_shift_pairs.index(sp)) for sp in _shift_pairs], np.int64)
_NUM_GROUPS = len(_GROUP_LEADERS)


@nb.njit(inline="always", cache=True)
def _cost_and_update(ps0, ps1, i, b, sh0, sh1):
    a0 = ps0[i]
    a1 = ps1[i]
    sigma = 2 * b - 1
    ps0[i] = a0 + sigma * (CURVE[16 + ((sigma * a0) >> 3)] >> sh0)
    ps1[i] = a1 + sigma * (CURVE[16 + ((sigma * a1) >> 7)] >> sh1)
    return _BIT_COST[2 * (512 + ((a1 + 16 * a0) >> 3)) + b]


@nb.njit(cache=True)
def _preset_costs_slice(levels, start, end, dq, num_gt_flags, cost, group_cost, runs):
    """Adds to cost[c*NUM_PRESETS + p] (and, past the transient, to group_cost[c*_NUM_GROUPS + g])
    the estimated bits (2^15 units) of the slice's bins at context c starting from preset p."""
    ps0 = np.empty(MAX_CONTEXTS * NUM_PRESETS, np.int32)
    ps1 = np.empty(MAX_CONTEXTS * NUM_PRESETS, np.int32)
    psh0 = np.empty(NUM_PRESETS, np.int32)
    psh1 = np.empty(NUM_PRESETS, np.int32)
    for p in range(NUM_PRESETS):
        psh0[p] = _STATES[4 * p + 2]
        psh1[p] = _STATES[4 * p + 3]
        for c in range(MAX_CONTEXTS):
            ps0[c * NUM_PRESETS + p] = _STATES[4 * p]
            ps1[c * NUM_PRESETS + p] = _STATES[4 * p + 1]
    seen = np.zeros(MAX_CONTEXTS, np.int32)
    ctx = np.empty(MAX_REGULAR_BINS, np.int32)
    bins = np.empty(MAX_REGULAR_BINS, np.int32)
    prev = 0
    state = 0
    run = 0
    # the bins in the coder's order (engines/cpu.py encode_slice)
    for i in range(start, end + 1):
        q, code_run, code_level, run = coded_symbol(levels, i, end, dq, state, runs, run)
        if i == end and not code_run:
            break
        for part in range(2 if code_run or code_level else 0):  # a zero inside a run has no bins
            first, nreg, _, _ = symbol_bins(part, code_run, code_level, run, q, prev, state, num_gt_flags, runs, ctx, bins)
            for j in range(first, nreg):
                c = ctx[j]
                b = bins[j]
                k = c * NUM_PRESETS
                if seen[c] < _TRANSIENT_BINS:
                    seen[c] += 1
                    for p in range(NUM_PRESETS):
                        cost[k + p] += _cost_and_update(ps0, ps1, k + p, b, psh0[p], psh1[p])
                else:
                    for g in range(_NUM_GROUPS):
                        p = _GROUP_LEADERS[g]
                        group_cost[c * _NUM_GROUPS + g] += _cost_and_update(ps0, ps1, k + p, b, psh0[p], psh1[p])
        if code_run:
            run = 0
        prev = q
        if dq and i < end:
            state = dq_next_state(dq, state, q)


# Levels over which the context initialisation is measured (evenly spaced slices); the choice
# costs about 9 coder passes over them, so sampling keeps encoding fast on large tensors.
CTX_INIT_SAMPLE = 1 << 18


@nb.njit(cache=True)
def _preset_costs_group(levels, slice_size, dq, num_gt_flags, first, stride, runs, cost, group_cost):
    """Adds slices first, first + stride, … to cost and group_cost (_preset_costs_slice)."""
    n = levels.shape[0]
    for s in range(first, (n + slice_size - 1) // slice_size, stride):
        start = s * slice_size
        _preset_costs_slice(levels, start, min(n, start + slice_size), dq, num_gt_flags, cost, group_cost, runs)


@nb.njit(parallel=True, cache=True)  # only its loop: see slices.py on parallel drivers
def _preset_costs_parallel(levels, slice_size, dq, num_gt_flags, every, runs, partial, partial_group):
    ngroups = partial.shape[0]
    for g in nb.prange(ngroups):
        _preset_costs_group(levels, slice_size, dq, num_gt_flags, g * every, ngroups * every, runs, partial[g],
                            partial_group[g])


def preset_costs(levels, slice_size, dq, num_gt_flags, ngroups, every, runs=False):
    """cost[c, p] summed over every `every`-th slice, in `ngroups` parallel groups of slices (one
    group: in this thread, free of a parallel launch, which would cost more than a small tensor's
    whole measurement)."""
    partial = np.zeros((ngroups, MAX_CONTEXTS * NUM_PRESETS), np.int64)
    partial_group = np.zeros((ngroups, MAX_CONTEXTS * _NUM_GROUPS), np.int64)
    if ngroups == 1:
        _preset_costs_group(levels, int(slice_size), int(dq), int(num_gt_flags), 0, int(every), bool(runs), partial[0],
                            partial_group[0])
    else:
        _preset_costs_parallel(levels, int(slice_size), int(dq), int(num_gt_flags), int(every), bool(runs), partial,
                               partial_group)
    cost = partial.sum(axis=0).reshape((MAX_CONTEXTS, NUM_PRESETS))
    group = partial_group.sum(axis=0).reshape((MAX_CONTEXTS, _NUM_GROUPS))
    return cost + group[:, _SHIFT_GROUP]


def choose_context_init(levels: np.ndarray, slice_size: int, dq: bool | int, num_gt_flags: int,
                        sample: int | None = CTX_INIT_SAMPLE, runs: bool = False) -> np.ndarray:
    """Per used context, the preset (tables.PRESETS) with the least estimated cost (docs/engine.md §2.8 bit
    costs) summed over the tensor's slices: all of them (sample None), or evenly spaced slices
    holding about `sample` levels. Contexts restart at every slice, so a spread of slices
    measures the start-up cost the whole tensor pays. A slice is always measured whole: a prefix
    can mislead (the first rows of an embedding table are often untrained tokens). `levels` must
    be valid (slices.check_levels)."""
    dq = dq_states(dq)  # a bool would index the trellis tables wrongly
    nslices = num_slices(levels.size, slice_size)
    every = 1 if sample is None else max(1, (nslices * slice_size) // max(sample, slice_size))
    ngroups = max(1, min(4 * nb.get_num_threads(), -(-nslices // every)))
    cost = preset_costs(levels, slice_size, dq, num_gt_flags, ngroups, every, bool(runs))
    used = used_contexts(num_gt_flags, dq, runs)
    return np.argmin(cost[used], axis=1).astype(np.uint8)
