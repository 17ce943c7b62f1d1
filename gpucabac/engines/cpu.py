"""The CPU engine: the DeepCABAC/NNC probability model and arithmetic coder (docs/format.md §4),
applied slice by slice, compiled with numba and parallel over slices; `CpuEngine` is its driver
behind the engine contract (engines/base.py).

Everything here is integer arithmetic; the decoder holds no floating-point state. Read as the
specification of the coder: the CUDA kernels (kernels/slice_coder.cuh) implement the same steps
and are tested against these functions bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numba as nb
import numpy as np

from .. import threads as _threads  # noqa: F401  (numba's fork-safe layer, before any parallel loop)
from ..binarize import GT, MAX_CONTEXTS, MAX_REGULAR_BINS, RUN_PREFIX_BINS, SIG, SIGN, coded_symbol, dq_next_state, symbol_bins
from ..binarize import dq_reconstruction_index, neighbour_class, run_context
from ..dtypes import numpy_dtype
from ..quantization import dequantize_into
from ..slices import DECODE_BAD_END, DECODE_BAD_LEVEL, DECODE_BAD_RUN, DECODE_CRC, DECODE_OK, DECODE_OVERRUN, slice_bounds, slice_crcs
from ..slices import slice_offsets
from ..tables import CURVE, EG_PREFIX_BINS, MAX_ABS_LEVEL, PRESET_STATES, RENORM, RLPS
from .base import CodedSlices, EncodeJob, SliceTable, TensorOutput

# numba indexes global 2-D arrays far slower than 1-D ones, so the hot paths use flat copies.
_RLPS = RLPS.ravel().copy()
_STATES = PRESET_STATES.ravel().copy()
_RENORM = RENORM

# ---------------------------------------------------------------------------------------------
# Probability model: per context (S0, S1, sh0, sh1); P = S1 + 16*S0 (docs/engine.md §2.2).


@nb.njit(inline="always", cache=True)
def _init_contexts(init, s0, s1, sh0, sh1):
    for c in range(init.shape[0]):
        pre = 4 * init[c]
        s0[c] = _STATES[pre]
        s1[c] = _STATES[pre + 1]
        sh0[c] = _STATES[pre + 2]
        sh1[c] = _STATES[pre + 3]


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
    """Move the top byte of `low` out, buffering 0xFF runs until a carry is resolved (docs/engine.md §2.6)."""
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
def encode_slice(levels, start, end, dq, num_gt_flags, init, out, out_start, runs=False):
    """Code levels[start:end] as one flushed slice into out[out_start:]; returns bytes written.
    With `runs` the zeros are coded as runs (docs/format.md §4.2): before each non-zero level,
    and at the end if the slice ends in zeros, the run of zeros since the last non-zero."""
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
    run = 0
    for i in range(start, end + 1):
        q, code_run, code_level, run = coded_symbol(levels, i, end, dq, state, runs, run)
        if i == end and not code_run:
            break
        # A run's bins, then the level's: each its regular bins, then its bypass suffix.
        for part in range(2 if code_run or code_level else 0):  # a zero inside a run has no bins
            first, nreg, suffix, nsuffix = symbol_bins(part, code_run, code_level, run, q, prev, state,
                                                       num_gt_flags, runs, ctx, bins)
            for j in range(first, nreg):
                # One regular bin (docs/engine.md §2.6), written out here: numba compiles this loop several
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
        if code_run:
            run = 0
        prev = q
        if dq and i < end:
            state = dq_next_state(dq, state, q)
    # Terminate bin 1, flush, stop bit and byte alignment (docs/engine.md §2.6).
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


_PHASE_SIG, _PHASE_SIGN, _PHASE_GT, _PHASE_EG, _PHASE_RUN = 0, 1, 2, 3, 4


@nb.njit(inline="always", cache=True)
def _decode_bypass(m, value, bits, rng, data, pos, end, overrun):
    """m bypass bins, most significant first: (their value, value, bits, pos, overrun)."""
    suffix = 0
    for _ in range(m):
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
    return suffix, value, bits, pos, overrun


@nb.njit(cache=True)
def decode_slice(data, start, end, count, dq, num_gt_flags, init, out, out_start, runs=False):
    """Decode `count` levels from the slice data[start:end] into out[out_start:]; returns an
    error code (DECODE_OK when the slice decoded and ended exactly at its last byte).

    The binarization of docs/engine.md §1.1 (with `runs`, docs/format.md §4.2) is walked as a
    small state machine (phase = which bin comes next) so that the regular-bin decoder stands
    once in the loop.
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
    first_phase = _PHASE_RUN if runs else _PHASE_SIG
    phase = first_phase
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
        elif phase == _PHASE_EG:
            c = eg + m
        else:
            c = run_context(m)
        # One regular bin (docs/engine.md §2.7).
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
        elif b:  # a prefix bin 1, of a level's remainder or of a run
            base += 1 << m
            m += 1
            if m >= (EG_PREFIX_BINS if phase == _PHASE_EG else RUN_PREFIX_BINS):
                return DECODE_BAD_LEVEL if phase == _PHASE_EG else DECODE_BAD_RUN
        elif phase == _PHASE_EG:
            suffix, value, bits, pos, overrun = _decode_bypass(m, value, bits, rng, data, pos, end, overrun)
            a = base + suffix + num_gt_flags + 1
            if a > MAX_ABS_LEVEL:
                return DECODE_BAD_LEVEL
            q = -a if neg else a
            done = True
        else:  # the end of a run's prefix: its zeros, then a non-zero level unless the slice ends
            suffix, value, bits, pos, overrun = _decode_bypass(m, value, bits, rng, data, pos, end, overrun)
            r = base + suffix
            if overrun:
                return DECODE_OVERRUN
            if r > count - i:
                return DECODE_BAD_RUN
            for j in range(r):
                out[out_start + i + j] = 0
                if dq:
                    state = dq_next_state(dq, state, 0)
            i += r
            if r:
                nbc = 0
            phase = _PHASE_SIGN
            m = 0
            base = 0
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
            phase = first_phase
            m = 0
            base = 0
    # Terminate bin: must decode as 1, the slice must end exactly here, with the stop pattern.
    if overrun or value < ((rng - 2) << 7) or pos != end:
        return DECODE_BAD_END
    if ((np.int64(data[end - 1]) << (8 + bits)) & 0xFF) != 0x80:
        return DECODE_BAD_END
    return DECODE_OK


# ---------------------------------------------------------------------------------------------
# Parallel drivers.


@nb.njit(parallel=True, cache=True)
def encode_slices_into(levels, slice_size, first_slice, nslices, dq, num_gt_flags, init, scratch, offsets, lengths, runs=False):
    """Encode slices first_slice .. first_slice+nslices-1, slice i into scratch[offsets[i]:]."""
    n = levels.shape[0]
    for i in nb.prange(nslices):
        s = first_slice + i
        start = s * slice_size
        end = min(n, start + slice_size)
        lengths[i] = encode_slice(levels, start, end, dq, num_gt_flags, init, scratch, offsets[i], runs)


@nb.njit(parallel=True, cache=True)
def gather_slices(scratch, offsets, lengths, out, out_offsets):
    for i in nb.prange(lengths.shape[0]):
        o = offsets[i]
        d = out_offsets[i]
        for j in range(lengths[i]):
            out[d + j] = scratch[o + j]


@nb.njit(parallel=True, cache=True)
def decode_slices_into(data, slice_offsets, slice_lengths, first_slice, nslices, count, slice_size, dq, num_gt_flags, init, out, errors,
                       runs=False):
    """Decode slices first_slice.. of one tensor; slice s starts at data[slice_offsets[s]]."""
    for i in nb.prange(nslices):
        s = first_slice + i
        start = s * slice_size
        n = min(count, start + slice_size) - start
        o = slice_offsets[s]
        errors[s] = decode_slice(data, o, o + slice_lengths[s], n, dq, num_gt_flags, init, out, start, runs)




# ---------------------------------------------------------------------------------------------
# The engine behind the contract (engines/base.py)

# Slices are encoded in batches whose worst-case output fits this scratch budget, and decoded in
# batches of at most this many levels (16 MiB of int32 scratch).
SCRATCH_BYTES = 64 << 20
DECODE_BATCH = 1 << 22


def encode_job(job: EncodeJob, progress: Callable[[int], None] | None = None) -> CodedSlices:
    """Code one tensor's valid levels: batches of slices whose byte bounds fit SCRATCH_BYTES are
    coded in parallel into scratch space, then compacted; CRC-32 per slice."""
    levels = np.ascontiguousarray(job.levels, dtype=np.int32).reshape(-1)
    n, size = levels.size, int(job.slice_size)
    if n == 0:
        return CodedSlices(np.zeros(0, np.uint8), np.zeros(0, np.uint32), np.zeros(0, np.uint32))
    init = np.ascontiguousarray(job.init, dtype=np.int32)
    bounds = job.slice_bytes_bound
    if bounds is None:
        bounds, _ = slice_bounds(levels, size, job.dq, job.num_gt_flags, bool(job.runs))
    nslices = bounds.size
    lengths = np.zeros(nslices, np.int64)
    pieces = []
    first = 0
    while first < nslices:
        ends = np.cumsum(bounds[first:])
        count = max(1, int(np.searchsorted(ends, SCRATCH_BYTES, side="right")))
        offsets = slice_offsets(bounds[first : first + count])
        scratch = np.empty(int(ends[count - 1]), np.uint8)
        batch_lengths = np.zeros(count, np.int64)
        if count == 1:  # in this thread: a parallel launch costs more than a small slice
            start = first * size
            batch_lengths[0] = encode_slice(levels, start, min(n, start + size), int(job.dq), int(job.num_gt_flags),
                                            init, scratch, 0, bool(job.runs))
            out = scratch[: batch_lengths[0]].copy()
        else:
            encode_slices_into(levels, size, first, count, job.dq, job.num_gt_flags, init, scratch, offsets,
                               batch_lengths, bool(job.runs))
            out = np.empty(int(batch_lengths.sum()), np.uint8)
            gather_slices(scratch, offsets, batch_lengths, out, slice_offsets(batch_lengths))
        pieces.append(out)
        lengths[first : first + count] = batch_lengths
        if progress is not None:
            progress(min(n, (first + count) * size) - first * size)
        first += count
    payload = np.concatenate(pieces)
    return CodedSlices(payload, lengths.astype(np.uint32), slice_crcs(payload, slice_offsets(lengths), lengths))


class CpuEngine:
    """The numba engine: parallel over the slices of one tensor at a time (numba's threads)."""

    name = "cpu"
    xp = np

    def describe(self) -> str:
        return f"CPU, numba {nb.__version__} ({nb.get_num_threads()} threads)"

    def encode(self, jobs: Sequence[EncodeJob], progress=None) -> list[CodedSlices]:
        return [encode_job(job, progress) for job in jobs]

    def decode(self, table: SliceTable, outputs: Sequence[TensorOutput], progress=None) -> tuple[list, np.ndarray]:
        """Each tensor's output is allocated once, after its first batch of slices decoded, and
        filled batch by batch (at most DECODE_BATCH levels each; the values dequantized into it
        by quantization.dequantize_into, without temporaries of its size): memory stays the
        outputs plus bounded scratch, and a stream of garbage fails before it costs its claimed output. After
        the first tensor that fails, the rest are empty placeholders (the codec raises for it)."""
        errors = np.zeros(table.num_slices, np.int32)
        crcs = slice_crcs(table.payload, table.slice_offset, table.slice_length)
        errors[crcs != table.slice_crc] = DECODE_CRC
        arrays = []
        scratch = work_scratch = None
        for t, out in enumerate(outputs):
            part = table.slices_of(t)
            err = errors[part]
            n = int(table.tensor_numel[t])
            if (err != DECODE_OK).any():  # the codec raises for this tensor: decode nothing more
                break
            levels_out = out.dtype == "int32"
            result = None
            size = int(table.slice_count[part.start])  # the slice size (or the whole tensor, if shorter)
            per_batch = max(1, DECODE_BATCH // size)
            offsets, lengths = table.slice_offset[part], table.slice_length[part].astype(np.int64)
            init = table.tensor_init[t].astype(np.int32)
            for b0 in range(0, err.size, per_batch):
                b1 = min(err.size, b0 + per_batch)
                first, stop = b0 * size, min(n, b1 * size)
                if levels_out and result is not None:
                    target = result[first:stop]
                else:
                    if scratch is None or scratch.size < stop - first:
                        scratch = np.empty(min(n, per_batch * size), np.int32)
                    target = scratch[: stop - first]
                dq, gt, runs = int(table.tensor_dq[t]), int(table.tensor_gt[t]), bool(table.tensor_runs[t])
                if b1 - b0 == 1:  # in this thread, as encode_job does
                    o = int(offsets[b0])
                    err[b0] = decode_slice(table.payload, o, o + int(lengths[b0]), stop - first, dq, gt, init, target,
                                           0, runs)
                else:
                    decode_slices_into(table.payload, offsets[b0:b1], lengths[b0:b1], 0, b1 - b0, stop - first, size,
                                       dq, gt, init, target, err[b0:b1], runs)
                if (err[b0:b1] != DECODE_OK).any():
                    break
                if result is None:
                    result = np.empty(n, np.int32 if levels_out else numpy_dtype(out.dtype))
                    if levels_out:
                        result[first:stop] = target
                if not levels_out:  # fused dequantization, straight into the output where it can
                    work_scratch = dequantize_into(target, out.step, numpy_dtype(out.work), result[first:stop],
                                                   work_scratch)
                if progress is not None:
                    progress(stop - first)
            if (err != DECODE_OK).any():
                break
            arrays.append(result)
        arrays += [np.zeros(0, np.int32) for _ in range(len(arrays), len(outputs))]
        return arrays, errors

    def upload(self, host: np.ndarray) -> np.ndarray:
        return host

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)
