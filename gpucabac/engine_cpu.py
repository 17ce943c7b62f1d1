"""CPU reference engine: the DeepCABAC/NNC probability model and arithmetic coder (methods_spec
§2.2-2.7), applied slice by slice (DESIGN §1), compiled with numba and parallel over slices.

Everything here is integer arithmetic; the decoder holds no floating-point state.

Engine contract (shared with the GPU engine):
  encode_slices(levels, slice_size, dq, num_gt_flags, init, ...) -> (payload uint8, lengths uint32)
  decode_slices(payload, lengths, count, slice_size, dq, num_gt_flags, init) -> levels int32
where `levels` are reconstruction indices in scan order, `init[c]` is the preset index
(tables.PRESETS) each context starts from at every slice start, and `dq` is the DQ trellis size
(0: off; binarize.dq_states normalises a bool; the compiled functions index tables with it).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .binarize import (
    MAX_CONTEXTS,
    MAX_REGULAR_BINS,
    binarize_level,
    dq_coded_level,
    dq_next_state,
    dq_states,
    dq_reconstruction_index,
    neighbour_class,
    SIG,
    SIGN,
    GT,
    used_contexts,
)
from .tables import BIT_COST, CURVE, EG_PREFIX_BINS, MAX_ABS_LEVEL, NUM_PRESETS, PRESETS, RLPS

# Shifts that bring a sub-range back to [256, 511]: 9 - bit_length(x), i.e. clz32(x) - 23.
_RENORM = np.array([0] + [9 - int(x).bit_length() for x in range(1, 512)], dtype=np.int32)
# numba indexes global 2-D arrays far slower than 1-D ones, so the hot paths use flat copies.
_RLPS = RLPS.ravel().copy()
_PRESETS = PRESETS.ravel().copy()
_BIT_COST = BIT_COST.ravel().copy()

# Error codes of the slice decoder (checked by the caller, which raises FormatError).
DECODE_OK = 0
DECODE_OVERRUN = 1  # the arithmetic decoder needed bytes past the slice's end
DECODE_BAD_LEVEL = 2  # an Exp-Golomb prefix longer than any valid level allows
DECODE_BAD_END = 3  # missing terminate bin or stop pattern, or unused bytes at the end
DECODE_ERROR_MESSAGES = {
    DECODE_OVERRUN: "the arithmetic decoder ran past the slice's end",
    DECODE_BAD_LEVEL: "an Exp-Golomb prefix is longer than any valid level",
    DECODE_BAD_END: "the slice does not end with the terminate bin and stop pattern",
}

# ---------------------------------------------------------------------------------------------
# Probability model: per context (S0, S1, sh0, sh1); P = S1 + 16*S0 (§2.2).


@nb.njit(inline="always", cache=True)
def _init_contexts(init, s0, s1, sh0, sh1):
    for c in range(init.shape[0]):
        pre = init[c]
        sh0[c] = _PRESETS[4 * pre] + 4
        sh1[c] = _PRESETS[4 * pre + 1]
        s0[c] = _PRESETS[4 * pre + 3]
        s1[c] = _PRESETS[4 * pre + 2] - 16 * _PRESETS[4 * pre + 3]


@nb.njit(inline="always", cache=True)
def _update(c, b, s0, s1, sh0, sh1):
    # sigma = +1 for a 1, -1 for a 0; written without branches (bins are unpredictable).
    sigma = 2 * b - 1
    a0 = s0[c]
    a1 = s1[c]
    s0[c] = a0 + sigma * (CURVE[16 + ((sigma * a0) >> 3)] >> sh0[c])
    s1[c] = a1 + sigma * (CURVE[16 + ((sigma * a1) >> 7)] >> sh1[c])


# ---------------------------------------------------------------------------------------------
# The coder registers are scalars passed through and returned by the inlined helpers, so that
# numba keeps them in machine registers.


@nb.njit(inline="always", cache=True)
def _write_out(low, bits_left, buffered, nbuf, out, pos):
    """Move the top byte of `low` out, buffering 0xFF runs until a carry is resolved (§2.6)."""
    lead = low >> (24 - bits_left)
    bits_left += 8
    low &= 0xFFFFFFFF >> bits_left
    if lead == 0xFF:
        nbuf += 1
    elif nbuf > 0:
        carry = lead >> 8
        out[pos] = (buffered + carry) & 0xFF
        pos += 1
        buffered = lead & 0xFF
        fill = (0xFF + carry) & 0xFF
        while nbuf > 1:
            out[pos] = fill
            pos += 1
            nbuf -= 1
    else:
        nbuf = 1
        buffered = lead
    return low, bits_left, buffered, nbuf, pos


@nb.njit(cache=True)
def encode_slice(levels, start, end, dq, num_gt_flags, init, out, out_start):
    """Code levels[start:end] as one flushed slice into out[out_start:]; returns bytes written."""
    s0 = np.empty(MAX_CONTEXTS, np.int32)
    s1 = np.empty(MAX_CONTEXTS, np.int32)
    sh0 = np.empty(MAX_CONTEXTS, np.int32)
    sh1 = np.empty(MAX_CONTEXTS, np.int32)
    _init_contexts(init, s0, s1, sh0, sh1)
    ctx = np.empty(MAX_REGULAR_BINS, np.int32)
    bins = np.empty(MAX_REGULAR_BINS, np.int32)
    low = np.int64(0)
    rng = np.int64(510)
    bits_left = np.int64(23)
    buffered = np.int64(0)
    nbuf = np.int64(0)
    pos = np.int64(out_start)
    prev = 0
    state = 0
    for i in range(start, end):
        q = levels[i]
        if dq:
            q = dq_coded_level(q, state)
        nreg, suffix, nsuffix = binarize_level(q, prev, state, num_gt_flags, ctx, bins)
        for j in range(nreg):
            # One regular bin (§2.6), written out here: numba compiles this loop several
            # times faster than the same code behind a helper that returns the registers.
            c = ctx[j]
            b = bins[j]
            p = s1[c] + 16 * s0[c]
            pc = p >> 7
            rlps = _RLPS[(rng & 0xE0) + (pc if pc >= 0 else -pc)]
            rmps = rng - rlps
            lps = b != (1 if p >= 0 else 0)
            low += rmps if lps else 0
            rng = rlps if lps else rmps
            n = _RENORM[rng]  # 0 or 1 after an MPS, 1..7 after an LPS
            low <<= n
            rng <<= n
            bits_left -= n
            if bits_left < 12:
                low, bits_left, buffered, nbuf, pos = _write_out(low, bits_left, buffered, nbuf, out, pos)
            _update(c, b, s0, s1, sh0, sh1)
        for k in range(nsuffix - 1, -1, -1):  # bypass bins, MSB first
            low = (low << 1) + ((suffix >> k) & 1) * rng
            bits_left -= 1
            if bits_left < 12:
                low, bits_left, buffered, nbuf, pos = _write_out(low, bits_left, buffered, nbuf, out, pos)
        prev = q
        if dq:
            state = dq_next_state(dq, state, q)
    # Terminate bin 1, flush, stop bit and byte alignment (§2.6).
    low = (low + rng - 2) << 7
    bits_left -= 7
    if bits_left < 12:
        low, bits_left, buffered, nbuf, pos = _write_out(low, bits_left, buffered, nbuf, out, pos)
    if low >> (32 - bits_left):
        out[pos] = (buffered + 1) & 0xFF
        pos += 1
        while nbuf > 1:
            out[pos] = 0
            pos += 1
            nbuf -= 1
        low -= np.int64(1) << (32 - bits_left)
    else:
        if nbuf > 0:
            out[pos] = buffered
            pos += 1
        while nbuf > 1:
            out[pos] = 0xFF
            pos += 1
            nbuf -= 1
    # The remaining 24 - bits_left bits of low >> 8, a 1 stop bit, zeros up to a byte boundary.
    nbits = 24 - bits_left + 1
    value = ((low >> 8) << 1) | 1
    pad = (8 - nbits % 8) % 8
    value <<= pad
    nbits += pad
    while nbits > 0:
        nbits -= 8
        out[pos] = (value >> nbits) & 0xFF
        pos += 1
    return pos - out_start


# ---------------------------------------------------------------------------------------------
# Decoder: registers range, value, bits_needed, read position and an overrun flag, as scalars.


@nb.njit(inline="always", cache=True)
def _read_byte(data, pos, end, overrun):
    if pos < end:
        return np.int64(data[pos]), pos + 1, overrun
    return np.int64(0), pos + 1, True


_PHASE_SIG, _PHASE_SIGN, _PHASE_GT, _PHASE_EG = 0, 1, 2, 3


@nb.njit(cache=True)
def decode_slice(data, start, end, count, dq, num_gt_flags, init, out, out_start):
    """Decode `count` levels from the slice data[start:end] into out[out_start:]; returns an
    error code (DECODE_OK when the slice decoded and ended exactly at its last byte).

    The binarization of §1.1 is walked as a small state machine (phase = which bin comes next)
    so that the regular-bin decoder stands once in the loop.
    """
    s0 = np.empty(MAX_CONTEXTS, np.int32)
    s1 = np.empty(MAX_CONTEXTS, np.int32)
    sh0 = np.empty(MAX_CONTEXTS, np.int32)
    sh1 = np.empty(MAX_CONTEXTS, np.int32)
    _init_contexts(init, s0, s1, sh0, sh1)
    overrun = False
    pos = np.int64(start)
    b0, pos, overrun = _read_byte(data, pos, end, overrun)
    b1, pos, overrun = _read_byte(data, pos, end, overrun)
    value = (b0 << 8) | b1
    rng = np.int64(510)
    if value >= (rng << 7):  # no valid slice starts at or above its initial range
        return DECODE_BAD_END
    bits = np.int64(-8)
    eg = GT + 2 * num_gt_flags
    i = 0
    nbc = 0  # neighbour class of the previous level
    state = 0  # DQ state
    phase = _PHASE_SIG
    neg = 0
    a = 0
    m = 0
    base = 0
    while i < count:
        if phase == _PHASE_SIG:
            c = SIG + 3 * (state & 7) + nbc
        elif phase == _PHASE_SIGN:
            c = SIGN + nbc
        elif phase == _PHASE_GT:
            c = GT + 2 * (a - 1) + neg
        else:
            c = eg + m
        # One regular bin (§2.7).
        p = s1[c] + 16 * s0[c]
        pc = p >> 7
        rlps = _RLPS[(rng & 0xE0) + (pc if pc >= 0 else -pc)]
        rmps = rng - rlps
        scaled = rmps << 7
        lps = value >= scaled
        b = (1 if p >= 0 else 0) ^ (1 if lps else 0)
        value -= scaled if lps else 0
        rng = rlps if lps else rmps
        n = _RENORM[rng]
        rng <<= n
        value <<= n
        bits += n
        if bits >= 0:
            byte, pos, overrun = _read_byte(data, pos, end, overrun)
            value += byte << bits
            bits -= 8
        _update(c, b, s0, s1, sh0, sh1)
        # Next bin, or the level is complete.
        q = 0
        done = False
        if phase == _PHASE_SIG:
            if b:
                phase = _PHASE_SIGN
            else:
                done = True
        elif phase == _PHASE_SIGN:
            neg = b
            a = 1
            if num_gt_flags > 0:
                phase = _PHASE_GT
            else:
                phase = _PHASE_EG
                m = 0
                base = 0
        elif phase == _PHASE_GT:
            if not b:
                q = -a if neg else a
                done = True
            elif a == num_gt_flags:
                phase = _PHASE_EG
                m = 0
                base = 0
            else:
                a += 1
        elif b:
            base += 1 << m
            m += 1
            if m >= EG_PREFIX_BINS:
                return DECODE_BAD_LEVEL
        else:
            suffix = 0
            for _ in range(m):  # bypass bins, MSB first
                value <<= 1
                bits += 1
                if bits >= 0:
                    byte, pos, overrun = _read_byte(data, pos, end, overrun)
                    value += byte
                    bits = -8
                scaled = rng << 7
                suffix <<= 1
                if value >= scaled:
                    value -= scaled
                    suffix |= 1
            a = base + suffix + num_gt_flags + 1
            if a > MAX_ABS_LEVEL:
                return DECODE_BAD_LEVEL
            q = -a if neg else a
            done = True
        if done:
            if overrun:
                return DECODE_OVERRUN
            if dq:
                out[out_start + i] = dq_reconstruction_index(q, state)
                state = dq_next_state(dq, state, q)
            else:
                out[out_start + i] = q
            nbc = neighbour_class(q)
            i += 1
            phase = _PHASE_SIG
    # Terminate bin: must decode as 1, the slice must end exactly here, with the stop pattern.
    if overrun or value < ((rng - 2) << 7) or pos != end:
        return DECODE_BAD_END
    if ((np.int64(data[end - 1]) << (8 + bits)) & 0xFF) != 0x80:
        return DECODE_BAD_END
    return DECODE_OK


# ---------------------------------------------------------------------------------------------
# Parallel drivers.


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


@nb.njit(parallel=True, cache=True)
def slice_bounds(levels, slice_size, dq, num_gt_flags):
    """Per slice: an upper bound on its coded bytes, and the index of the first invalid level
    (|level| too large, or under DQ not on the current state's quantizer), or -1."""
    n = levels.shape[0]
    nslices = (n + slice_size - 1) // slice_size
    bound = np.empty(nslices, np.int64)
    bad = np.full(nslices, -1, np.int64)
    for s in nb.prange(nslices):
        start = s * slice_size
        end = min(n, start + slice_size)
        bits = 0
        state = 0
        for i in range(start, end):
            q = levels[i]
            if dq:
                q = dq_coded_level(q, state)
            if q > MAX_ABS_LEVEL or q < -MAX_ABS_LEVEL:
                bad[s] = i
                break
            bits += _level_bound_bits(q, num_gt_flags)
            if dq:
                state = dq_next_state(dq, state, q)
        # terminate (7 bits), flush and stop bit: at most 5 more bytes with pending 0xFF runs
        bound[s] = (bits + 7) // 8 + 8
    return bound, bad


@nb.njit(parallel=True, cache=True)
def encode_slices_into(levels, slice_size, first_slice, nslices, dq, num_gt_flags, init, scratch, offsets, lengths):
    """Encode slices first_slice .. first_slice+nslices-1, slice i into scratch[offsets[i]:]."""
    n = levels.shape[0]
    for i in nb.prange(nslices):
        s = first_slice + i
        start = s * slice_size
        end = min(n, start + slice_size)
        lengths[i] = encode_slice(levels, start, end, dq, num_gt_flags, init, scratch, offsets[i])


@nb.njit(parallel=True, cache=True)
def gather_slices(scratch, offsets, lengths, out, out_offsets):
    for i in nb.prange(lengths.shape[0]):
        o = offsets[i]
        d = out_offsets[i]
        for j in range(lengths[i]):
            out[d + j] = scratch[o + j]


@nb.njit(parallel=True, cache=True)
def decode_slices_into(data, slice_offsets, slice_lengths, first_slice, nslices, count, slice_size, dq, num_gt_flags, init, out, errors):
    """Decode slices first_slice.. of one tensor; slice s starts at data[slice_offsets[s]]."""
    for i in nb.prange(nslices):
        s = first_slice + i
        start = s * slice_size
        n = min(count, start + slice_size) - start
        o = slice_offsets[s]
        errors[s] = decode_slice(data, o, o + slice_lengths[s], n, dq, num_gt_flags, init, out, start)


# ---------------------------------------------------------------------------------------------
# Context initialisation: the cost of every preset for every context, over all slices (§2.5).
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
def _preset_costs_slice(levels, start, end, dq, num_gt_flags, cost, group_cost):
    """Adds to cost[c*NUM_PRESETS + p] (and, past the transient, to group_cost[c*_NUM_GROUPS + g])
    the estimated bits (2^15 units) of the slice's bins at context c starting from preset p."""
    ps0 = np.empty(MAX_CONTEXTS * NUM_PRESETS, np.int32)
    ps1 = np.empty(MAX_CONTEXTS * NUM_PRESETS, np.int32)
    psh0 = np.empty(NUM_PRESETS, np.int32)
    psh1 = np.empty(NUM_PRESETS, np.int32)
    for p in range(NUM_PRESETS):
        psh0[p] = _PRESETS[4 * p] + 4
        psh1[p] = _PRESETS[4 * p + 1]
        for c in range(MAX_CONTEXTS):
            ps0[c * NUM_PRESETS + p] = _PRESETS[4 * p + 3]
            ps1[c * NUM_PRESETS + p] = _PRESETS[4 * p + 2] - 16 * _PRESETS[4 * p + 3]
    seen = np.zeros(MAX_CONTEXTS, np.int32)
    ctx = np.empty(MAX_REGULAR_BINS, np.int32)
    bins = np.empty(MAX_REGULAR_BINS, np.int32)
    prev = 0
    state = 0
    for i in range(start, end):
        q = levels[i]
        if dq:
            q = dq_coded_level(q, state)
        nreg, _, _ = binarize_level(q, prev, state, num_gt_flags, ctx, bins)
        for j in range(nreg):
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
        prev = q
        if dq:
            state = dq_next_state(dq, state, q)


# Levels over which the context initialisation is measured (evenly spaced slices); the choice
# costs about 9 coder passes over them, so sampling keeps encoding fast on large tensors.
CTX_INIT_SAMPLE = 1 << 18


@nb.njit(parallel=True, cache=True)
def preset_costs(levels, slice_size, dq, num_gt_flags, ngroups, every):
    """cost[c, p] summed over every `every`-th slice, in `ngroups` parallel groups of slices."""
    n = levels.shape[0]
    nslices = (n + slice_size - 1) // slice_size
    partial = np.zeros((ngroups, MAX_CONTEXTS * NUM_PRESETS), np.int64)
    partial_group = np.zeros((ngroups, MAX_CONTEXTS * _NUM_GROUPS), np.int64)
    for g in nb.prange(ngroups):
        for s in range(g * every, nslices, ngroups * every):
            start = s * slice_size
            end = min(n, start + slice_size)
            _preset_costs_slice(levels, start, end, dq, num_gt_flags, partial[g], partial_group[g])
    cost = partial.sum(axis=0).reshape((MAX_CONTEXTS, NUM_PRESETS))
    group = partial_group.sum(axis=0).reshape((MAX_CONTEXTS, _NUM_GROUPS))
    for p in range(NUM_PRESETS):
        cost[:, p] += group[:, _SHIFT_GROUP[p]]
    return cost


def choose_context_init(levels: np.ndarray, slice_size: int, dq: bool | int, num_gt_flags: int,
                        sample: int | None = CTX_INIT_SAMPLE) -> np.ndarray:
    """Per used context, the preset (tables.PRESETS) with the least estimated cost (§2.8 bit
    costs) summed over the tensor's slices: all of them (sample None), or evenly spaced slices
    holding about `sample` levels. Contexts restart at every slice, so a spread of slices
    measures the start-up cost the whole tensor pays. A slice is always measured whole: a prefix
    can mislead (the first rows of an embedding table are often untrained tokens)."""
    dq = dq_states(dq)
    nslices = -(-levels.size // slice_size)
    every = 1 if sample is None else max(1, (nslices * slice_size) // max(sample, slice_size))
    ngroups = max(1, min(4 * nb.get_num_threads(), -(-nslices // every)))
    cost = preset_costs(levels, slice_size, dq, num_gt_flags, ngroups, every)
    used = used_contexts(num_gt_flags, dq)
    return np.argmin(cost[used], axis=1).astype(np.uint8)
