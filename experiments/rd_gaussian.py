"""Gap to the Gaussian rate-distortion bound (issue acceptance: ≤ 0.10 bit/weight at ~3.5 bpw).

1 M i.i.d. Gaussian weights, σ = 0.02 (as a 1024 × 1024 tensor), default slice size. For each
quantizer we find the exact coded rate R (payload + header, the real coder) and the SNR, and
compare with the Gaussian bound at the same SNR: R*(SNR) = ½·log2(σ̂²/D) = SNR_dB / 6.0206,
σ̂² the sample power (the SNR's own numerator). Gap = R − R*.

Quantizers: rounding (URQ λ=0), distortion-only DQ (λ=0, NNCodec's default), greedy RDOQ (URQ+λ),
rate-aware DQ trellis (DQ+λ; NNC's 8 states, and gpucabac's 64- and 256-state trellises); and
NNCodec's DQ when experiments/.nncodec-venv exists.
Each is scanned over a few steps near 3.5 bpw; the gap is read at 3.5 bpw by interpolating the
gap against rate between neighbouring points (and the nearest point is reported too).

    python experiments/rd_gaussian.py [--tiny] [--out DIR]

--tiny (a smoke run, results to a temp dir or --out): 8192 weights (64 x 128, one slice), the URQ
and 8-state quantizers only (the 64- and 256-state trellises would each add a compilation and
cost far more per weight on a CPU), each at its first λ and first three QPs; NNCodec only if its
venv exists.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import _common  # noqa: F401  (sys.path)
import numpy as np

from _common import header_md, machine_info, md_table, out_dir, save_figure, write_results

import gpucabac
from gpucabac import codec
from gpucabac.quantization import dequantize, step_from_qp

TARGET_BPW = 3.5
SIGMA = 0.02


def bound_bpw(snr_db: float) -> float:
    return snr_db / (20 * math.log10(2))


def measure(w, levels, step, dq, slice_size):
    ctx_init, payload, lengths = codec.encode_levels(levels, slice_size, dq, gpucabac.DEFAULT_GT_FLAGS)
    # slice table (u32 length + CRC-32 per slice), context initialisation, the record's fixed part (≈)
    hdr = 8 * lengths.size + (len(ctx_init) + 1) // 2 + 64
    bits = 8 * (payload.size + hdr)
    rec = dequantize(levels, step, (w.size,), np.float32).astype(np.float64)
    w64 = w.astype(np.float64).ravel()
    snr = 10 * math.log10(float(w64 @ w64) / float(((w64 - rec) ** 2).sum()))
    bpw = bits / w.size
    return dict(bpw=bpw, snr_db=snr, gap=bpw - bound_bpw(snr), step=float(step))


def at_target(points):
    """Gap at TARGET_BPW by linear interpolation of gap vs rate between the bracketing points."""
    pts = sorted(points, key=lambda p: p["bpw"])
    for a, b in zip(pts, pts[1:]):
        if a["bpw"] <= TARGET_BPW <= b["bpw"]:
            t = (TARGET_BPW - a["bpw"]) / (b["bpw"] - a["bpw"])
            return a["gap"] + t * (b["gap"] - a["gap"])
    return None


def plot_gaps(results, path):
    """Gap to the bound (bit/weight) against exact rate, per quantizer; for RD quantizers the best
    λ's points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in results.items():
        pts = r["points"]
        if r.get("best_lam") is not None:
            pts = [p for p in pts if p.get("lam") == r["best_lam"]]
            label = f"{label}, λ={r['best_lam']:g}" if r["best_lam"] else label
        pts = sorted((p["bpw"], p["gap"]) for p in pts)
        ax.plot(*zip(*pts), "-o", ms=3, label=label)
    ax.axvline(TARGET_BPW, color="gray", lw=0.8)
    ax.axhline(0.10, color="gray", ls=":", lw=0.8, label="target gap 0.10")
    ax.set_xlabel("bits per weight (exact, slice 8192)")
    ax.set_ylabel("bits/weight above the Gaussian RD bound")
    ax.set_title(f"i.i.d. Gaussian σ={SIGMA}, 1 M values")
    ax.grid(alpha=0.3)
    save_figure(fig, ax, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: 8 k weights, no 64/256-state trellis")
    ap.add_argument("--out", default=None)
    ap.add_argument("--slice-size", type=int, default=gpucabac.DEFAULT_SLICE_SIZE)
    ap.add_argument("--replot", action="store_true", help="only redraw rd_gaussian.png from the JSON")
    args = ap.parse_args()
    if args.replot:
        d = out_dir(args.out, args.tiny)
        plot_gaps(json.loads((d / "rd_gaussian.json").read_text())["results"], d / "rd_gaussian.png")
        return
    from gpucabac import rdquant

    shape = (64, 128) if args.tiny else (1024, 1024)
    w = (np.random.default_rng(0).standard_normal(shape) * SIGMA).astype(np.float32)
    S = args.slice_size
    info = machine_info()
    results = {}
    t0 = time.perf_counter()
    # step grids (bracketing 3.5 bpw) and the λ used with each
    configs = {
        "rounding (URQ, λ=0)": dict(dq=False, lams=[0.0], qps=[-30, -29, -28]),
        "DQ, distortion only (λ=0)": dict(dq=True, lams=[0.0], qps=[-33, -32, -31]),
        "URQ + RDOQ": dict(dq=False, lams=[0.05, 0.1, 0.2], qps=[-30, -29, -28, -27]),
        "DQ + rate (trellis)": dict(dq=True, lams=[0.2, 0.3, 0.5], qps=[-33, -32, -31, -30]),
        # gpucabac's larger trellises (modes dq64, dq256; container version 2)
        "DQ 64 states + rate": dict(dq=64, lams=[0.2, 0.3], qps=[-33, -32, -31]),
        "DQ 256 states + rate": dict(dq=256, lams=[0.2, 0.3], qps=[-33, -32, -31]),
    }
    if args.tiny:  # one grid shape per quantizer: two compilations
        configs = {label: dict(c, lams=c["lams"][:1], qps=c["qps"][:3]) for label, c in configs.items() if c["dq"] in (False, True)}
    for label, c in configs.items():
        steps = [step_from_qp(q) for q in c["qps"]]
        t = time.perf_counter()
        res = rdquant.rd_quantize_tensor(w, steps, c["lams"], dq=c["dq"], slice_size=S)
        tq = time.perf_counter() - t
        pts = []
        for ki, step in enumerate(steps):
            for li, lam in enumerate(c["lams"]):
                p = measure(w, res.levels[ki, li], step, c["dq"], S)
                p.update(lam=lam, qp=c["qps"][ki], est_bpw=float(res.bits[ki, li]) / w.size)
                pts.append(p)
        # per λ the gap at the target rate; keep the best λ
        per_lam = {lam: at_target([p for p in pts if p["lam"] == lam]) for lam in c["lams"]}
        valid = {k: v for k, v in per_lam.items() if v is not None}
        best_lam = min(valid, key=valid.get) if valid else None
        results[label] = dict(points=pts, gap_at_target_by_lam=per_lam, best_lam=best_lam,
                              gap_at_target=valid.get(best_lam) if valid else None, quantize_seconds=tq)
        print(f"{label}: gap at {TARGET_BPW} bpw = {results[label]['gap_at_target']} (λ={best_lam}), {tq:.1f} s", flush=True)

    from nncodec_env import nncodec_python_if_present, run_nncodec

    py = nncodec_python_if_present()
    if py is not None:
        pts = []
        for qp in (-34, -33, -32, -31):
            r, arrays = run_nncodec({"w": w}, dict(mode="quant", qp=qp, dq=True, repeats=1, return_dequant=True),
                                    python=py, want_arrays=True)
            deq = arrays["w"]["dequant"].astype(np.float64).ravel()
            w64 = w.astype(np.float64).ravel()
            snr = 10 * math.log10(float(w64 @ w64) / float(((w64 - deq) ** 2).sum()))
            bpw = 8 * r["tensors"][0]["bytes"] / w.size
            pts.append(dict(qp=qp, bpw=bpw, snr_db=snr, gap=bpw - bound_bpw(snr)))
        results["NNCodec DQ (param-opt, 1 NDU)"] = dict(points=pts, gap_at_target=at_target(pts))
        print(f"NNCodec DQ: gap at {TARGET_BPW} bpw = {results['NNCodec DQ (param-opt, 1 NDU)']['gap_at_target']}")
    info["loadavg_end"] = _common.loadavg()
    settings = dict(n=w.size, sigma=SIGMA, slice_size=S, target_bpw=TARGET_BPW, seed=0,
                    bound="R*(SNR) = SNR_dB/6.0206 (Gaussian, sample power)", seconds=time.perf_counter() - t0)
    rows = []
    for label, r in results.items():
        g = r.get("gap_at_target")
        near = min(r["points"], key=lambda p: abs(p["bpw"] - TARGET_BPW))
        rows.append([label, "-" if g is None else f"{g:.3f}", str(r.get("best_lam", "-")),
                     f"{near['bpw']:.3f}", f"{near['snr_db']:.2f}", f"{near['gap']:.3f}"])
    md = header_md("Gap to the Gaussian RD bound", info, f"iid Gaussian σ={SIGMA}, {w.size} values", settings)
    md += md_table(["quantizer", f"gap at {TARGET_BPW} bpw (bit/w)", "best λ", "nearest point bpw", "SNR dB", "gap"], rows)
    md += "\n\nRates are exact (the real coder, payload + slice table). Target: DQ + rate ≤ 0.10 bit/weight above the bound.\n"
    d = out_dir(args.out, args.tiny)
    jp, mp = write_results(d, "rd_gaussian", dict(machine=info, settings=settings, results=results), md)
    try:
        plot_gaps(results, d / "rd_gaussian.png")
    except ImportError:
        pass
    print(md)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
