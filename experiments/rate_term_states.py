"""What the rate term adds to a large trellis: DQ with 8 and 256 states, λ = 0 and λ > 0, on MiniLM.

The rate-aware trellis (gpucabac.rdquant, the adaptive estimator's cost per survivor path) costs
about 110 s per million weights per setting with 256 states on a 2-core CPU, so the whole model
(22.7 M weights, `--all`) takes about 42 min per QP there. By default this runs on a named subset
of its 2-D tensors (one 384×384 attention matrix and both 1536-wide MLP matrices of different
layers, 1.33 M weights), with NNCodec 2.1.3's DQ on the same tensors in the same run. Exact file sizes, default slice size.

    python experiments/rate_term_states.py [--tiny] [--model M] [--all] [--tensors A,B,...] [--variants ...] [--qps ...] [--nncodec-qps ...]

--tiny (a smoke run, results to a temp dir or --out): one 96x64 tensor of the tiny random model
(the rate-aware trellis compiles once per tensor shape, and its cost per weight is above),
variants 8,256,256+lam0.3, QPs -30,-26; NNCodec only if its venv exists.
"""

from __future__ import annotations

import argparse
import time

from _common import header_md, load_default_model_2d, machine_info, md_table, out_dir, tiny_model, write_results
from rd_minilm import interp_bpw
from trellis_states import minilm

import gpucabac

SUBSET = ("encoder.layer.0.attention.self.query.weight", "encoder.layer.2.intermediate.dense.weight",
          "encoder.layer.5.output.dense.weight")


def _pct(v):
    return "-" if v is None else f"{v:+.2f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: a tiny random model")
    ap.add_argument("--model", default=None, help="a model name, file or .gcb (default: the default model)")
    ap.add_argument("--all", action="store_true", help="every 2-D tensor of the model (a GPU run)")
    ap.add_argument("--tensors", default=",".join(SUBSET), help="comma-separated tensor names")
    ap.add_argument("--variants", default=None,
                    help="trellis_states.parse_variant: M[+auto][+lamX] (default 8,8+lam0.3,256,256+lam0.3; --tiny: 8,256,256+lam0.3)")
    ap.add_argument("--qps", default=None, help="default -34,-30,-26,-22,-18 (--tiny: -30,-26)")
    ap.add_argument("--nncodec-qps", default=None, help="NNCodec's QPs when not --qps (its curve must bracket our SNRs)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.variants is None:
        args.variants = "8,256,256+lam0.3" if args.tiny else "8,8+lam0.3,256,256+lam0.3"
    if args.qps is None:
        args.qps = "-30,-26" if args.tiny else "-34,-30,-26,-22,-18"
    info = machine_info()
    t0 = time.perf_counter()
    if args.tiny:
        model, tensors = "tiny random", {"fc1.weight": tiny_model()["fc1.weight"]}
    else:
        model, everything = load_default_model_2d(args.model)
        names = list(everything) if args.all else args.tensors.split(",")
        missing = [n for n in names if n not in everything]
        if missing:
            raise SystemExit(f"no such 2-D tensor in {model}: {', '.join(missing)}")
        tensors = {n: everything[n] for n in names}
    qps = [int(q) for q in args.qps.split(",")]
    variants = args.variants.split(",")
    nnc_qps = qps if args.nncodec_qps is None else [int(q) for q in args.nncodec_qps.split(",")]
    net = minilm(variants, tensors, qps, gpucabac.DEFAULT_SLICE_SIZE, nnc_qps)
    # the rate term's own gain: against the same trellis at λ = 0, at equal SNR
    for variant, pts in net["ours"].items():
        base = net["ours"].get(variant.split("+lam")[0])
        for p in pts:
            ref = interp_bpw([(c["bpw"], c["snr_db"]) for c in base], p["snr_db"]) if base and base is not pts else None
            p["saving_vs_lam0_pct"] = None if ref is None else 100 * (1 - p["bpw"] / ref)
    settings = dict(slice_size=gpucabac.DEFAULT_SLICE_SIZE, qps=qps, nncodec_qps=nnc_qps, variants=variants, tensors=list(tensors),
                    numel=net["numel"], seconds=round(time.perf_counter() - t0))
    md = header_md("The rate term with 8 and 256 trellis states", info, f"{model}, {len(tensors)} 2-D tensors", settings)
    md += "\n\n"
    rows = [[variant, str(p["qp"]), f"{p['bpw']:.4f}", f"{p['snr_db']:.2f}", _pct(p["saving_vs_nncodec_pct"]),
             _pct(p["saving_vs_lam0_pct"]), f"{p['seconds']:.0f}"]
            for variant, pts in net["ours"].items() for p in pts]
    rows += [["NNCodec 2.1.3 DQ", str(p["qp"]), f"{p['bpw']:.4f}", f"{p['snr_db']:.2f}", "", "", ""] for p in net["nncodec"]]
    md += md_table(["variant (states[+lam λ])", "QP", "bpw (file)", "SNR dB", "saving vs NNCodec DQ at equal SNR",
                    "saving vs the same trellis at λ = 0", "encode + decode s"], rows)
    md += ("\n\nSavings are read against the other curve interpolated linearly in SNR; '-' where the point lies "
           "outside that curve's SNR range.\n")
    # a whole-model run is one QP or a few at a time on a CPU: one result file per QP list
    stem = f"rate_term_states_all_qp{'_'.join(map(str, qps))}" if args.all else "rate_term_states"
    write_results(out_dir(args.out, args.tiny), stem, dict(info=info, settings=settings, model=net), md)
    print(md)


if __name__ == "__main__":
    main()
