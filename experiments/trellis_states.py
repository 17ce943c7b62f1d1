"""What a larger dependent-quantization trellis buys (modes dq16 … dq256, container version 2).

NNC's DQ is an 8-state trellis; its levels alone sit ≈ 0.10 bit/weight above the Gaussian
rate-distortion bound at 3.5 bits/weight (gap_breakdown.md), which is why the issue's target of
≤ 0.10 in total could not be met with it. gpucabac's larger trellises (Ungerboeck's codes with
16 … 256 states, docs/format.md §4.3) keep the reconstruction grid, binarization, contexts and
engine, so the decoder costs the same and only the encoder's search grows.

Two measurements, all with the distortion-only trellis (λ = 0, numba: `gpucabac.quantize_levels`),
default slice size, rates exact (the real container's bytes: payload plus headers):

1. i.i.d. Gaussian σ = 0.02, 1 M values: per trellis size, at QP −33…−31, the exact rate, the SNR,
   the gap to the Gaussian bound R*(SNR) = SNR_dB / 6.02, and the levels' own gap (their empirical
   entropy given the state's quantizer, an ideal entropy coder, minus the bound); gaps read at
   3.5 bits/weight by interpolation.
2. the default model (MiniLM, every 2-D float tensor, 22.7 M weights) at QP −40…−22: exact bits
   per weight and SNR per trellis size, and NNCodec 2.1.3's DQ at the same QPs in the same run
   (experiments/.nncodec-venv, when present); savings at equal SNR against NNCodec and against
   our own 8-state trellis.

    python experiments/trellis_states.py [--tiny] [--out DIR] [--sizes 8,64,256]

--tiny (a smoke run, results to a temp dir or --out): 16 k Gaussian values at trellis sizes 8 and
256, the tiny random model at 8, 256 and 256+auto, QPs -34,-26; NNCodec only if its venv exists.
"""

from __future__ import annotations

import argparse
import time

import numba as nb
import numpy as np

from _common import header_md, load_default_model_2d, machine_info, md_table, out_dir, tiny_model, write_results
from rd_gaussian import SIGMA, TARGET_BPW, at_target, bound_bpw, measure
from rd_minilm import interp_bpw, nncodec_dq_points, snr

import gpucabac
from gpucabac.quantization import step_from_qp
from gpucabac.tables import DQ_STATE_COUNTS, dq_next_table


@nb.njit(cache=True)
def _quantizer_of_each(levels, slice_size, table):
    """The quantizer (state & 1) each level was coded in, and its coded level k."""
    n = levels.shape[0]
    qid = np.empty(n, np.int8)
    k = np.empty(n, np.int64)
    state = 0
    for i in range(n):
        if i % slice_size == 0:
            state = 0
        r = levels[i]
        q = state & 1
        kk = 0 if r == 0 else ((r + q) >> 1 if r > 0 else -((-r + q) >> 1))
        qid[i] = q
        k[i] = kk
        state = table[2 * state + (kk & 1)]
    return qid, k


def level_entropy_bpw(levels: np.ndarray, slice_size: int, states: int) -> float:
    """Empirical entropy of the coded levels given the state's quantizer, bits per weight."""
    qid, k = _quantizer_of_each(levels.astype(np.int64), slice_size, dq_next_table(states).ravel().astype(np.int64))
    bits = 0.0
    for q in (0, 1):
        _, counts = np.unique(k[qid == q], return_counts=True)
        bits -= float((counts * np.log2(counts / counts.sum())).sum())
    return bits / levels.size


def gaussian(sizes, n: int, S: int) -> dict:
    w = (np.random.default_rng(0).standard_normal(n) * SIGMA).astype(np.float32)
    out = {}
    for states in sizes:
        t = time.perf_counter()
        pts = []
        for qp in (-33, -32, -31):
            step = step_from_qp(qp)
            levels = gpucabac.quantize_levels(w, step, dq=states, slice_size=S)
            p = measure(w, levels, step, states, S)
            p.update(qp=qp, level_gap=level_entropy_bpw(levels, S, states) - bound_bpw(p["snr_db"]))
            pts.append(p)
        level_pts = [dict(bpw=p["bpw"], gap=p["level_gap"]) for p in pts]
        out[states] = dict(points=pts, gap_at_target=at_target(pts), level_gap_at_target=at_target(level_pts),
                           seconds=time.perf_counter() - t)
        print(f"Gaussian, {states} states: gap {out[states]['gap_at_target']}, levels alone "
              f"{out[states]['level_gap_at_target']} ({out[states]['seconds']:.0f} s)", flush=True)
    return out


def parse_variant(variant: str) -> dict:
    """"M[+auto][+lamX]": M trellis states; +auto: each tensor in its cheaper scan order; +lamX: the
    rate-aware trellis at lam X (gpucabac.rdquant), else the distortion-only one."""
    states, *opts = variant.split("+")
    out = dict(dq=int(states), scan="rows", lam=0.0)
    for opt in opts:
        if opt == "auto":
            out["scan"] = "auto"
        elif opt.startswith("lam"):
            out["lam"] = float(opt[3:])
        else:
            raise SystemExit(f"unknown variant option {opt!r} in {variant!r}")
    return out


def minilm(variants, tensors: dict, qps, S: int, nncodec_qps=None) -> dict:
    """Exact bpw and SNR of each variant (parse_variant) at each QP, NNCodec's DQ at the same QPs
    (or at `nncodec_qps`), and the savings at equal SNR against NNCodec and against our 8 states."""
    numel = sum(t.size for t in tensors.values())
    ours = {}
    for variant in variants:
        v = parse_variant(variant)
        pts = []
        for qp in qps:
            t = time.perf_counter()
            data = gpucabac.encode(tensors, qp=qp, dq=v["dq"], slice_size=S, scan=v["scan"], lam=v["lam"])
            back = gpucabac.decode(data)
            pts.append(dict(qp=qp, bpw=8 * len(data) / numel, snr_db=snr(tensors, back), seconds=time.perf_counter() - t))
            print(f"MiniLM, {variant}, QP {qp}: {pts[-1]}", flush=True)
        ours[variant] = pts
    nnc = nncodec_dq_points(tensors, qps if nncodec_qps is None else nncodec_qps)
    for pts in ours.values():
        for p in pts:
            for key, curve in (("vs_nncodec", nnc), ("vs_8_states", ours.get("8", []))):
                ref = interp_bpw([(c["bpw"], c["snr_db"]) for c in curve], p["snr_db"]) if curve else None
                p[f"saving_{key}_pct"] = None if ref is None else 100 * (1 - p["bpw"] / ref)
    return dict(ours=ours, nncodec=nnc, numel=numel)


def _pct(v):
    return "-" if v is None else f"{v:+.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: 16 k Gaussian values, a tiny model, fewer sizes and QPs")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sizes", default=None,
                    help=f"trellis sizes for the Gaussian part (default {','.join(map(str, DQ_STATE_COUNTS))}; --tiny: 8,256)")
    ap.add_argument("--model-sizes", default=None,
                    help="trellis sizes for the model part; M+auto: each tensor in its cheaper scan order "
                         "(default 8,64,256,256+auto; --tiny: 8,256,256+auto)")
    ap.add_argument("--qps", default=None, help="default -40,-38,-34,-30,-26,-22 (--tiny: -34,-26)")
    args = ap.parse_args()
    if args.sizes is None:
        args.sizes = "8,256" if args.tiny else ",".join(map(str, DQ_STATE_COUNTS))
    if args.model_sizes is None:
        args.model_sizes = "8,256,256+auto" if args.tiny else "8,64,256,256+auto"
    if args.qps is None:
        args.qps = "-34,-26" if args.tiny else "-40,-38,-34,-30,-26,-22"
    info = machine_info()
    S = gpucabac.DEFAULT_SLICE_SIZE
    t0 = time.perf_counter()
    gauss = gaussian([int(v) for v in args.sizes.split(",")], 1 << (14 if args.tiny else 20), S)
    if args.tiny:
        model, tensors = "tiny random", {k: v for k, v in tiny_model().items() if v.ndim == 2}
    else:
        model, tensors = load_default_model_2d()
    qps = [int(q) for q in args.qps.split(",")]
    net = minilm(args.model_sizes.split(","), tensors, qps, S)
    settings = dict(slice_size=S, sigma=SIGMA, target_bpw=TARGET_BPW, qps=qps, lam=0.0,
                    quantizer="distortion-only trellis (gpucabac.quantize_levels)",
                    seconds=round(time.perf_counter() - t0))

    md = header_md("What a larger DQ trellis buys", info, f"i.i.d. Gaussian (1 M values) and {model}", settings)
    md += "\n\n## Gaussian σ = 0.02: gap to the rate-distortion bound at 3.5 bits/weight (λ = 0)\n\n"
    md += md_table(["trellis states", "total gap (exact rate − bound)", "levels alone (entropy given quantizer − bound)",
                    "points bpw / SNR dB"],
                   [[str(k), f"{v['gap_at_target']:.3f}" if v["gap_at_target"] is not None else "-",
                     f"{v['level_gap_at_target']:.3f}" if v["level_gap_at_target"] is not None else "-",
                     ", ".join(f"{p['bpw']:.3f}/{p['snr_db']:.2f}" for p in v["points"])] for k, v in gauss.items()])
    md += f"\n\n## {model}, every 2-D tensor ({net['numel']:,} weights): exact bits/weight at equal SNR (λ = 0)\n\n"
    rows = []
    for states, pts in net["ours"].items():
        for p in pts:
            rows.append([states, str(p["qp"]), f"{p['bpw']:.4f}", f"{p['snr_db']:.2f}",
                         _pct(p["saving_vs_nncodec_pct"]), _pct(p["saving_vs_8_states_pct"])])
    for p in net["nncodec"]:
        rows.append(["NNCodec DQ", str(p["qp"]), f"{p['bpw']:.4f}", f"{p['snr_db']:.2f}", "", ""])
    md += md_table(["trellis states (+auto: per-tensor scan order)", "QP", "bpw (file)", "SNR dB", "saving vs NNCodec DQ at equal SNR",
                    "saving vs our 8 states"], rows)
    md += ("\n\nSavings are read against the other curve interpolated linearly in SNR; '-' where the point "
           "lies outside that curve's SNR range.\n")
    write_results(out_dir(args.out, args.tiny), "trellis_states",
                  dict(info=info, settings=settings, gaussian={str(k): v for k, v in gauss.items()}, model=net), md)
    print(md)


if __name__ == "__main__":
    main()
