"""CPU throughput of gpucabac (1 and 2 threads) beside NNCodec 2.1.3's C++ core, same levels.

On the default model's 2-D float32 weights, URQ rounding at QP -32 (qp_density 2):
  * ours: gpucabac.encode (rounding quantization + coding + container) and gpucabac.decode
    (to dequantized float32) at the default slice size, with 1 and 2 numba threads;
  * NNCodec: quantLayer, encodeLayer (param_opt on, its default; and off) and decodeLayer,
    single-threaded, one CABAC codeword per tensor, on the same levels.
Numba compilation is excluded (warm-up first); best of --repeats; every timed decode is validated.

    python experiments/bench_cpu.py                 # full run (builds the NNCodec venv if missing)
    python experiments/bench_cpu.py --qp -32 -38
    python experiments/bench_cpu.py --tiny          # seconds, small random model; NNCodec only if its venv exists

Writes bench_cpu.{json,md} to experiments/results (full run) or a temp dir (--tiny; see --out).
Targets: our decode on 2 threads >= 1.5x NNCodec decode; our encode (rounding) >= NNCodec encode.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

QP_DENSITY = 2
NUM_GT_FLAGS = 11
DECODE_TARGET = 1.5
ENCODE_TARGET = 1.0


def _best(fn, repeats, check=None):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        if check is not None:
            check(out)
        best = min(best, dt)
    return best, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small random model; never builds the NNCodec venv (smoke test)")
    ap.add_argument("--no-nncodec", action="store_true")
    ap.add_argument("--qp", type=int, nargs="+", default=[-32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slice-size", type=int, default=None, help="ours: slice size (default: DEFAULT_SLICE_SIZE)")
    ap.add_argument("--also-one-slice", action="store_true", help="ours: add a one-slice-per-tensor row")
    ap.add_argument("--no-param-opt-off", action="store_true", help="skip NNCodec's param_opt=0 run")
    ap.add_argument("--out", default=None, help="output directory")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import gpucabac

    try:
        import numba
        max_threads = numba.config.NUMBA_NUM_THREADS
    except Exception:  # pragma: no cover
        max_threads = None
    threads = [t for t in args.threads if max_threads is None or t <= max_threads]
    if threads != args.threads:
        print(f"[bench] numba allows at most {max_threads} threads; using {threads}", file=sys.stderr)

    use_nn = not args.no_nncodec
    if use_nn:
        from nncodec_env import ensure_nncodec_python, nncodec_python_if_present, run_nncodec
        nn_py = nncodec_python_if_present() if args.tiny else ensure_nncodec_python()
        if nn_py is None:
            print("[bench] NNCodec venv not present: --tiny skips NNCodec", file=sys.stderr)
            use_nn = False
    if args.tiny:
        model, ts = "tiny random (seeded)", C.tiny_model()
    else:
        model, ts = C.load_default_model_2d()
    names = list(ts)
    numel = sum(v.size for v in ts.values())
    slice_size = args.slice_size or gpucabac.DEFAULT_SLICE_SIZE
    configs = [(slice_size, t) for t in threads]
    if args.also_one_slice:
        configs.append((None, threads[0]))

    info = C.machine_info()
    settings = {"qp": args.qp, "qp_density": QP_DENSITY, "num_gt_flags": NUM_GT_FLAGS, "quantizer": "URQ rounding",
                "repeats": args.repeats, "threads": threads, "slice_size": slice_size,
                "tensors": len(ts), "weights": numel,
                "nncodec": "2.1.3 C++ core, single thread, per-tensor best summed" if use_nn else "skipped"}
    head = C.header_md("gpucabac CPU throughput vs NNCodec", info, model, settings)
    print(head)
    if info["loadavg_start"] and info["loadavg_start"][0] > 0.5:
        print(f"[bench] WARNING: load average {info['loadavg_start']}: other processes compete for the "
              f"{info['cpu_count']} CPUs; timings will be pessimistic", file=sys.stderr)

    # ---- warm-up: numba compilation (all code paths used below) on a small model -------------------
    warm = C.tiny_model(seed=1)
    t0 = time.perf_counter()
    for ss, t in configs:
        d = gpucabac.encode(warm, qp=args.qp[0], qp_density=QP_DENSITY, slice_size=ss,
                            num_gt_flags=NUM_GT_FLAGS, threads=t)
        gpucabac.decode(d, threads=t)
    print(f"[bench] warm-up (JIT) {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    payload = {"machine": info, "model": model, "settings": settings, "qps": []}
    rows, verdicts = [], []
    ok_all = True
    for qp in args.qp:
        step = float(gpucabac.step_from_qp(qp, QP_DENSITY))
        rec = {"qp": qp, "step": step, "ours": [], "nncodec": {}}
        ref = None
        ours_by_threads = {}
        data_ref = None
        for ss, t in configs:
            enc = lambda: gpucabac.encode(ts, qp=qp, qp_density=QP_DENSITY, slice_size=ss,  # noqa: E731
                                          num_gt_flags=NUM_GT_FLAGS, threads=t)
            t_enc, data = _best(enc, args.repeats)
            if ref is None:
                ref = gpucabac.quantize(ts, qp=qp, qp_density=QP_DENSITY, slice_size=ss,
                                        num_gt_flags=NUM_GT_FLAGS)

            def check(out, ref=ref):
                bad = [n for n in names if not np.array_equal(out[n], ref[n])]
                if bad:
                    raise AssertionError(f"decode mismatch (qp {qp}) in {bad[:5]}")

            t_dec, _ = _best(lambda: gpucabac.decode(data, threads=t), args.repeats, check)  # noqa: B023
            if ss == slice_size:
                if data_ref is None:
                    data_ref = data
                elif data != data_ref:
                    raise AssertionError(f"qp {qp}: encode with {t} threads gave different bytes")
            r = {"slice_size": ss, "threads": t, "t_enc": t_enc, "t_dec": t_dec, "bytes": len(data),
                 "enc_mws": numel / t_enc / 1e6, "dec_mws": numel / t_dec / 1e6}
            rec["ours"].append(r)
            if ss == slice_size:
                ours_by_threads[t] = r
            rows.append([qp, "gpucabac", f"slice {ss}" if ss else "1 slice/tensor", t,
                         "—", f"{r['enc_mws']:.2f}", f"{r['dec_mws']:.2f}", len(data),
                         f"{8 * len(data) / numel:.4f}"])
            print(f"[bench] qp {qp} ours slice={ss} threads={t}: enc {r['enc_mws']:.2f} Mw/s, "
                  f"dec {r['dec_mws']:.2f} Mw/s", file=sys.stderr)

        if use_nn:
            levels = {n: np.asarray(gpucabac.quantize_levels(ts[n], step, dq=False, slice_size=None))
                      .astype(np.int32).reshape(ts[n].shape) for n in names}
            base = {"qp": qp, "qp_density": QP_DENSITY, "dq": False, "repeats": args.repeats,
                    "cabac_unary_length_minus1": NUM_GT_FLAGS - 1}
            variants = [1] if args.no_param_opt_off else [1, 0]
            for po in variants:
                res, arr = run_nncodec(ts, {**base, "mode": "quant", "param_opt": po, "return_dequant": False},
                                       python=nn_py, want_arrays=True)
                mism = sum(int(np.count_nonzero(arr[n]["levels"] != levels[n])) for n in names)
                t_quant = sum(t["t_quant"] for t in res["tensors"])
                if mism:
                    print(f"[bench] qp {qp}: NNCodec levels differ from ours in {mism} weights; "
                          "timing NNCodec's coder on OUR levels", file=sys.stderr)
                    res, _ = run_nncodec(levels, {**base, "mode": "levels", "param_opt": po}, python=nn_py)
                if not all(t["roundtrip_ok"] for t in res["tensors"]):
                    raise AssertionError("NNCodec round trip failed")
                t_enc = sum(t["t_enc"] for t in res["tensors"])
                t_dec = sum(t["t_dec"] for t in res["tensors"])
                nb = sum(t["bytes"] for t in res["tensors"])
                r = {"param_opt": po, "t_quant": t_quant, "t_enc": t_enc, "t_dec": t_dec, "bytes": nb,
                     "levels_mismatch": mism, "quant_mws": numel / t_quant / 1e6,
                     "enc_mws": numel / t_enc / 1e6, "quant_enc_mws": numel / (t_quant + t_enc) / 1e6,
                     "dec_mws": numel / t_dec / 1e6}
                rec["nncodec"][f"param_opt_{po}"] = r
                rows.append([qp, "NNCodec 2.1.3", f"1 NDU/tensor, param_opt {po}", 1,
                             f"{r['quant_mws']:.1f}", f"{r['enc_mws']:.2f} ({r['quant_enc_mws']:.2f} w/ quant)",
                             f"{r['dec_mws']:.2f}", nb, f"{8 * nb / numel:.4f}"])
            nn = rec["nncodec"]["param_opt_1"]
            ratios = {}
            for t, r in ours_by_threads.items():
                ratios[f"decode_{t}t"] = r["dec_mws"] / nn["dec_mws"]
                ratios[f"encode_{t}t"] = r["enc_mws"] / nn["enc_mws"]
                ratios[f"encode_{t}t_vs_quant_enc"] = r["enc_mws"] / nn["quant_enc_mws"]
            rec["ratios"] = ratios
            t_hi = max(ours_by_threads)
            dec_ok = ratios[f"decode_{t_hi}t"] >= DECODE_TARGET
            enc_ok = ratios[f"encode_{t_hi}t"] >= ENCODE_TARGET
            ok_all &= dec_ok and enc_ok
            rec["targets"] = {"decode": dec_ok, "encode": enc_ok, "threads": t_hi}
            for t in sorted(ours_by_threads):
                verdicts.append([qp, t, f"{ratios[f'decode_{t}t']:.2f}×",
                                 ("PASS" if dec_ok else "FAIL") if t == t_hi else "",
                                 f"{ratios[f'encode_{t}t']:.2f}× ({ratios[f'encode_{t}t_vs_quant_enc']:.2f}× vs quant+enc)",
                                 ("PASS" if enc_ok else "FAIL") if t == t_hi else ""])
        payload["qps"].append(rec)

    info["loadavg_end"] = C.loadavg()
    head = C.header_md("gpucabac CPU throughput vs NNCodec", info, model, settings)
    md = [head,
          "## Throughput (million weights/s; ours: whole-model wall time of encode()/decode(); "
          "NNCodec: sum over tensors of per-tensor best, C++ core only)", "",
          C.md_table(["QP", "codec", "config", "threads", "quant Mw/s", "encode Mw/s", "decode Mw/s",
                      "bytes", "bits/weight"], rows), ""]
    if verdicts:
        md += [f"## Ratios vs NNCodec (param_opt on). Targets: decode ≥ {DECODE_TARGET}× on "
               f"{max(threads)} threads; encode ≥ {ENCODE_TARGET}× (ours includes rounding; NNCodec encodeLayer only)",
               "", C.md_table(["QP", "ours threads", "decode ratio", "decode target", "encode ratio",
                               "encode target"], verdicts), "",
               f"Overall: {'PASS' if ok_all else 'FAIL'}"]
    text = "\n".join(md)
    print(text[text.index("## "):])
    payload["pass"] = ok_all if verdicts else None
    d = C.out_dir(args.out, args.tiny)
    jp, mp = C.write_results(d, "bench_cpu", payload, text)
    print(f"\nwrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
