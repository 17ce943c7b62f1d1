"""Rate overhead of slicing against one slice per tensor, on the default model (docs/design.md §1).

For every slice size S: total container bytes with per-tensor chosen context initialisation
(what gpucabac writes), and with every context starting at preset 0 (p = 1/2), both against the
one-slice-per-tensor container. Writes slice_size_curve_qp<QP>[_dq].{json,md} to experiments/results
(full run) or a temp dir (--tiny: three random 64x96 tensors; see --out).

    python experiments/slice_size_curve.py [--qp -32] [--dq] [--tiny] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys

import numpy as np
from _common import out_dir, write_results

import gpucabac
from gpucabac import codec, container
from gpucabac.binarize import used_contexts

SIZES = [256, 1024, 2048, 4096, 8192, 16384, 65536]


def sized(tensors, step, dq, slice_size, preset0: bool) -> int:
    """Container bytes of the 2-D tensors, with chosen or all-zero context initialisation."""
    total = container.PREAMBLE_SIZE
    for name, x in tensors.items():
        levels = gpucabac.quantize_levels(x, step, dq=dq, slice_size=slice_size)
        s = x.size if slice_size is None else min(slice_size, x.size)
        init = np.zeros(len(used_contexts(11, dq)), np.uint8) if preset0 else None
        init, data, lengths = codec.encode_levels(levels, s, dq, 11, ctx_init=init)
        rec = container.TensorRecord(name, "float32", x.shape, "dq" if dq else "urq", step, 11, s, init, 0,
                                     lengths, np.zeros_like(lengths))
        total += data.size + container.record_size(rec)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qp", type=int, default=-32)
    ap.add_argument("--dq", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="small random model, for the test suite")
    ap.add_argument("--out", default=None, help="output directory (default experiments/results; --tiny: a temp dir)")
    args = ap.parse_args(argv)
    if args.tiny:
        rng = np.random.default_rng(0)
        tensors = {f"w{i}": (rng.standard_normal((64, 96)) * 0.02).astype(np.float32) for i in range(3)}
        model = "random 3x64x96"
    else:
        from gpucabac.io import read_model

        tensors = {k: v for k, v in read_model("minilm").items() if v.ndim == 2 and v.dtype == np.float32}
        model = "all-MiniLM-L6-v2 (2-D float32 tensors)"
    step = gpucabac.step_from_qp(args.qp)
    numel = sum(v.size for v in tensors.values())
    whole = sized(tensors, step, args.dq, None, False)
    rows = []
    for s in SIZES:
        chosen = sized(tensors, step, args.dq, s, False)
        half = sized(tensors, step, args.dq, s, True)
        rows.append({"slice_size": s, "bytes_chosen_init": chosen, "bytes_p_half": half,
                     "overhead_chosen_pct": 100 * (chosen / whole - 1), "overhead_p_half_pct": 100 * (half / whole - 1)})
    result = {
        "experiment": "slice_size_curve", "model": model, "weights": numel, "qp": args.qp, "dq": args.dq,
        "step": step, "one_slice_bytes": whole, "one_slice_bits_per_weight": 8 * whole / numel, "rows": rows,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    }
    lines = [f"# Slice-size overhead: {model}, QP {args.qp}, {'DQ' if args.dq else 'URQ'}",
             "", f"{numel} weights; one slice per tensor: {whole} bytes ({8 * whole / numel:.4f} bits/weight). "
             "Overhead includes flushes, slice lengths and CRCs in the header.", "",
             "| S | chosen init (signalled) | all contexts at p = 1/2 |", "|---|---|---|"]
    lines += [f"| {r['slice_size']} | {r['overhead_chosen_pct']:+.2f}% | {r['overhead_p_half_pct']:+.2f}% |" for r in rows]
    text = "\n".join(lines)
    print(text)
    tag = f"slice_size_curve_qp{args.qp}{'_dq' if args.dq else ''}"
    write_results(out_dir(args.out, args.tiny), tag, result,
                  text + f"\n\n{result['machine']}, {result['date']}, commit {result['commit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
