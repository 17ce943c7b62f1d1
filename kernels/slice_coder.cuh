// The per-slice coder of the GPU engine: encode one slice, decode one slice, bound one slice.
//
// A transcription of gpucabac/engines/cpu.py (encode_slice, decode_slice) and gpucabac/slices.py (slice_bounds) and
// binarize.py into __host__ __device__ C++: the same binarization (docs/engine.md §1.1), context
// layout (§1.3 as binarize.py numbers it), estimator (§2.2), LPS table and register arithmetic
// (§2.3-2.7), DQ mapping (§3.5), terminate bin, flush and end checks, and the same error codes.
// Integers only. tests/test_kernels.py compiles this file with g++ and holds it to the numba
// reference byte for byte; gpucabac.cu runs it one thread per slice.
#ifndef GPUCABAC_SLICE_CODER_CUH
#define GPUCABAC_SLICE_CODER_CUH

#include "compat.cuh"
#include "tables.cuh"

// Where the coder finds its tables: the host arrays of tables.cuh (the g++ build), or the copies a
// kernel places in shared memory.
struct GcTables {
    const unsigned char* rlps;     // 8 x 32, index (range & 0xE0) + |P >> 7|
    const int* curve;              // 32
    const unsigned char* renorm;   // 512
    const unsigned char* dq_next;  // every trellis size, tables.DQ_NEXT_ALL
    const int* preset_states;      // 16 x 4: S0, S1, sh0, sh1 (tables.PRESET_STATES)
    const unsigned int* crc32;     // 256
};

#if !defined(__CUDACC__)
static inline GcTables gc_host_tables() {
    GcTables t = {gc_rlps_host, gc_curve_host, gc_renorm_host, gc_dq_next_host, gc_preset_states_host, gc_crc32_host};
    return t;
}
#endif

// The context states of one slice: context c at base[c * stride]. stride 1 for a private array;
// in a kernel, blockDim.x over a shared-memory block, so that the threads of a warp never share
// a bank.
struct GcCtxArray {
    unsigned int* base;
    int stride;
    GC_HD unsigned int& operator[](int c) const { return base[c * stride]; }
};

// ---------------------------------------------------------------------------------------------
// Probability model (docs/engine.md §2.2), one 32-bit word per context:
//   bits 0-15 S1 (int16), 16-23 S0 (int8), 24-27 sh0 = SH0 + 4, 28-31 sh1 = SH1.
// Every state reachable from every preset fits (tests/test_engine.py checks S0 in int8 and P in
// int16 over all of them; test_kernels.py checks this update against the numba one on each).

GC_HD unsigned int gc_ctx_pack(int s0, int s1, int sh0, int sh1) {
    return ((unsigned int)s1 & 0xFFFFu) | (((unsigned int)s0 & 0xFFu) << 16) | ((unsigned int)sh0 << 24) |
           ((unsigned int)sh1 << 28);
}
GC_HD int gc_ctx_s1(unsigned int w) { return (int)(short)(unsigned short)(w & 0xFFFFu); }
GC_HD int gc_ctx_s0(unsigned int w) { return (int)(signed char)(unsigned char)((w >> 16) & 0xFFu); }
// P = S1 + 16 S0: the probability of a 1 in the log domain; P >= 0 means 1 is the MPS.
GC_HD int gc_ctx_p(unsigned int w) { return gc_ctx_s1(w) + 16 * gc_ctx_s0(w); }

GC_HD unsigned int gc_ctx_update(unsigned int w, int b, const int* curve) {
    int s1 = gc_ctx_s1(w);
    int s0 = gc_ctx_s0(w);
    int sh0 = (int)((w >> 24) & 15u);
    int sh1 = (int)(w >> 28);
    int sigma = 2 * b - 1;
    s0 += sigma * (curve[16 + ((sigma * s0) >> 3)] >> sh0);
    s1 += sigma * (curve[16 + ((sigma * s1) >> 7)] >> sh1);
    return (w & 0xFF000000u) | (((unsigned int)s0 & 0xFFu) << 16) | ((unsigned int)s1 & 0xFFFFu);
}

// Every context c from preset init[c] (docs/format.md §4.1).
GC_HD void gc_ctx_init(GcCtxArray ctx, const unsigned char* init, const GcTables& t) {
    for (int c = 0; c < GC_MAX_CONTEXTS; ++c) {
        const int* p = t.preset_states + 4 * init[c];
        ctx[c] = gc_ctx_pack(p[0], p[1], p[2], p[3]);
    }
}

// ---------------------------------------------------------------------------------------------
// DQ mapping (docs/engine.md §3.5), as binarize.py.

GC_HD int gc_neighbour_class(long long prev) { return prev == 0 ? 0 : (prev < 0 ? 1 : 2); }

// Reconstruction index r -> coded level k in `state`; |k| > GC_MAX_ABS_LEVEL when r is not on
// the state's quantizer.
GC_HD long long gc_dq_coded_level(long long r, int state) {
    if (r == 0) return 0;
    long long qid = state & 1;
    long long t = r > 0 ? r + qid : r - qid;
    if (t & 1) return (long long)GC_MAX_ABS_LEVEL + 1;
    return t >> 1;  // t is even: an exact halving, also for t < 0
}

GC_HD long long gc_dq_reconstruction_index(long long k, int state) {
    if (k == 0) return 0;
    long long qid = state & 1;
    return k > 0 ? 2 * k - qid : 2 * k + qid;
}

// dq: the trellis size (8..256); its table starts at 2 * dq - 16 (tables.dq_table_offset).
GC_HD int gc_dq_next_state(int dq, int state, long long k, const GcTables& t) {
    return t.dq_next[2 * dq - 16 + 2 * state + (int)(k & 1)];
}

// ---------------------------------------------------------------------------------------------
// Encoder (docs/engine.md §2.6): low, range, bits left, the carry buffer (one byte + a run of 0xFF).

struct GcEncoder {
    long long low;
    int rng;
    int bits_left;
    int buffered;
    long long nbuf;
    unsigned char* out;
    long long pos;
    long long cap;
    bool overflow;  // a byte fell past `cap` (a wrong bound: never for valid levels)
};

GC_HD void gc_put(GcEncoder& e, int byte) {
    if (e.pos < e.cap)
        e.out[e.pos] = (unsigned char)byte;
    else
        e.overflow = true;
    e.pos += 1;
}

// Move the top byte of low out, buffering 0xFF runs until a carry is resolved.
GC_HD void gc_write_out(GcEncoder& e) {
    long long lead = e.low >> (24 - e.bits_left);
    e.bits_left += 8;
    e.low &= 0xFFFFFFFFLL >> e.bits_left;
    if (lead == 0xFF) {
        e.nbuf += 1;
    } else if (e.nbuf > 0) {
        int carry = (int)(lead >> 8);
        gc_put(e, (e.buffered + carry) & 0xFF);
        e.buffered = (int)(lead & 0xFF);
        int fill = (0xFF + carry) & 0xFF;
        while (e.nbuf > 1) {
            gc_put(e, fill);
            e.nbuf -= 1;
        }
    } else {
        e.nbuf = 1;
        e.buffered = (int)lead;
    }
}

GC_HD void gc_encode_bin(GcEncoder& e, GcCtxArray ctx, int c, int b, const GcTables& t) {
    unsigned int w = ctx[c];
    int p = gc_ctx_p(w);
    int pc = p >> 7;
    int rlps = t.rlps[(e.rng & 0xE0) + (pc >= 0 ? pc : -pc)];
    int rmps = e.rng - rlps;
    bool lps = b != (p >= 0 ? 1 : 0);
    e.low += lps ? rmps : 0;
    e.rng = lps ? rlps : rmps;
    int n = t.renorm[e.rng];  // 0 or 1 after an MPS, 1..7 after an LPS
    e.low <<= n;
    e.rng <<= n;
    e.bits_left -= n;
    if (e.bits_left < 12) gc_write_out(e);
    ctx[c] = gc_ctx_update(w, b, t.curve);
}

GC_HD void gc_encode_bypass(GcEncoder& e, int b) {
    e.low = (e.low << 1) + (b ? e.rng : 0);
    e.bits_left -= 1;
    if (e.bits_left < 12) gc_write_out(e);
}

// Terminate bin 1, flush, stop bit and byte alignment.
GC_HD void gc_encode_finish(GcEncoder& e) {
    e.low = (e.low + e.rng - 2) << 7;
    e.bits_left -= 7;
    if (e.bits_left < 12) gc_write_out(e);
    if (e.low >> (32 - e.bits_left)) {
        gc_put(e, (e.buffered + 1) & 0xFF);
        while (e.nbuf > 1) {
            gc_put(e, 0);
            e.nbuf -= 1;
        }
        e.low -= 1LL << (32 - e.bits_left);
    } else {
        if (e.nbuf > 0) gc_put(e, e.buffered);
        while (e.nbuf > 1) {
            gc_put(e, 0xFF);
            e.nbuf -= 1;
        }
    }
    // The remaining 24 - bits_left bits of low >> 8, a 1 stop bit, zeros up to a byte boundary.
    int nbits = 24 - e.bits_left + 1;
    long long value = ((e.low >> 8) << 1) | 1;
    int pad = (8 - nbits % 8) % 8;
    value <<= pad;
    nbits += pad;
    while (nbits > 0) {
        nbits -= 8;
        gc_put(e, (int)((value >> nbits) & 0xFF));
    }
}

// Context of prefix bin j of a zero run: the first 23 bins their own, the rare rest one shared.
GC_HD int gc_run_context(int j) { return GC_RUN + (j < GC_RUN_CONTEXTS - 1 ? j : GC_RUN_CONTEXTS - 1); }

// A run of `run` zeros (docs/format.md §4.2): its prefix bin j at context gc_run_context(j).
GC_HD void gc_encode_run(GcEncoder& e, GcCtxArray ctx, long long run, const GcTables& t) {
    long long base = 0;
    int m = 0;
    while (run >= base + (1LL << m)) {
        gc_encode_bin(e, ctx, gc_run_context(m), 1, t);
        base += 1LL << m;
        m += 1;
    }
    gc_encode_bin(e, ctx, gc_run_context(m), 0, t);
    long long suffix = run - base;
    for (int k = m - 1; k >= 0; --k) gc_encode_bypass(e, (int)((suffix >> k) & 1));  // MSB first
}

// Code levels[0:count] (reconstruction indices; coded levels k under DQ) as one flushed slice into
// out[0:cap], with zero runs when `runs` is set. Returns the bytes written, or -1 if they would not
// fit in cap. Precondition: every level is valid (gc_slice_bound reports none bad), as
// engines/cpu.py encode_slice assumes.
GC_HD long long gc_encode_slice(const int* levels, long long count, int dq, int num_gt_flags, int runs,
                                const unsigned char* init, GcCtxArray ctx, const GcTables& t,
                                unsigned char* out, long long cap) {
    gc_ctx_init(ctx, init, t);
    GcEncoder e;
    e.low = 0;
    e.rng = 510;
    e.bits_left = 23;
    e.buffered = 0;
    e.nbuf = 0;
    e.out = out;
    e.pos = 0;
    e.cap = cap;
    e.overflow = false;
    const int eg = GC_GT + 2 * num_gt_flags;
    long long prev = 0;
    int state = 0;
    long long run = 0;
    for (long long i = 0; i < count; ++i) {
        long long q = levels[i];
        if (dq) q = gc_dq_coded_level(q, state);
        // Bins of §1.1 in order: sig (or, with runs, the run of zeros before a non-zero level),
        // sign, greater-than flags, EG prefix (regular), EG suffix (bypass).
        int nbc = gc_neighbour_class(prev);
        if (runs) {
            if (q == 0) {
                run += 1;
            } else {
                gc_encode_run(e, ctx, run, t);
                run = 0;
            }
        } else {
            gc_encode_bin(e, ctx, GC_SIG + 3 * (state & 7) + nbc, q != 0, t);
        }
        if (q != 0) {
            int neg = q < 0 ? 1 : 0;
            long long a = neg ? -q : q;
            gc_encode_bin(e, ctx, GC_SIGN + nbc, neg, t);
            bool remainder = true;
            for (int j = 1; j <= num_gt_flags; ++j) {
                int g = a > j ? 1 : 0;
                gc_encode_bin(e, ctx, GC_GT + 2 * (j - 1) + neg, g, t);
                if (!g) {
                    remainder = false;
                    break;
                }
            }
            if (remainder) {
                // Order-0 Exp-Golomb: m ones then a zero (context by position), m suffix bits.
                long long rem = a - (num_gt_flags + 1);
                long long base = 0;
                int m = 0;
                while (rem >= base + (1LL << m)) {
                    gc_encode_bin(e, ctx, eg + m, 1, t);
                    base += 1LL << m;
                    m += 1;
                }
                gc_encode_bin(e, ctx, eg + m, 0, t);
                long long suffix = rem - base;
                for (int k = m - 1; k >= 0; --k) gc_encode_bypass(e, (int)((suffix >> k) & 1));  // MSB first
            }
        }
        prev = q;
        if (dq) state = gc_dq_next_state(dq, state, q, t);
    }
    if (runs && run > 0) gc_encode_run(e, ctx, run, t);  // the slice ends in zeros
    gc_encode_finish(e);
    return e.overflow ? -1 : e.pos;
}

// ---------------------------------------------------------------------------------------------
// Output bound and validity (slices.slice_bounds): 7 bits per regular bin (an LPS of the
// smallest sub-range renormalises 7 times), 1 per bypass bin, plus terminate and flush.

GC_HD long long gc_level_bound_bits(long long q, int num_gt_flags) {
    long long a = q >= 0 ? q : -q;
    if (a == 0) return 7;
    if (a <= num_gt_flags) return 7 * (2 + a);
    long long rem = a - (num_gt_flags + 1);
    long long base = 0;
    int m = 0;
    while (rem >= base + (1LL << m)) {
        base += 1LL << m;
        m += 1;
    }
    return 7LL * (2 + num_gt_flags + m + 1) + m;
}

// A run of r zeros: m + 1 regular prefix bins, m bypass bins.
GC_HD long long gc_run_bound_bits(long long r) {
    long long base = 0;
    int m = 0;
    while (r >= base + (1LL << m)) {
        base += 1LL << m;
        m += 1;
    }
    return 7LL * (m + 1) + m;
}

// The bound in bytes of the slice levels[0:count] (coded with zero runs when `runs` is set);
// *bad = the index (in the slice) of the first level that cannot be coded (|k| too large, or
// under DQ not on its state's quantizer), or -1.
GC_HD long long gc_slice_bound(const int* levels, long long count, int dq, int num_gt_flags, int runs,
                               const GcTables& t, long long* bad) {
    long long bits = 0;
    int state = 0;
    long long run = 0;
    *bad = -1;
    for (long long i = 0; i < count; ++i) {
        long long q = levels[i];
        if (dq) q = gc_dq_coded_level(q, state);
        if (q > GC_MAX_ABS_LEVEL || q < -(long long)GC_MAX_ABS_LEVEL) {
            *bad = i;
            break;
        }
        if (!runs) {
            bits += gc_level_bound_bits(q, num_gt_flags);
        } else if (q == 0) {
            run += 1;
        } else {
            bits += gc_run_bound_bits(run) + gc_level_bound_bits(q, num_gt_flags) - 7;
            run = 0;
        }
        if (dq) state = gc_dq_next_state(dq, state, q, t);
    }
    if (run) bits += gc_run_bound_bits(run);
    // terminate (7 bits), flush and stop bit: at most 5 more bytes with pending 0xFF runs
    return (bits + 7) / 8 + 8;
}

// ---------------------------------------------------------------------------------------------
// Decoder (docs/engine.md §2.7). Streams whose first two bytes are 0xFF00 or more are rejected before decoding
// (gc_decode_slice), so the value register stays below 2^24 and fits an int (one GPU register).

GC_HD int gc_read_byte(const unsigned char* data, long long len, long long& pos, bool& overrun) {
    int b = 0;
    if (pos < len)
        b = data[pos];
    else
        overrun = true;
    pos += 1;
    return b;
}

enum { GC_PHASE_SIG = 0, GC_PHASE_SIGN = 1, GC_PHASE_GT = 2, GC_PHASE_EG = 3, GC_PHASE_RUN = 4 };

// m bypass bins, most significant first.
GC_HD long long gc_decode_bypass(int m, int& value, int& bits, int rng, const unsigned char* data, long long len,
                                 long long& pos, bool& overrun) {
    long long suffix = 0;
    for (int k = 0; k < m; ++k) {
        value <<= 1;
        bits += 1;
        if (bits >= 0) {
            value += gc_read_byte(data, len, pos, overrun);
            bits = -8;
        }
        int s = rng << 7;
        suffix <<= 1;
        if (value >= s) {
            value -= s;
            suffix |= 1;
        }
    }
    return suffix;
}

// Decode `count` levels from data[0:len] into sink(i, level), with zero runs when `runs` is set;
// returns a GC_DECODE_* code (GC_DECODE_OK when the slice decoded and ended exactly at its last
// byte). The binarization is walked as a small state machine (phase = which bin comes next), as
// in engines/cpu.py decode_slice.
template <class Sink>
GC_HD int gc_decode_slice_as(const unsigned char* data, long long len, long long count, int dq, int num_gt_flags,
                             int runs, const unsigned char* init, GcCtxArray ctx, const GcTables& t, Sink& sink) {
    gc_ctx_init(ctx, init, t);
    bool overrun = false;
    long long pos = 0;
    int b0 = gc_read_byte(data, len, pos, overrun);
    int b1 = gc_read_byte(data, len, pos, overrun);
    int value = (b0 << 8) | b1;
    int rng = 510;
    int bits = -8;
    const int eg = GC_GT + 2 * num_gt_flags;
    long long i = 0;
    int nbc = 0;    // neighbour class of the previous level
    int state = 0;  // DQ state
    const int first_phase = runs ? GC_PHASE_RUN : GC_PHASE_SIG;
    int phase = first_phase;
    int neg = 0;
    long long a = 0;
    int m = 0;
    long long base = 0;
    while (i < count) {
        int c;
        if (phase == GC_PHASE_SIG)
            c = GC_SIG + 3 * (state & 7) + nbc;
        else if (phase == GC_PHASE_SIGN)
            c = GC_SIGN + nbc;
        else if (phase == GC_PHASE_GT)
            c = GC_GT + 2 * (int)(a - 1) + neg;
        else if (phase == GC_PHASE_EG)
            c = eg + m;
        else
            c = gc_run_context(m);
        // One regular bin.
        unsigned int w = ctx[c];
        int p = gc_ctx_p(w);
        int pc = p >> 7;
        int rlps = t.rlps[(rng & 0xE0) + (pc >= 0 ? pc : -pc)];
        int rmps = rng - rlps;
        int scaled = rmps << 7;
        bool lps = value >= scaled;
        int b = (p >= 0 ? 1 : 0) ^ (lps ? 1 : 0);
        value -= lps ? scaled : 0;
        rng = lps ? rlps : rmps;
        int n = t.renorm[rng];
        rng <<= n;
        value <<= n;
        bits += n;
        if (bits >= 0) {
            int byte = gc_read_byte(data, len, pos, overrun);
            value += byte << bits;
            bits -= 8;
        }
        ctx[c] = gc_ctx_update(w, b, t.curve);
        // Next bin, or the level is complete.
        long long q = 0;
        bool done = false;
        if (phase == GC_PHASE_SIG) {
            if (b)
                phase = GC_PHASE_SIGN;
            else
                done = true;
        } else if (phase == GC_PHASE_SIGN) {
            neg = b;
            a = 1;
            if (num_gt_flags > 0) {
                phase = GC_PHASE_GT;
            } else {
                phase = GC_PHASE_EG;
                m = 0;
                base = 0;
            }
        } else if (phase == GC_PHASE_GT) {
            if (!b) {
                q = neg ? -a : a;
                done = true;
            } else if (a == num_gt_flags) {
                phase = GC_PHASE_EG;
                m = 0;
                base = 0;
            } else {
                a += 1;
            }
        } else if (b) {  // a prefix bin 1, of a level's remainder or of a run
            base += 1LL << m;
            m += 1;
            if (phase == GC_PHASE_EG && m >= GC_EG_PREFIX_BINS) return GC_DECODE_BAD_LEVEL;
            if (phase == GC_PHASE_RUN && m >= GC_RUN_PREFIX_BINS) return GC_DECODE_BAD_RUN;
        } else if (phase == GC_PHASE_EG) {
            long long suffix = gc_decode_bypass(m, value, bits, rng, data, len, pos, overrun);
            a = base + suffix + num_gt_flags + 1;
            if (a > GC_MAX_ABS_LEVEL) return GC_DECODE_BAD_LEVEL;
            q = neg ? -a : a;
            done = true;
        } else {  // the end of a run's prefix: its zeros, then a non-zero level unless the slice ends
            long long r = base + gc_decode_bypass(m, value, bits, rng, data, len, pos, overrun);
            if (overrun) return GC_DECODE_OVERRUN;
            if (r > count - i) return GC_DECODE_BAD_RUN;
            for (long long j = 0; j < r; ++j) {
                sink(i + j, 0);
                if (dq) state = gc_dq_next_state(dq, state, 0, t);
            }
            i += r;
            if (r) nbc = 0;
            phase = GC_PHASE_SIGN;
            m = 0;
            base = 0;
        }
        if (done) {
            if (overrun) return GC_DECODE_OVERRUN;
            if (dq) {
                sink(i, gc_dq_reconstruction_index(q, state));
                state = gc_dq_next_state(dq, state, q, t);
            } else {
                sink(i, q);
            }
            nbc = gc_neighbour_class(q);
            i += 1;
            phase = first_phase;
            m = 0;
            base = 0;
        }
    }
    // Terminate bin: must decode as 1, the slice must end exactly here, with the stop pattern.
    if (overrun || value < ((rng - 2) << 7) || pos != len) return GC_DECODE_BAD_END;
    if ((((int)data[len - 1] << (8 + bits)) & 0xFF) != 0x80) return GC_DECODE_BAD_END;
    return GC_DECODE_OK;
}

template <class Sink>
GC_HD int gc_decode_slice(const unsigned char* data, long long len, long long count, int dq, int num_gt_flags,
                          int runs, const unsigned char* init, GcCtxArray ctx, const GcTables& t, Sink& sink) {
    // A valid slice starts below 0xFF00 (= 510 << 7, the initial range): reject the rest at once,
    // as engines/cpu.py decode_slice does, so value always fits an int.
    if (len >= 1 && data[0] == 0xFF) return GC_DECODE_BAD_END;
    return gc_decode_slice_as(data, len, count, dq, num_gt_flags, runs, init, ctx, t, sink);
}

// ---------------------------------------------------------------------------------------------
// CRC-32 (zlib's), of one slice's bytes.

GC_HD unsigned int gc_crc32(const unsigned char* data, long long len, const unsigned int* table) {
    unsigned int c = 0xFFFFFFFFu;
    for (long long j = 0; j < len; ++j) c = table[(c ^ data[j]) & 0xFFu] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

#endif  // GPUCABAC_SLICE_CODER_CUH
