"""Would a per-tensor scan order pay? Bytes of every 2-D tensor of the default model coded in its
row-major order (the format's only order) and transposed, DQ, at a few QPs.

The significance and sign contexts follow the previous level, so the order decides which
neighbour predicts a weight: row-major pairs the inputs of one output, transposed the outputs of
one input. Format version 2 signals a column scan per tensor (for a 2-D tensor: its transpose), and
`encode(scan="auto")` codes each tensor the cheaper way; this measures what that saves.

    python experiments/scan_order.py [--model M] [--qps -36,-30,-26] [--out DIR]
    python experiments/scan_order.py --tiny         # smoke run: the tiny random model, QPs -36,-26

Writes scan_order.{json,md} to experiments/results (full run) or a temp dir (--tiny; see --out).
"""

from __future__ import annotations

import argparse

import numpy as np

import _common
from _common import header_md, load_default_model_2d, machine_info, md_table, out_dir, tiny_model, write_results

import gpucabac


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: the tiny random model, two QPs")
    ap.add_argument("--model", default=None)
    ap.add_argument("--qps", default=None, help="default -36,-30,-26 (--tiny: -36,-26)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.qps is None:
        args.qps = "-36,-26" if args.tiny else "-36,-30,-26"
    info = machine_info()
    if args.tiny:
        model, coded = "tiny random", {k: v for k, v in tiny_model().items() if v.ndim == 2}
    else:
        model, coded = load_default_model_2d(args.model)
    numel = sum(v.size for v in coded.values())
    rows, results = [], []
    for qp in (int(q) for q in args.qps.split(",")):
        per = {}
        for name, x in coded.items():
            rm = len(gpucabac.encode({name: x}, qp=qp, dq=True))
            tr = len(gpucabac.encode({name: np.ascontiguousarray(x.T)}, qp=qp, dq=True))
            per[name] = (rm, tr)
        rm_total = sum(a for a, _ in per.values())
        tr_total = sum(b for _, b in per.values())
        best_total = sum(min(a, b) for a, b in per.values())
        top = sorted(per, key=lambda n: per[n][1] / per[n][0])[:3]
        r = dict(qp=qp, row_major_bytes=rm_total, transposed_bytes=tr_total, best_of_both_bytes=best_total,
                 bpw=8 * rm_total / numel, per_tensor=per)
        results.append(r)
        rows.append([qp, f"{8 * rm_total / numel:.4f}", f"{100 * (tr_total / rm_total - 1):+.2f}%",
                     f"{100 * (best_total / rm_total - 1):+.2f}%",
                     ", ".join(f"{n} {100 * (per[n][1] / per[n][0] - 1):+.1f}%" for n in top)])
        print(rows[-1], flush=True)
    info["loadavg_end"] = _common.loadavg()
    md = header_md("Scan order: row-major vs transposed, per tensor", info, model, dict(qps=args.qps, dq=True))
    md += ("Each 2-D tensor coded alone (one-tensor containers, headers included), DQ, default slice size. "
           "Transposed: every tensor transposed; best of both: each tensor the cheaper way.\n\n")
    md += md_table(["QP", "row-major bpw", "all transposed", "best of both", "largest savings"], rows)
    md += "\n"
    write_results(out_dir(args.out, args.tiny), "scan_order", dict(info=info, model=model, numel=numel, results=results), md)
    print(md)


if __name__ == "__main__":
    main()
