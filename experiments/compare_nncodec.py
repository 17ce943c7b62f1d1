"""Compressed size of gpucabac against NNCodec 2.1.3 on the default model's 2-D weights.

Rows, per QP (qp_density 2):
  * URQ (round half away from zero), one slice per tensor: NNCodec's bytes against ours on the
    SAME levels (NNCodec's own quantLayer levels are checked to equal ours); acceptance: ours
    within 0.5% of NNCodec over the model.
  * DQ on, each codec its own trellis quantizer: bits/weight and SNR.
  * ours at the default slice size (URQ and DQ).

    python experiments/compare_nncodec.py             # full run, builds the NNCodec venv if missing
    python experiments/compare_nncodec.py --tiny      # small random model; NNCodec only if its venv exists

Writes compare_nncodec.{json,md} to experiments/results (full run) or a temp dir (--tiny; see --out).
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
TOLERANCE_PCT = 0.5
LARGE_TENSOR = 65536  # also report the worst tensor among those with at least this many weights


def _ours_sizes(gpucabac, data: bytes) -> dict[str, dict]:
    meta = gpucabac.info(data)
    out = {}
    for t in meta.tensors:
        out[t.name] = {"coded_bytes": int(t.coded_bytes), "header_bytes": int(t.header_bytes),
                       "mode": t.mode, "num_slices": int(t.num_slices), "slice_size": t.slice_size}
    return out


def _ours_run(gpucabac, ts, *, qp, dq, slice_size):
    t0 = time.perf_counter()
    data = gpucabac.encode(ts, qp=qp, qp_density=QP_DENSITY, dq=dq, slice_size=slice_size,
                           num_gt_flags=NUM_GT_FLAGS)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    dec = gpucabac.decode(data)
    t_dec = time.perf_counter() - t0
    sizes = _ours_sizes(gpucabac, data)
    return data, dec, sizes, t_enc, t_dec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small random model; never builds the NNCodec venv")
    ap.add_argument("--no-nncodec", action="store_true", help="skip NNCodec (ours only)")
    ap.add_argument("--qp", type=int, nargs="+", default=[-32, -38])
    ap.add_argument("--no-dq", action="store_true", help="skip the DQ rows")
    ap.add_argument("--out", default=None, help="output directory")
    args = ap.parse_args(argv)

    import gpucabac
    from nncodec_env import ensure_nncodec_python, nncodec_python_if_present, run_nncodec

    if args.tiny:
        model, ts = "tiny random (seeded)", C.tiny_model()
    else:
        model, ts = C.load_default_model_2d()
    names = list(ts)
    numel = sum(v.size for v in ts.values())
    default_slice = gpucabac.DEFAULT_SLICE_SIZE

    nn_py = None
    if not args.no_nncodec:
        nn_py = nncodec_python_if_present() if args.tiny else ensure_nncodec_python()
        if nn_py is None:
            print("[compare] NNCodec venv not present: --tiny skips NNCodec", file=sys.stderr)

    info = C.machine_info()
    settings = {"qp": args.qp, "qp_density": QP_DENSITY, "num_gt_flags": NUM_GT_FLAGS,
                "nncodec": "2.1.3 C++ core, param_opt=1, scan_order=0, profile 1, row skip off, "
                           "lambda_scale=0, QP offset bins coded" if nn_py else "skipped",
                "default_slice_size": default_slice, "tensors": len(ts), "weights": numel}
    print(C.header_md("gpucabac vs NNCodec: compressed size", info, model, settings))

    payload = {"machine": info, "model": model, "settings": settings, "qps": []}
    accept_rows, rd_rows, notes = [], [], []
    all_pass = True
    for qp in args.qp:
        step = float(gpucabac.step_from_qp(qp, QP_DENSITY))
        rec = {"qp": qp, "step": step}
        # ---- ours, URQ, one slice per tensor --------------------------------------------------
        levels = {n: np.asarray(gpucabac.quantize_levels(ts[n], step, dq=False, slice_size=None))
                  .astype(np.int32).reshape(ts[n].shape) for n in names}
        data, dec, sizes, t_enc, t_dec = _ours_run(gpucabac, ts, qp=qp, dq=False, slice_size=None)
        bad = [n for n in names
               if not np.array_equal(dec[n], (levels[n] * np.float32(step)).astype(np.float32))]
        if bad:
            raise AssertionError(f"QP {qp}: ours decode != quantize_levels*step for {bad[:5]}")
        ours_total = sum(sizes[n]["coded_bytes"] + sizes[n]["header_bytes"] for n in names)
        ours_coded = sum(sizes[n]["coded_bytes"] for n in names)
        snr_urq = C.snr_db(ts, dec)
        rec["ours_urq_1slice"] = {"file_bytes": len(data), "coded_bytes": ours_coded, "tensor_bytes": ours_total,
                                  "bpw": 8 * ours_total / numel, "snr_db": snr_urq,
                                  "per_tensor": sizes, "t_enc": t_enc, "t_dec": t_dec}
        # ---- NNCodec on the same levels ----------------------------------------------------------
        if nn_py:
            base = {"qp": qp, "qp_density": QP_DENSITY, "param_opt": 1, "repeats": 1,
                    "cabac_unary_length_minus1": NUM_GT_FLAGS - 1}
            rq, arr = run_nncodec(ts, {**base, "mode": "quant", "dq": False, "return_dequant": False},
                                  python=nn_py, want_arrays=True)
            assert abs(rq["tensors"][0]["step"] - step) == 0.0, (rq["tensors"][0]["step"], step)
            mism = {n: int(np.count_nonzero(arr[n]["levels"] != levels[n])) for n in names}
            n_mism = sum(mism.values())
            if n_mism:
                print(f"[compare] QP {qp}: NNCodec's quantLayer levels differ from ours in {n_mism} weights "
                      f"({sum(1 for v in mism.values() if v)} tensors); coding OUR levels with NNCodec",
                      file=sys.stderr)
                rq, _ = run_nncodec(levels, {**base, "mode": "levels", "dq": False}, python=nn_py)
            nbytes = {t["name"]: t["bytes"] for t in rq["tensors"]}
            if not all(t["roundtrip_ok"] for t in rq["tensors"]):
                raise AssertionError("NNCodec round trip failed")
            nn_total = sum(nbytes.values())
            per = []
            for n in names:
                o_all = sizes[n]["coded_bytes"] + sizes[n]["header_bytes"]
                per.append({"name": n, "numel": int(ts[n].size), "nncodec": nbytes[n],
                            "ours_coded": sizes[n]["coded_bytes"], "ours_header": sizes[n]["header_bytes"],
                            "diff_pct": 100 * (o_all / nbytes[n] - 1),
                            "diff_coded_pct": 100 * (sizes[n]["coded_bytes"] / nbytes[n] - 1)})
            diff = 100 * (ours_total / nn_total - 1)
            diff_coded = 100 * (ours_coded / nn_total - 1)
            worst = max(per, key=lambda r: r["diff_pct"])
            worst_c = max(per, key=lambda r: r["diff_coded_pct"])
            large = [r for r in per if r["numel"] >= LARGE_TENSOR]
            worst_l = max(large, key=lambda r: r["diff_pct"]) if large else None
            ok = diff <= TOLERANCE_PCT
            all_pass &= ok
            rec["nncodec_urq"] = {"bytes": nn_total, "bpw": 8 * nn_total / numel,
                                  "levels_mismatch_vs_ours": n_mism, "levels_mismatch_per_tensor": mism,
                                  "per_tensor": per}
            rec["urq_same_levels"] = {"diff_pct": diff, "diff_coded_pct": diff_coded,
                                      "worst_tensor": worst, "worst_tensor_coded": worst_c,
                                      f"worst_tensor_ge_{LARGE_TENSOR}": worst_l,
                                      "pass": ok, "tolerance_pct": TOLERANCE_PCT}
            if worst_l:
                notes.append(f"QP {qp}: worst tensor with ≥ {LARGE_TENSOR} weights (total): "
                             f"{worst_l['name']} {worst_l['diff_pct']:+.3f}%")
            accept_rows.append([qp, f"{step:.6g}", nn_total, ours_coded, ours_total - ours_coded, ours_total,
                                f"{diff:+.3f}%", f"{diff_coded:+.3f}%",
                                f"{worst['name']} {worst['diff_pct']:+.2f}%",
                                f"{worst_c['name']} {worst_c['diff_coded_pct']:+.2f}%",
                                n_mism, "PASS" if ok else "FAIL"])
            rd_rows.append([qp, "NNCodec URQ (1 NDU/tensor)", f"{8 * nn_total / numel:.4f}", f"{snr_urq:.2f}"])
        rd_rows.append([qp, "ours URQ, 1 slice/tensor", f"{8 * ours_total / numel:.4f}", f"{snr_urq:.2f}"])
        # ---- ours, URQ, default slice size -------------------------------------------------------
        data_s, dec_s, sizes_s, te, td = _ours_run(gpucabac, ts, qp=qp, dq=False, slice_size=default_slice)
        tot_s = sum(v["coded_bytes"] + v["header_bytes"] for v in sizes_s.values())
        snr_s = C.snr_db(ts, dec_s)
        rec["ours_urq_default_slice"] = {"file_bytes": len(data_s), "tensor_bytes": tot_s,
                                         "coded_bytes": sum(v["coded_bytes"] for v in sizes_s.values()),
                                         "bpw": 8 * tot_s / numel, "snr_db": snr_s, "t_enc": te, "t_dec": td}
        rd_rows.append([qp, f"ours URQ, slice {default_slice}", f"{8 * tot_s / numel:.4f}", f"{snr_s:.2f}"])
        # ---- DQ ------------------------------------------------------------------------------------
        if not args.no_dq:
            if nn_py:
                rdq, arr = run_nncodec(ts, {**base, "mode": "quant", "dq": True, "return_dequant": True},
                                       python=nn_py, want_arrays=True)
                if not all(t["roundtrip_ok"] for t in rdq["tensors"]):
                    raise AssertionError("NNCodec DQ round trip failed")
                nb = sum(t["bytes"] for t in rdq["tensors"])
                snr_nn = C.snr_db(ts, {n: arr[n]["dequant"] for n in names})
                rec["nncodec_dq"] = {"bytes": nb, "bpw": 8 * nb / numel, "snr_db": snr_nn,
                                     "t_quant": sum(t["t_quant"] for t in rdq["tensors"])}
                rd_rows.append([qp, "NNCodec DQ (1 NDU/tensor)", f"{8 * nb / numel:.4f}", f"{snr_nn:.2f}"])
            for label, ss in (("1 slice/tensor", None), (f"slice {default_slice}", default_slice)):
                d, dd, sz, te, td = _ours_run(gpucabac, ts, qp=qp, dq=True, slice_size=ss)
                tot = sum(v["coded_bytes"] + v["header_bytes"] for v in sz.values())
                snr = C.snr_db(ts, dd)
                rec[f"ours_dq_{'1slice' if ss is None else 'default_slice'}"] = {
                    "file_bytes": len(d), "tensor_bytes": tot, "bpw": 8 * tot / numel, "snr_db": snr,
                    "t_enc": te, "t_dec": td}
                rd_rows.append([qp, f"ours DQ, {label}", f"{8 * tot / numel:.4f}", f"{snr:.2f}"])
        payload["qps"].append(rec)

    md = [C.header_md("gpucabac vs NNCodec: compressed size", info, model, settings)]
    if accept_rows:
        md += ["## URQ, same levels, one slice (NDU) per tensor; acceptance: ours within "
               f"{TOLERANCE_PCT}% of NNCodec", "",
               "ours = coded payload + per-tensor header record; NNCodec = its CABAC codeword per tensor "
               "(QP offset bins included, NDU/NNR headers not).", "",
               C.md_table(["QP", "step", "NNCodec B", "ours coded B", "ours hdr B", "ours total B",
                           "diff (total)", "diff (coded)", "worst tensor (total)", "worst tensor (coded)",
                           "NNC≠ours levels", "verdict"], accept_rows), ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Rate and distortion (bits/weight over the compared tensors; SNR = 10 log10 Σw²/Σ(w−w')²)", "",
           C.md_table(["QP", "codec / mode", "bits/weight", "SNR dB"], rd_rows), ""]
    if accept_rows:
        md.append(f"Overall: {'PASS' if all_pass else 'FAIL'} (ours within {TOLERANCE_PCT}% of NNCodec at every QP)")
    text = "\n".join(md)
    print(text[text.index("##") if "##" in text else 0:])
    payload["pass"] = all_pass if accept_rows else None
    d = C.out_dir(args.out, args.tiny)
    jp, mp = C.write_results(d, "compare_nncodec", payload, text)
    print(f"\nwrote {jp} and {mp}")
    return 0 if (all_pass or not accept_rows or args.tiny) else 1


if __name__ == "__main__":
    sys.exit(main())
