"""Sig flags or zero runs for a mostly-zero tensor: bytes, encode and decode time of each coding.

zeros="auto" (the default) codes a tensor that is at least 75% zero both ways and keeps the
smaller, and one that is at least 95% zero with runs alone (settings.RUNS_ONLY_ZERO_SHARE).
This measures what that rule rests on: per update source, sparsity and QP, the payload bytes of
the whole update with every tensor's zeros coded as flags and as runs, and the time to encode
(quantization, context-init choice, coding) and decode it each way, best of --repeats.

Updates: the kernels of experiments/fl_sparse_bits.py's sources (cnn-gauss, cnn-laplace,
minilm-perturbed: synthetic deltas of a small CNN and a perturbed MiniLM layer), sparsified
per tensor by magnitude top-k, quantized by rounding at the QP; one slice per tensor (FL's
default) and slices of 8192.

    python experiments/zero_coding_choice.py [--tiny] [--out DIR] [--repeats N]
"""

from __future__ import annotations

import argparse
import time

import _common  # noqa: F401  (sys.path)
import numpy as np

from _common import header_md, machine_info, md_table, out_dir, write_results
from fl_sparse_bits import update_sources

import gpucabac
from gpucabac.fl.sparsify import topk
from gpucabac.quantization import quantize_levels, step_from_qp

SPARSITIES = (0.75, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999)
QPS = (-38, -32, -26)
SLICE_SIZES = (None, gpucabac.DEFAULT_SLICE_SIZE)


def best_of(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def measure(label: str, update: dict, repeats: int) -> list[dict]:
    rows = []
    for sparsity in SPARSITIES:
        sparse, _ = topk(update, density=1.0 - sparsity)
        for qp in QPS:
            for slice_size in SLICE_SIZES:
                row = {"source": label, "sparsity": sparsity, "qp": qp, "slice": slice_size or "whole"}
                for zeros in ("flags", "runs"):
                    def enc():
                        return gpucabac.encode(sparse, qp=qp, slice_size=slice_size, zeros=zeros)
                    gpucabac.decode(enc())  # warm
                    t_enc, data = best_of(enc, repeats)
                    t_dec, _ = best_of(lambda: gpucabac.decode(data), repeats)
                    meta = gpucabac.info(data)
                    row[zeros] = {"payload": int(sum(t.coded_bytes for t in meta.tensors)),
                                  "encode_s": t_enc, "decode_s": t_dec}
                row["zero_share"] = float(np.mean([1 - np.count_nonzero(quantize_levels(x, step_from_qp(qp))) / x.size
                                                   for x in sparse.values()]))
                rows.append(row)
    return rows


def markdown(info: dict, settings: dict, rows: list[dict]) -> str:
    out = [header_md("Zero coding: sig flags against zero runs", info, ", ".join(settings["sources"]), settings)]
    out.append("Payload bytes of the whole update (every tensor one way), and the time to encode and to decode "
               "it (best of the repeats). **runs / flags**: payload ratio − 1 (negative: runs smaller); "
               "**zero share**: the mean share of zero levels over the tensors at that QP.\n")
    out.append("## Summary: runs against flags, lowest … highest over sources and QPs\n")
    summary = []
    for sparsity in SPARSITIES:
        for slice_size in ("whole", gpucabac.DEFAULT_SLICE_SIZE):
            rs = [r for r in rows if r["sparsity"] == sparsity and r["slice"] == slice_size]
            if not rs:
                continue
            ratio = [r["runs"]["payload"] / r["flags"]["payload"] - 1 for r in rs]
            enc = [r["flags"]["encode_s"] / r["runs"]["encode_s"] for r in rs]
            dec = [r["flags"]["decode_s"] / r["runs"]["decode_s"] for r in rs]
            summary.append([f"{sparsity:.1%}", slice_size, f"{min(ratio):+.2%} … {max(ratio):+.2%}",
                            f"{min(enc):.2f}x … {max(enc):.2f}x", f"{min(dec):.2f}x … {max(dec):.2f}x"])
    out.append(md_table(["sparsity", "slice", "runs / flags payload", "encode: flags time / runs time",
                         "decode: flags time / runs time"], summary))
    out.append("\n## Every setting\n")
    out.append(md_table(
        ["source", "sparsity", "QP", "slice", "zero share", "flags B", "runs B", "runs / flags", "flags enc ms",
         "runs enc ms", "flags dec ms", "runs dec ms"],
        [[r["source"], f"{r['sparsity']:.1%}", r["qp"], r["slice"], f"{r['zero_share']:.4f}", r["flags"]["payload"],
          r["runs"]["payload"], f"{r['runs']['payload'] / r['flags']['payload'] - 1:+.2%}",
          f"{1e3 * r['flags']['encode_s']:.1f}", f"{1e3 * r['runs']['encode_s']:.1f}",
          f"{1e3 * r['flags']['decode_s']:.1f}", f"{1e3 * r['runs']['decode_s']:.1f}"] for r in rows]))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: a 21 k-weight CNN, Gaussian deltas only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    info = machine_info()
    t0 = time.perf_counter()
    sources = update_sources(args.tiny)
    rows = []
    for label, make in sources.items():
        rows += measure(label, make(), 1 if args.tiny else args.repeats)
    info["loadavg_end"] = _common.loadavg()
    settings = dict(sources=list(sources), sparsities=list(SPARSITIES), qps=list(QPS), quantizer="urq (rounding)",
                    slice_sizes=[s or "whole" for s in SLICE_SIZES], sparsifier="topk per tensor",
                    repeats=1 if args.tiny else args.repeats, seconds=round(time.perf_counter() - t0, 1))
    md = markdown(info, settings, rows)
    jp, mp = write_results(out_dir(args.out, args.tiny), "zero_coding_choice",
                           dict(machine=info, settings=settings, results=rows), md)
    print(md)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
