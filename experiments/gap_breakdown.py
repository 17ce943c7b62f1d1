"""Where the bits above the Gaussian rate-distortion bound go, at about 3.5 bits per weight.

For the levels of three quantizers on i.i.d. Gaussian weights (σ = 0.02, 1 M values, slice 8192,
the settings of rd_gaussian.py), the exact rate is split into steps, each an entropy of the same
levels under a more practical model:

  bound       R(D) of a Gaussian at the measured SNR (SNR_dB / 6.02)
  levels      empirical entropy of the levels given the DQ state as the contexts see it (s & 7;
              URQ: of the levels), i.e. an ideal entropy coder for this quantizer and context
              layout: bound → levels is the quantizer's own loss
  bins        the static (per-tensor) entropy of the regular bins in their contexts, plus one
              bit per Exp-Golomb suffix bin: the cost of the binarization and context choice
  adaptive    the docs/engine.md §2.8 cost of the bins under the DeepCABAC estimator from the chosen context
              initialisation, reset at every slice: the estimator's learning and tracking noise
  exact       the real coder's bytes, slice table (length + CRC-32 per slice) included

and, beside them, `adaptive, best rates`: the same estimator with, per context, the best of
16 adaptation-rate pairs × 77 starting probabilities (what a richer context-initialisation
table could buy; the container has 16 presets).

    python experiments/gap_breakdown.py [--n N] [--out DIR]
    python experiments/gap_breakdown.py --tiny      # smoke run: 16 k values, no 256-state case

Writes gap_breakdown.{json,md} to experiments/results (full run) or a temp dir (--tiny; see --out).
"""

from __future__ import annotations

import argparse
import math
import time

import numba as nb
import numpy as np

from _common import header_md, machine_info, md_table, out_dir, write_results

import gpucabac
from gpucabac import codec
from gpucabac.binarize import MAX_REGULAR_BINS, binarize_level, dq_coded_level, dq_next_state, dq_states
from gpucabac.quantization import dequantize, step_from_qp
from gpucabac.context_init import _cost_and_update
from gpucabac.rdquant import context_arrays

SIGMA = 0.02
N = gpucabac.DEFAULT_GT_FLAGS  # greater-than flags, as the codec codes them
TINY_N = 1 << 14  # two slices of the default size


@nb.njit(cache=True)
def _bin_streams(levels, slice_size, dq, num_gt_flags):
    """Regular bins as (context, bin, slice) and the DQ state and coded level of every weight."""
    n = levels.shape[0]
    ctxs = np.empty(n * 40, np.int32)
    bins = np.empty(n * 40, np.int8)
    slices = np.empty(n * 40, np.int32)
    states = np.empty(n, np.int32)
    bypass = 0
    ctx = np.empty(MAX_REGULAR_BINS, np.int32)
    bb = np.empty(MAX_REGULAR_BINS, np.int32)
    m = 0
    for s0 in range(0, n, slice_size):
        prev = 0
        state = 0
        for i in range(s0, min(n, s0 + slice_size)):
            q = levels[i]
            states[i] = state
            if dq:
                q = dq_coded_level(q, state)
            nreg, _, nsuffix = binarize_level(q, prev, state, num_gt_flags, ctx, bb)
            bypass += nsuffix
            for j in range(nreg):
                ctxs[m] = ctx[j]
                bins[m] = bb[j]
                slices[m] = s0 // slice_size
                m += 1
            prev = q
            if dq:
                state = dq_next_state(dq, state, q)
    return ctxs[:m], bins[:m], slices[:m], states, bypass


@nb.njit(cache=True)
def _adaptive_bits(bins, slices, sh0, sh1, s0_init, s1_init):
    """docs/engine.md §2.8 cost of one context's bins under the estimator, reset at every slice start."""
    s0 = np.empty(1, np.int32)
    s1 = np.empty(1, np.int32)
    total = 0
    last = -1
    for t in range(bins.shape[0]):
        if slices[t] != last:
            s0[0] = s0_init
            s1[0] = s1_init
            last = slices[t]
        total += _cost_and_update(s0, s1, 0, bins[t], sh0, sh1)
    return total / 32768.0


def _states_of(p: int) -> tuple[int, int]:
    """(S0, S1) of a start probability P = S1 + 16 S0 with the two estimators agreeing."""
    s0 = int(round(p / 32))
    return s0, p - 16 * s0


def _entropy_bits(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def breakdown(w: np.ndarray, levels: np.ndarray, step: float, dq: bool | int, slice_size: int) -> dict:
    n = w.size
    dq = dq_states(dq)
    ctx_init, payload, lengths = codec.encode_levels(levels, slice_size, dq, N)
    exact = 8 * (payload.size + 8 * lengths.size + 64 + (len(ctx_init) + 1) // 2)
    rec = dequantize(levels, step, (n,), np.float32).astype(np.float64)
    w64 = w.astype(np.float64).ravel()
    snr = 10 * math.log10(float(w64 @ w64) / float(((w64 - rec) ** 2).sum()))
    ctxs, bins, slices, states, bypass = _bin_streams(levels, slice_size, dq, N)
    # entropy of the levels given the DQ state as the contexts see it, s & 7 (one state for URQ)
    states &= 7
    level_bits = sum(_entropy_bits(np.unique(levels[states == s], return_counts=True)[1]) for s in np.unique(states))
    static = float(bypass)
    s0_init, s1_init, sh0_init, sh1_init = context_arrays(ctx_init, N, dq)  # the signalled start states
    adaptive = best = 0.0
    grid = [(sh0, sh1) for sh0 in (4, 5, 6, 7) for sh1 in (4, 5, 6, 7)]
    for c in np.unique(ctxs):
        mask = ctxs == c
        b = bins[mask].astype(np.int32)
        sl = slices[mask]
        ones = int(b.sum())
        static += _entropy_bits(np.array([ones, b.size - ones]))
        adaptive += _adaptive_bits(b, sl, sh0_init[c], sh1_init[c], s0_init[c], s1_init[c])
        best += min(_adaptive_bits(b, sl, sh0, sh1, *_states_of(P)) for sh0, sh1 in grid for P in range(-3800, 3801, 100))
    adaptive += bypass
    best += bypass
    bound = snr / (20 * math.log10(2))
    return dict(snr_db=snr, bound=bound, levels=level_bits / n, bins=static / n, adaptive=adaptive / n,
                adaptive_best_rates=best / n, exact=exact / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help=f"smoke run: {TINY_N} values, the URQ and 8-state cases only")
    ap.add_argument("--n", type=int, default=None, help=f"values (default 2^20; --tiny: {TINY_N})")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from gpucabac import rdquant

    n = args.n or (TINY_N if args.tiny else 1 << 20)
    info = machine_info()
    S = gpucabac.DEFAULT_SLICE_SIZE
    w = (np.random.default_rng(0).standard_normal(n) * SIGMA).astype(np.float32)
    cases = {"rounding (URQ), QP −29": (False, -29, 0.0), "DQ λ=0, QP −32": (True, -32, 0.0),
             "DQ + rate λ=0.3, QP −32": (True, -32, 0.3), "DQ 256 states + rate λ=0.3, QP −32": (256, -32, 0.3)}
    if args.tiny:  # the 256-state trellis costs a compilation and ~0.2 ms per weight on a CPU
        cases = {label: c for label, c in cases.items() if c[0] != 256}
    t0 = time.perf_counter()
    results, rows = {}, []
    for label, (dq, qp, lam) in cases.items():
        step = step_from_qp(qp)
        levels = rdquant.rd_quantize_tensor(w, [step], [lam], dq=dq, slice_size=S).levels[0, 0]
        r = breakdown(w, levels, step, dq, S)
        results[label] = r
        b = r["bound"]
        rows.append([label, f"{r['exact']:.3f}", f"{r['snr_db']:.2f}", f"{r['levels'] - b:.3f}", f"{r['bins'] - r['levels']:.3f}",
                     f"{r['adaptive'] - r['bins']:.3f}", f"{r['exact'] - r['adaptive']:.3f}", f"{r['exact'] - b:.3f}",
                     f"{r['adaptive_best_rates'] - r['bins']:.3f}"])
        print(label, {k: round(v, 4) for k, v in r.items()}, flush=True)
    settings = dict(n=n, sigma=SIGMA, slice_size=S, seconds=round(time.perf_counter() - t0))
    md = header_md("Gap to the Gaussian RD bound, step by step", info, f"iid Gaussian σ={SIGMA}, {n} values", settings)
    md += md_table(["quantizer", "exact bpw", "SNR dB", "quantizer (levels − bound)", "binarization (bins − levels)",
                    "estimator (adaptive − bins)", "coder (exact − adaptive)", "total gap", "estimator with best rates"], rows)
    md += ("\n\nAll in bits per weight. `estimator with best rates` replaces the estimator column when every context "
           "gets the best of 16 adaptation-rate pairs × 77 starting probabilities instead of the container's 16 presets.\n")
    write_results(out_dir(args.out, args.tiny), "gap_breakdown", dict(info=info, settings=settings, results=results), md)
    print(md)


if __name__ == "__main__":
    main()
