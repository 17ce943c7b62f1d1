"""The constant tables of the DeepCABAC/NNC engine, defined once (docs/engine.md §2, §3.5).

Both engines read these: the numba reference imports the arrays, and the CUDA sources get them
through a generated header (see `cuda_header`), so a table can never differ between paths.
"""

from __future__ import annotations

import numpy as np

# §2.2: the step "curve" of the dual-rate log-domain estimator.
CURVE = np.array(
    [2512, 2288, 2064, 1840, 1616, 1392, 1168, 944, 720, 560, 464, 368, 272, 208, 144, 80]
    + [64] * 15 + [0],
    dtype=np.int32,
)

# §2.3: LPS sub-range by range class (rows, (R >> 5) & 7) and probability class (abs(P >> 7)).
RLPS = np.array(
    [
        [128, 112, 97, 84, 74, 65, 57, 50, 45, 39, 34, 30, 27, 23, 20, 18, 15, 14, 12, 11, 10, 9, 7, 7, 5, 5, 4, 4, 3, 3, 2, 2],
        [142, 125, 108, 93, 82, 72, 63, 56, 50, 43, 38, 33, 30, 26, 22, 20, 17, 16, 13, 12, 11, 10, 8, 8, 6, 6, 5, 5, 3, 3, 2, 2],
        [156, 137, 119, 103, 90, 79, 70, 61, 55, 48, 42, 37, 33, 28, 24, 22, 19, 17, 15, 13, 12, 11, 9, 9, 6, 6, 5, 5, 4, 4, 2, 2],
        [171, 150, 130, 112, 99, 87, 76, 67, 60, 52, 46, 40, 36, 31, 27, 24, 21, 19, 16, 15, 13, 12, 10, 10, 7, 7, 6, 6, 4, 4, 3, 3],
        [185, 162, 141, 121, 107, 94, 82, 73, 65, 56, 50, 43, 39, 34, 29, 26, 22, 21, 17, 16, 14, 13, 11, 11, 8, 8, 6, 6, 4, 4, 3, 3],
        [199, 175, 152, 131, 115, 101, 89, 78, 70, 61, 54, 47, 42, 36, 31, 28, 24, 22, 19, 17, 15, 14, 12, 12, 8, 8, 7, 7, 5, 5, 3, 3],
        [213, 187, 163, 140, 123, 108, 95, 84, 75, 65, 58, 50, 45, 39, 33, 30, 26, 24, 20, 18, 16, 15, 13, 13, 9, 9, 7, 7, 5, 5, 3, 3],
        [228, 200, 174, 150, 132, 116, 102, 90, 80, 70, 62, 54, 48, 42, 36, 32, 28, 26, 22, 20, 18, 16, 14, 14, 10, 10, 8, 8, 6, 6, 4, 4],
    ],
    dtype=np.int32,
)

# §2.4: context initialisations: NNC's nine "ECO" sets (0..8), then gpucabac's seven (9..15),
# as SH0, SH1, P_init, S0_init. A 4-bit index per context selects one (docs/format.md).
# The shift amounts used by the update are sh0 = SH0 + 4 and sh1 = SH1.
PRESETS = np.array(
    [
        [1, 4, 0, 0],
        [1, 4, -1310, -41],
        [1, 4, 3039, 95],
        [0, 5, 0, 0],
        [2, 6, 962, 30],
        [2, 6, 3039, 95],
        [2, 6, -673, -21],
        [3, 5, 0, 0],
        [3, 5, 962, 30],
        # gpucabac's additions (docs/design.md §3): more starting probabilities at NNC's default rates.
        [1, 4, -3039, -95],
        [1, 4, -2000, -63],
        [1, 4, -654, -20],
        [1, 4, 654, 20],
        [1, 4, 1310, 41],
        [1, 4, 2000, 63],
        [0, 5, 2000, 63],
    ],
    dtype=np.int32,
)
NUM_PRESETS = len(PRESETS)


def _preset_states() -> np.ndarray:
    """[NUM_PRESETS, 4] the probability model's starting registers of every preset, in the order
    (S0, S1, sh0, sh1) (docs/format.md §4.1): S0 = S0_init, S1 = P_init − 16·S0_init, and the
    shift amounts sh0 = SH0 + 4, sh1 = SH1. Every estimator (both coders, the context-init choice,
    the JAX rate model) starts from these; the CUDA kernels apply the same formula to PRESETS."""
    sh0, sh1, p_init, s0_init = PRESETS.T
    return np.stack([s0_init, p_init - 16 * s0_init, sh0 + 4, sh1], axis=1).astype(np.int32)


PRESET_STATES = _preset_states()

# §3.5: dependent quantization, next state by (state, parity of the coded level k).
DQ_NEXT_STATE = np.array(
    [[0, 2], [7, 5], [1, 3], [6, 4], [2, 0], [5, 7], [3, 1], [4, 6]], dtype=np.int32
)
DQ_NUM_STATES = 8

# gpucabac's larger trellises (format version 2, modes dq16..dq256; docs/format.md): Ungerboeck's
# rate-1/2 codes for one-dimensional signal sets, parity-check polynomials (h0, h1) in octal, by
# states. NNC's 8-state table above is the code (13, 04) with its states numbered differently.
DQ_STATE_COUNTS = (8, 16, 32, 64, 128, 256)
_UNGERBOECK_1D = {16: (0o23, 0o04), 32: (0o45, 0o10), 64: (0o103, 0o024), 128: (0o235, 0o126), 256: (0o515, 0o362)}


def _parity(v: int) -> int:
    return bin(v).count("1") & 1


def ungerboeck_trellis(h0: int, h1: int, states: int) -> np.ndarray:
    """Next-state table [states, 2] of the systematic feedback encoder with parity checks h0, h1.

    The encoder's register u holds the last log2(states) values of u_n = z1_n ^ <h0 taps, u>; the
    quantizer of a state is z0 = <h1 taps, u> (Q0 even, Q1 odd reconstruction indices) and the
    branch bit is z1 = (k & 1) ^ z0, which labels the four subsets of the union codebook as
    Ungerboeck's set partitioning does on the positive axis (the §3.5 convention). States are then
    renumbered so that the quantizer is state & 1, as in §3.5, keeping state 0 (all-zero register)."""
    mask = states - 1
    qid = [_parity((h1 >> 1) & s) for s in range(states)]
    order = sorted(range(states), key=lambda s: (qid[s], s))
    evens, odds = order[: states // 2], order[states // 2 :]
    if any(qid[s] for s in evens) or not all(qid[s] for s in odds) or evens[0] != 0:
        raise ValueError(f"({h0:o}, {h1:o}) is not a balanced trellis code for {states} states")
    new = {s: 2 * i for i, s in enumerate(evens)} | {s: 2 * i + 1 for i, s in enumerate(odds)}
    table = np.zeros((states, 2), np.int32)
    for s in range(states):
        f = _parity((h0 >> 1) & s)
        for parity in (0, 1):
            u = parity ^ qid[s] ^ f
            table[new[s], parity] = new[((s << 1) | u) & mask]
    return table


def dq_next_table(states: int) -> np.ndarray:
    """Next-state table [states, 2] of the DQ trellis with `states` states (8 is NNC's, §3.5)."""
    if states == DQ_NUM_STATES:
        return DQ_NEXT_STATE
    if states not in _UNGERBOECK_1D:
        raise ValueError(f"DQ trellis sizes are {DQ_STATE_COUNTS}, got {states}")
    return ungerboeck_trellis(*_UNGERBOECK_1D[states], states)


# All trellises' tables in one flat array, by size: the table of `states` starts at
# 2 * states - 16 (8 → 0, 16 → 16, 32 → 48, ...); entry 2 * state + (k & 1) is the next state.
DQ_NEXT_ALL = np.concatenate([dq_next_table(s).ravel() for s in DQ_STATE_COUNTS]).astype(np.int32)


def _bit_cost_table() -> np.ndarray:
    """§2.8: cost in bits·2^15 of coding a 0 (column 0) or a 1 (column 1) from state bucket
    i = 512 + (P >> 3). Encoder decisions only (context-init choice, rate estimates); the
    decoder never reads it, so streams do not depend on it."""
    j = np.arange(1024, dtype=np.float64) - 512
    c = np.minimum(8.0 * np.abs(j) + 4.0, 4092.0)
    lps = 1.0 + 0.0015289 * c
    mps = -np.log2(1.0 - 2.0 ** (-lps))
    one_is_mps = j >= 0
    cost = np.empty((1024, 2), dtype=np.int64)
    cost[:, 1] = np.where(one_is_mps, mps, lps) * 32768.0 + 0.5
    cost[:, 0] = np.where(one_is_mps, lps, mps) * 32768.0 + 0.5
    return cost.astype(np.int32)


BIT_COST = _bit_cost_table()
BIT_COST_ONE = 32768  # one bypass bin, in the same 2^15 units

# Binarization limits (§1.1): N greater-than flags, then an Exp-Golomb remainder whose prefix
# has at most EG_PREFIX_BINS bins (j = 0..30), enough for any |level| below 2^31 - N.
MAX_GT_FLAGS = 20
EG_PREFIX_BINS = 31
MAX_ABS_LEVEL = (1 << 30) - 1

# §2.6: shifts that bring a sub-range x in 1..511 back to [256, 511]: 9 - bit_length(x), i.e.
# clz32(x) - 23 (entry 0 is unused).
RENORM = np.array([0] + [9 - int(x).bit_length() for x in range(1, 512)], dtype=np.int32)


def _crc32_table() -> np.ndarray:
    t = np.zeros(256, np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        t[i] = c
    return t


# The slice checksum: CRC-32 with zlib's reflected polynomial 0xEDB88320, one entry per byte value.
CRC32 = _crc32_table()
