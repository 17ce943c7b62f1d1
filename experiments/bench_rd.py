"""Speed of the vectorised RD quantizer: one call over 64 steps × 4 lambdas against 256
single-setting calls, on the default model's 2-D tensors (a stated subset on small machines).

What is timed: the RD quantizer only (`rdquant.rd_quantize_tensor`, rates and distortions, no
levels), after a warm-up call of the same shapes (compilation excluded, reported separately). The
per-step context initialisations are chosen once beforehand (numba, timed separately) and passed to
both variants, so both do identical work. Every single-setting result is checked against the
vectorised one. `--kernel` picks the quantizer's kernel (rdquant: "auto" is the numba kernel on a
CPU, "jax" the JAX one; both give the same results). NNCodec (if experiments/.nncodec-venv exists)
is timed on the same tensor quantizing + coding one QP per call (its quantizer has no vectorised
sweep), extrapolated to 256.

    python experiments/bench_rd.py [--tiny] [--tensors N] [--single-subset M] [--kernel K] [--out DIR]
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401
import numpy as np

from _common import header_md, load_default_model_2d, machine_info, md_table, out_dir, tiny_model, write_results

import gpucabac
from gpucabac import rdquant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: one small random tensor, 8 x 2 settings")
    ap.add_argument("--tensors", type=int, default=1, help="how many 384x384 tensors of the model (subset)")
    ap.add_argument("--single-subset", type=int, default=16,
                    help="time this many of the single-setting calls and extrapolate (0: all)")
    ap.add_argument("--methods", default="urq,dq")
    ap.add_argument("--model", default=None, help="a packaged name, a model file or a .gcb (default: minilm)")
    ap.add_argument("--kernel", default="auto", choices=rdquant.KERNELS, help="the quantizer's kernel (default: auto)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = machine_info()
    import jax

    if args.tiny:
        model, tensors = "tiny random", {"fc1.weight": tiny_model()["fc1.weight"]}
        qps, lams = list(range(-40, -32)), [0.0, 0.1]
    else:
        model, all_t = load_default_model_2d(args.model)
        names = [n for n, t in all_t.items() if t.shape == (384, 384)][: args.tensors]
        tensors = {n: all_t[n] for n in names}
        full_numel = sum(t.size for t in all_t.values())
        qps, lams = [-48 + i * 0.5 for i in range(64)], [0.0, 0.05, 0.1, 0.2]
    # 64 steps: half-QP spacing (2^(1/8) ratio) from QP -48 (bit depth ~9) to QP -16.5 (~1.5 bpw)
    steps = [float(2.0 ** (q / 4.0)) for q in qps]
    numel = sum(t.size for t in tensors.values())
    S = gpucabac.DEFAULT_SLICE_SIZE
    rows, results = [], {}
    for method in args.methods.split(","):
        dq = method == "dq"
        t0 = time.perf_counter()
        inits = {n: np.stack([rdquant.initial_context(t, s, dq=dq, slice_size=min(S, t.size), num_gt_flags=11)
                              for s in steps]) for n, t in tensors.items()}
        t_init = time.perf_counter() - t0

        def vec():
            return {n: rdquant.rd_quantize_tensor(t, steps, lams, dq=dq, slice_size=S, ctx_init=inits[n],
                                                  with_levels=False, max_lanes=4096, kernel=args.kernel)
                    for n, t in tensors.items()}

        t0 = time.perf_counter()
        vec()
        t_compile = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = vec()
        t_vec = time.perf_counter() - t0
        settings = [(k, l_) for k in range(len(steps)) for l_ in range(len(lams))]
        # an evenly spread subset that visits every lambda (lam = 0 costs less than the others)
        pick = np.unique(np.linspace(0, len(settings) - 1, max(1, args.single_subset)).round().astype(int))
        subset = settings if args.single_subset <= 0 else [settings[i] for i in pick]

        def single(k, l_):
            return {n: rdquant.rd_quantize_tensor(t, [steps[k]], [lams[l_]], dq=dq, slice_size=S,
                                                  ctx_init=inits[n][k], with_levels=False, kernel=args.kernel)
                    for n, t in tensors.items()}

        single(*subset[0])  # compile the single-setting shape
        t0 = time.perf_counter()
        worst = 0.0
        for k, l_ in subset:
            r = single(k, l_)
            for n in tensors:
                a, b = r[n].bits[0, 0], out[n].bits[k, l_]
                worst = max(worst, abs(a - b) / max(b, 1.0))
        t_single = (time.perf_counter() - t0) * len(settings) / len(subset)
        ok = worst < 1e-5
        # the same sweep with exact rates (levels kept and coded): the estimate against the real coder
        swept = gpucabac.sweep(tensors, steps, lams, methods=(method,), slice_size=S)
        est_err = [abs(m["est_bits"] - m["exact_bits"]) / m["exact_bits"] for m in swept.model]
        results[method] = dict(t_context_init=t_init, t_compile=t_compile, t_vectorised=t_vec,
                               t_single_all=t_single, single_calls_timed=len(subset), speedup=t_single / t_vec,
                               weight_settings_per_s=numel * len(settings) / t_vec, max_rel_diff_bits=worst,
                               validated=ok, est_vs_exact_max=max(est_err), est_vs_exact_mean=float(np.mean(est_err)),
                               est_within_2pct_all=bool(max(est_err) <= 0.02), settings_checked=len(est_err))
        rows.append([method.upper(), f"{t_vec:.1f}", f"{t_single:.1f}" + ("" if len(subset) == len(settings) else f" (from {len(subset)})"),
                     f"{t_single / t_vec:.2f}x", f"{numel * len(settings) / t_vec / 1e6:.2f}", f"{t_init:.1f}", f"{t_compile:.1f}",
                     "yes" if ok else f"NO ({worst:.2g})",
                     f"{100 * max(est_err):.2f}% / {100 * float(np.mean(est_err)):.2f}% ({len(est_err)} settings)"])
        print(rows[-1], flush=True)
        if not args.tiny:
            results[method]["full_model_extrapolated_s"] = full_numel * len(settings) / results[method]["weight_settings_per_s"]
    nnc = None
    from nncodec_env import nncodec_python_if_present, run_nncodec

    py = nncodec_python_if_present()
    if py is not None and not args.tiny:
        ts = []
        for qp in (-40, -36, -32, -28):
            r, _ = run_nncodec(tensors, dict(mode="quant", qp=qp, dq=True, repeats=1), python=py)
            ts.append(sum(t["t_quant"] + t["t_enc"] for t in r["tensors"]))
        per = float(np.mean(ts))
        nnc = dict(qps=[-40, -36, -32, -28], t_per_setting=per, t_256_settings=256 * per,
                   note="NNCodec DQ (distortion-only trellis, its default) quantize + encode per QP, single thread")
        rows.append(["NNCodec DQ (quant+enc per QP)", "-", f"{256 * per:.1f} (from 4)", "-", f"{numel / per / 1e6:.2f}", "-", "-", "-", "-"])
    info["loadavg_end"] = _common.loadavg()
    settings_d = dict(steps=len(steps), lams=lams, slice_size=S, tensors=list(tensors), numel=numel,
                      jax=jax.__version__, jax_backend=jax.default_backend(),
                      kernel=rdquant._kernel_of(args.kernel, True))
    md = header_md("RD quantizer: one vectorised sweep call vs single-setting calls", info, model, settings_d)
    md += md_table(["method", "vectorised s", f"{len(steps) * len(lams)} single calls s", "speed-up", "M weight-settings/s",
                    "context init s", "first call s (compile + run)", "validated",
                    "estimated vs exact rate, max / mean"], rows)
    if not args.tiny:
        md += "\n\nExtrapolated to the whole model (2-D tensors, %d weights, 256 settings) at the measured rate: %s.\n" % (
            full_numel, ", ".join(f"{m.upper()} {r['full_model_extrapolated_s'] / 60:.0f} min" for m, r in results.items()))
    if not args.tiny:
        md += "\nSubset: the first %d of the model's 384x384 tensors (this machine: %s CPUs, JAX on %s).\n" % (
            len(tensors), info["cpu_count"], jax.default_backend())
    d = out_dir(args.out, args.tiny)
    jp, mp = write_results(d, "bench_rd", dict(machine=info, settings=settings_d, results=results, nncodec=nnc), md)
    print(md)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
