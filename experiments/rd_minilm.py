"""RD curves on the default model (MiniLM, 2-D tensors): gpucabac's RD quantizers against NNCodec's
dependent quantization (issue target: ≥ 3% fewer bits at equal SNR over ~2–6 bits/weight).

Ours: `gpucabac.sweep` at the given QPs and lambdas (exact rates: the real coder, payload + tensor
header record, default slice size). NNCodec 2.1.3 (experiments/.nncodec-venv): DQ with its default
distortion-only trellis and param-opt, one NDU per tensor, at the same QPs. Savings at equal SNR:
NNCodec's rate is interpolated (linearly in SNR) at each of our points inside its SNR range.

    python experiments/rd_minilm.py [--tiny] [--qps -38,-34,...] [--lams 0,0.3] [--out DIR]

--tiny (a smoke run, results to a temp dir or --out): the tiny random model, QPs -34,-26, DQ at
λ 0.3 and URQ at λ 0.1 only; NNCodec only if its venv exists.
"""

from __future__ import annotations

import argparse
import math
import time

import _common  # noqa: F401
import numpy as np

from _common import header_md, load_default_model_2d, machine_info, md_table, out_dir, save_figure, tiny_model

import gpucabac
from gpucabac.io import atomic_write_bytes
from gpucabac.quantization import step_from_qp
from gpucabac.plotting import plot_sweeps


def snr(ref, rec):
    num = sum(float(np.sum(ref[k].astype(np.float64) ** 2)) for k in ref)
    den = sum(float(np.sum((ref[k].astype(np.float64) - rec[k].astype(np.float64)) ** 2)) for k in ref)
    return 10 * math.log10(num / den)


def interp_bpw(curve, s):
    """Rate of a (bpw, snr) curve at SNR s, linear between the bracketing points, or None."""
    pts = sorted(curve, key=lambda p: p[1])
    for a, b in zip(pts, pts[1:]):
        if a[1] <= s <= b[1]:
            return a[0] + (s - a[1]) / (b[1] - a[1]) * (b[0] - a[0])
    return None


def nncodec_dq_points(tensors: dict, qps) -> list[dict]:
    """NNCodec 2.1.3's DQ (param-opt, one NDU per tensor) at each QP: bits/weight of its coded
    tensors and the SNR of its dequantized output; [] without experiments/.nncodec-venv."""
    from nncodec_env import nncodec_python_if_present, run_nncodec

    py = nncodec_python_if_present()
    points = []
    for qp in qps if py is not None else ():
        r, arrays = run_nncodec(tensors, dict(mode="quant", qp=qp, dq=True, repeats=1, return_dequant=True),
                                python=py, want_arrays=True)
        bpw = 8 * sum(t["bytes"] for t in r["tensors"]) / sum(t["numel"] for t in r["tensors"])
        points.append(dict(qp=qp, bpw=bpw, snr_db=snr(tensors, {k: arrays[k]["dequant"] for k in tensors})))
        print("NNCodec DQ", points[-1], flush=True)
    return points


def plot_savings(res, path, title):
    """Rate saving against NNCodec DQ at equal SNR (%) for every (method, λ), against SNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in res.settings["methods"]:
        for lam in sorted({m["lam"] for m in res.model if m["method"] == method}):
            pts = sorted((m["snr_db"], m["saving_vs_nncodec_pct"]) for m in res.model
                         if m["method"] == method and m["lam"] == lam and m.get("saving_vs_nncodec_pct") is not None)
            if pts:
                ax.plot(*zip(*pts), "-o", ms=3, label=f"{method.upper()} λ={lam:g}")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(3, color="gray", ls=":", lw=0.8, label="target +3%")
    ax.set_xlabel("SNR (dB)")
    ax.set_ylabel("fewer bits than NNCodec DQ at equal SNR (%)")
    ax.grid(alpha=0.3)
    ax.set_title(title)
    save_figure(fig, ax, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: the tiny random model, two QPs")
    ap.add_argument("--qps", default=None, help="default -38,-34,-30,-26,-22 (--tiny: -34,-26)")
    ap.add_argument("--dq-lams", default=None, help="default 0,0.3 (--tiny: 0.3)")
    ap.add_argument("--urq-lams", default=None, help="default 0,0.1 (--tiny: 0.1)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.qps is None:
        args.qps = "-34,-26" if args.tiny else "-38,-34,-30,-26,-22"
    if args.dq_lams is None:
        args.dq_lams = "0.3" if args.tiny else "0,0.3"
    if args.urq_lams is None:
        args.urq_lams = "0.1" if args.tiny else "0,0.1"
    info = machine_info()
    if args.tiny:
        model, tensors = "tiny random", {k: v for k, v in tiny_model().items() if v.ndim == 2}
    else:
        model, tensors = load_default_model_2d()
    qps = [int(q) for q in args.qps.split(",")]
    steps = [step_from_qp(q) for q in qps]
    S = gpucabac.DEFAULT_SLICE_SIZE
    t0 = time.perf_counter()
    parts = {}
    for method, lams in (("dq", args.dq_lams), ("urq", args.urq_lams)):
        lam_list = [float(v) for v in lams.split(",") if v.strip()]
        if not lam_list:
            continue
        t = time.perf_counter()
        parts[method] = gpucabac.sweep(tensors, steps, lam_list, methods=(method,), slice_size=S)
        print(f"{method}: {time.perf_counter() - t:.0f} s", flush=True)
    rows_all = [r for p in parts.values() for r in p.rows]
    res = gpucabac.SweepResult(next(iter(parts.values())).settings, rows_all, [m for p in parts.values() for m in p.model])
    res.settings.update(methods=list(parts), lams={m: p.settings["lams"] for m, p in parts.items()}, qps=qps, model=model)

    nnc_pts = nncodec_dq_points(tensors, qps)
    if nnc_pts:
        res.extra["nncodec"] = [dict(label="NNCodec 2.1.3 DQ (param-opt, 1 NDU/tensor)", points=nnc_pts)]
    res.settings["seconds"] = time.perf_counter() - t0

    # savings at equal SNR on each of our settings (and on the Pareto front of each method)
    table, summary = [], {}
    nnc_curve = [(p["bpw"], p["snr_db"]) for p in nnc_pts]
    for method in parts:
        ms = sorted((m for m in res.model if m["method"] == method), key=lambda m: (m["lam"], m["step"]))
        for m in ms:
            ref = interp_bpw(nnc_curve, m["snr_db"]) if nnc_curve else None
            sav = None if ref is None else 100 * (1 - m["exact_bpw"] / ref)
            m["nncodec_bpw_at_equal_snr"] = ref
            m["saving_vs_nncodec_pct"] = sav
            table.append([method.upper(), f"{m['step']:.6g}", f"{m['lam']:g}", f"{m['exact_bpw']:.4f}", f"{m['est_bpw']:.4f}",
                          f"{m['snr_db']:.2f}", "-" if ref is None else f"{ref:.4f}", "-" if sav is None else f"{sav:+.2f}%"])
        for lam in sorted({m["lam"] for m in ms}):
            s = [m["saving_vs_nncodec_pct"] for m in ms if m["lam"] == lam and m["saving_vs_nncodec_pct"] is not None
                 and 2 <= m["exact_bpw"] <= 6.5]
            summary[f"{method} lam={lam:g}"] = dict(min=min(s) if s else None, mean=float(np.mean(s)) if s else None, n=len(s))
    d = out_dir(args.out, args.tiny)
    res.extra["savings_summary"] = summary
    res.to_json(d / "rd_minilm.json")
    try:
        plot_sweeps([d / "rd_minilm.json"], d / "rd_minilm.png", title=f"{model}: RD, exact rates, slice {S}")
        if nnc_pts:
            plot_savings(res, d / "rd_minilm_savings.png", f"{model}: rate saving vs NNCodec DQ (exact rates)")
    except (gpucabac.InputError, ImportError) as e:  # matplotlib missing
        print(e)
    info["loadavg_end"] = _common.loadavg()
    md = header_md("RD curves vs NNCodec DQ", info, model, dict(qps=qps, slice_size=S, numel=res.settings["numel"],
                                                                seconds=round(res.settings["seconds"])))
    md += md_table(["method", "step", "λ", "exact bpw", "est bpw", "SNR dB", "NNCodec bpw at equal SNR", "saving"], table)
    md += "\n\nNNCodec points: " + ", ".join(f"QP {p['qp']}: {p['bpw']:.4f} bpw, {p['snr_db']:.2f} dB" for p in nnc_pts)
    md += "\n\nSavings at equal SNR for points with 2–6.5 bpw inside NNCodec's SNR range:\n\n"
    md += md_table(["setting", "min saving %", "mean saving %", "points"],
                   [[k, "-" if v["min"] is None else f"{v['min']:+.2f}", "-" if v["mean"] is None else f"{v['mean']:+.2f}", str(v["n"])]
                    for k, v in summary.items()])
    atomic_write_bytes(d / "rd_minilm.md", (md + "\n").encode())
    print(md)
    print(f"wrote {d / 'rd_minilm.json'}, .md, .png")


if __name__ == "__main__":
    main()
