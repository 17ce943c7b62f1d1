"""Bits per non-zero of very sparse differential updates, against the entropy of the positions
plus the values' rate.

A federated client sends a sparsified update; the coder must make it cheap. For updates
sparsified by magnitude top-k per tensor (gpucabac.fl.sparsify.topk) to 90%, 99% and 99.9%
sparsity and quantized by rounding at a few QPs, this measures per setting:

  coded      the container's bytes (gpucabac.encode: header, slice table, payload), and the
             payload alone (the arithmetic-coded slices), as bits per non-zero level
  bound      Σ over tensors of log2 C(n, k) (the positions: which k of the n levels are
             non-zero, ≈ n·H(k/n)) + k·H0 (the values: the zeroth-order empirical entropy of the
             tensor's non-zero levels, sign and magnitude together), in bits per non-zero
  gap        coded / bound − 1, for the payload and for the whole container
  anchors    zstd (level 19) and lzma (preset 9) of the same levels, as a dense int8/int16 array
             and as CSR (the gaps between non-zero positions as LEB128 varints, then the
             values), each over the concatenation of all tensors (one stream, no per-tensor
             framing: generous to the anchors)

at slice sizes 8192 (the default) and one slice per tensor (slice_size=None), with the zeros
coded as sig flags (zeros="flags", format versions 1-2) and as gpucabac codes them by default
(zeros="auto": zero runs, format version 3, tried on tensors at least 75% zero). k counts the
non-zero LEVELS (a kept delta below half a step quantizes to zero), read from the levels the
codec codes and checked against the decoded container.

Updates (only kernels, ndim ≥ 2: biases are not sparsified and would be a dense extra):
  cnn-gauss    a small CNN's kernels in Flax layout (conv (3,3,Cin,Cout), dense (in,out);
               980 320 weights), i.i.d. Gaussian deltas of σ = 0.05·√(2/fan_in) per layer:
               a local round that moves each weight by ~5% of its He-initialisation scale.
               No trained update of this model exists here, so the size is an assumption; the
               three QPs (steps 0.0015 … 0.0117) cover survivors from ~1 to ~30 steps.
  cnn-laplace  the same with Laplacian deltas of the same σ (heavier tails, as SGD updates).
  minilm-perturbed  (full run only) the six weight matrices of MiniLM's first encoder layer
               (1 769 472 weights), perturbed multiplicatively: W' = W ⊙ (1 + 0.05·z), z i.i.d.
               N(0, 1), update = W' − W = 0.05·W ⊙ z. The update's magnitudes follow the real
               weights (MiniLM's outlier dimensions included), so its top-k positions cluster
               the way a real model's do, which i.i.d. deltas cannot show.

Also measured: the real coder's cost of one zero level at the estimator's most skewed state
(an all-zero tensor of 2^20 levels in one slice, sig flags, bits per level): below that no run
of zeros is coded with flags, whatever its probability — at 99.9% sparsity it alone is ~9.5 bits
per non-zero, which is why zero runs exist.

    python experiments/fl_sparse_bits.py [--tiny] [--out DIR]

--tiny (a smoke run, results to a temp dir or --out): a 21 k-weight CNN, Gaussian deltas only,
the same sparsities, QPs and slice sizes.
"""

from __future__ import annotations

import argparse
import lzma
import math
import time

import _common  # noqa: F401  (sys.path)
import numpy as np
import zstandard

from _common import header_md, machine_info, md_table, out_dir, write_results

import gpucabac
from gpucabac.fl.sparsify import keep_count, topk
from gpucabac.quantization import dequantize, quantize_levels, step_from_qp

SPARSITIES = (0.9, 0.99, 0.999)
QPS = (-38, -32, -26)
SLICE_SIZES = (gpucabac.DEFAULT_SLICE_SIZE, None)
ZEROS = ("flags", "auto")  # sig flags (versions 1-2) and the default, which picks zero runs for sparse tensors
ZSTD_LEVEL = 19
LZMA_PRESET = 9
SCALE = 0.05  # update σ relative to the He scale √(2/fan_in) (cnn-*), or the relative perturbation (minilm)

# (kh, kw, in, out) convs and (in, out) dense kernels, Flax layout
CNN = {"conv1.kernel": (3, 3, 3, 32), "conv2.kernel": (3, 3, 32, 64), "conv3.kernel": (3, 3, 64, 128),
       "conv4.kernel": (3, 3, 128, 256), "dense1.kernel": (2304, 256), "dense2.kernel": (256, 10)}
TINY_CNN = {"conv1.kernel": (3, 3, 3, 16), "conv2.kernel": (3, 3, 16, 32), "dense1.kernel": (512, 32),
            "dense2.kernel": (32, 10)}
MINILM_LAYER = "encoder.layer.0."
MINILM_WEIGHTS = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
                  "attention.output.dense.weight", "intermediate.dense.weight", "output.dense.weight")


# --- updates ------------------------------------------------------------------------------------

def cnn_update(shapes: dict, kind: str, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        sigma = SCALE * math.sqrt(2.0 / math.prod(shape[:-1]))
        if kind == "gauss":
            x = rng.normal(0.0, sigma, shape)
        else:  # Laplace of the same σ: scale b = σ/√2
            x = rng.laplace(0.0, sigma / math.sqrt(2.0), shape)
        out[name] = x.astype(np.float32)
    return out


def minilm_update(seed: int) -> dict[str, np.ndarray]:
    from gpucabac.io import read_model

    model = read_model("minilm")
    rng = np.random.default_rng(seed)
    out = {}
    for w in MINILM_WEIGHTS:
        W = model[MINILM_LAYER + w].astype(np.float32)
        out[MINILM_LAYER + w] = (SCALE * W * rng.standard_normal(W.shape)).astype(np.float32)
    return out


def update_sources(tiny: bool) -> dict:
    """label -> a function making that update: the module doc's sources (tiny: the small CNN's)."""
    if tiny:
        return {"cnn-gauss (tiny)": lambda: cnn_update(TINY_CNN, "gauss", 0)}
    return {"cnn-gauss": lambda: cnn_update(CNN, "gauss", 0), "cnn-laplace": lambda: cnn_update(CNN, "laplace", 1),
            "minilm-perturbed": lambda: minilm_update(2)}


# --- the bound and the anchors ------------------------------------------------------------------

def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def entropy_bits(values: np.ndarray) -> float:
    """Zeroth-order empirical entropy of `values`, in bits for all of them."""
    if values.size == 0:
        return 0.0
    _, counts = np.unique(values, return_counts=True)
    c = counts.astype(np.float64)
    return float(-(c * np.log2(c / c.sum())).sum())


def varints(x: np.ndarray) -> bytes:
    """LEB128 of non-negative integers, vectorised."""
    x = np.asarray(x, np.uint64)
    if x.size == 0:
        return b""
    nbytes = np.ones(x.size, np.int64)
    for b in range(1, 10):
        nbytes += x >= (np.uint64(1) << np.uint64(7 * b))
    out = np.empty(int(nbytes.sum()), np.uint8)
    starts = np.concatenate([[0], np.cumsum(nbytes)[:-1]])
    for b in range(int(nbytes.max())):
        sel = nbytes > b
        byte = (x[sel] >> np.uint64(7 * b)) & np.uint64(0x7F)
        more = (nbytes[sel] > b + 1).astype(np.uint64) << np.uint64(7)
        out[starts[sel] + b] = (byte | more).astype(np.uint8)
    return out.tobytes()


def anchors(levels: np.ndarray) -> dict[str, int]:
    """Bytes of zstd / lzma over the dense level array and over a CSR form of it."""
    peak = int(np.abs(levels).max()) if levels.size else 0
    dt = np.int8 if peak <= 127 else np.int16 if peak <= 32767 else np.int32
    dense = levels.astype(dt).tobytes()
    pos = np.flatnonzero(levels)
    gaps = np.diff(np.concatenate([[-1], pos])) - 1  # zeros before each non-zero
    csr = varints(gaps) + levels[pos].astype(dt).tobytes()
    z = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return {"zstd_dense": len(z.compress(dense)), "lzma_dense": len(lzma.compress(dense, preset=LZMA_PRESET)),
            "zstd_csr": len(z.compress(csr)), "lzma_csr": len(lzma.compress(csr, preset=LZMA_PRESET)),
            "level_dtype": np.dtype(dt).name}


def zero_floor_bits(n: int = 1 << 20) -> float:
    """The real coder's bits per zero level once the sig context has saturated: an all-zero tensor
    in one slice (its first zeros, before saturation, cost a little more)."""
    data = gpucabac.encode({"z": np.zeros((n,), np.float32)}, qp=-32, slice_size=None, small_step=0.01, zeros="flags")
    return 8 * gpucabac.info(data).tensors[0].coded_bytes / n


# --- one setting --------------------------------------------------------------------------------

def measure(update: dict[str, np.ndarray], qp: int) -> tuple[dict, list[dict]]:
    """The levels' statistics, the bound and the anchors at `qp`, then one row per slice size
    and coding of zeros."""
    step = step_from_qp(qp)
    levels = {n: quantize_levels(x, step) for n, x in update.items()}
    pos_bits = val_bits = 0.0
    nz = n_all = 0
    for lv in levels.values():
        k = int(np.count_nonzero(lv))
        pos_bits += log2_binomial(lv.size, k)
        val_bits += entropy_bits(lv[lv != 0])
        nz += k
        n_all += lv.size
    flat = np.concatenate([lv for lv in levels.values()])
    base = dict(qp=qp, step=step, n=n_all, nonzero_levels=nz, bound_positions_bits=pos_bits, bound_values_bits=val_bits,
                bound_bits=pos_bits + val_bits, max_abs_level=int(np.abs(flat).max()) if flat.size else 0,
                anchors_bytes=anchors(flat))
    rows = []
    for S, zeros in ((S, z) for S in SLICE_SIZES for z in ZEROS):
        t = time.perf_counter()
        data = gpucabac.encode(update, qp=qp, slice_size=S, zeros=zeros)
        seconds = time.perf_counter() - t
        meta = gpucabac.info(data)
        out = gpucabac.decode(data)
        for name, lv in levels.items():  # the levels counted are the levels coded
            want = dequantize(lv, step, update[name].shape, np.float32)
            if not np.array_equal(out[name], want):
                raise AssertionError(f"{name}: decoded values differ from the counted levels at qp {qp}, slice {S}")
        payload = sum(t.coded_bytes for t in meta.tensors)
        rows.append(dict(slice_size="whole" if S is None else S, zeros=zeros, container_bytes=len(data), payload_bytes=payload,
                         runs_tensors=sum(t.zeros == "runs" for t in meta.tensors),
                         slices=sum(t.num_slices for t in meta.tensors), encode_seconds=seconds))
    return base, rows


def per_nz(bits: float, nz: int) -> float | None:
    return bits / nz if nz else None


def run_source(label: str, update: dict[str, np.ndarray], qps) -> list[dict]:
    results = []
    for s in SPARSITIES:
        sparse, res = topk(update, sparsity=s)
        for name, x in update.items():  # exact k per tensor (gpucabac.fl.sparsify's rule)
            assert int(res.masks[name].sum()) == keep_count(1 - s, x.size), name
        for qp in qps:
            base, rows = measure(sparse, qp)
            nz = base["nonzero_levels"]
            for r in rows:
                r.update(source=label, sparsity=s, kept=res.kept, **base)
                r["bits_per_nz_container"] = per_nz(8 * r["container_bytes"], nz)
                r["bits_per_nz_payload"] = per_nz(8 * r["payload_bytes"], nz)
                r["bound_bits_per_nz"] = per_nz(base["bound_bits"], nz)
                r["bound_positions_bits_per_nz"] = per_nz(base["bound_positions_bits"], nz)
                r["bound_values_bits_per_nz"] = per_nz(base["bound_values_bits"], nz)
                b = base["bound_bits"]
                r["gap_payload_pct"] = 100 * (8 * r["payload_bytes"] / b - 1) if b else None
                r["gap_container_pct"] = 100 * (8 * r["container_bytes"] / b - 1) if b else None
                r["anchors_bits_per_nz"] = {k: per_nz(8 * v, nz) for k, v in base["anchors_bytes"].items()
                                            if isinstance(v, int)}
                results.append(r)
                print(f"{label} s={s} qp={qp} S={r['slice_size']} zeros={r['zeros']}: nz={nz} payload {r['bits_per_nz_payload']:.2f} "
                      f"container {r['bits_per_nz_container']:.2f} bound {r['bound_bits_per_nz']:.2f} b/nz, "
                      f"gap {r['gap_payload_pct']:+.1f}% / {r['gap_container_pct']:+.1f}%", flush=True)
    return results


# --- report -------------------------------------------------------------------------------------

def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def markdown(info, settings, results, floor) -> str:
    md = header_md("Bits per non-zero of sparse differential updates", info,
                   ", ".join(settings["sources"]), {k: v for k, v in settings.items() if k != "sources"})
    md += ("Per tensor top-k to the sparsity, rounding at the QP. **bits/nz** are bits per non-zero level; the "
           "**bound** is log2 C(n, k) for the positions plus the zeroth-order entropy of the non-zero levels, "
           "summed over tensors; **gap** = coded / bound − 1 for the payload (the arithmetic-coded slices) and the "
           "whole container (header and slice table, 8 bytes per slice, included). **zeros**: `flags` codes a sig "
           "bin per level (format versions 1-2); `auto`, gpucabac's default, codes a tensor with zero runs (format "
           "version 3) when at least 75% of its levels are zero and runs come out smaller.\n\n")
    md += "## Summary: the gap to the bound, lowest … highest over sources and QPs\n\n"
    rows = []
    for sp in SPARSITIES:
        for zeros in ZEROS:
            row = [f"{100 * sp:g}%", zeros]
            for key in ("gap_payload_pct", "gap_container_pct"):
                for S in ("whole", gpucabac.DEFAULT_SLICE_SIZE):
                    g = [r[key] for r in results if r["sparsity"] == sp and r["slice_size"] == S and r["zeros"] == zeros
                         and r[key] is not None]
                    row.append(f"{min(g):+.1f}% … {max(g):+.1f}%" if g else "-")
            rows.append(row)
    md += md_table(["sparsity", "zeros", "payload, whole", f"payload, slice {gpucabac.DEFAULT_SLICE_SIZE}", "container, whole",
                    f"container, slice {gpucabac.DEFAULT_SLICE_SIZE}"], rows) + "\n\n"
    for src in settings["sources"]:
        md += f"## {src}\n\n"
        rows = []
        for r in (r for r in results if r["source"] == src):
            rows.append([f"{100 * r['sparsity']:g}%", r["qp"], r["slice_size"], r["zeros"], r["nonzero_levels"],
                         f"{100 * r['nonzero_levels'] / r['n']:.3f}%", r["container_bytes"],
                         _f(r["bits_per_nz_payload"]), _f(r["bits_per_nz_container"]),
                         f"{_f(r['bound_bits_per_nz'])} ({_f(r['bound_positions_bits_per_nz'])} + "
                         f"{_f(r['bound_values_bits_per_nz'])})",
                         _f(r["gap_payload_pct"], "{:+.1f}%"), _f(r["gap_container_pct"], "{:+.1f}%")])
        md += md_table(["sparsity", "QP", "slice", "zeros", "nz levels", "nz/n", "container bytes", "payload b/nz",
                        "container b/nz", "bound b/nz (positions + values)", "gap payload", "gap container"], rows)
        md += "\n\nAnchors on the same levels (bits per non-zero; one stream over all tensors):\n\n"
        rows = []
        for r in (r for r in results if r["source"] == src and r["slice_size"] == "whole" and r["zeros"] == "auto"):
            a = r["anchors_bits_per_nz"]
            ours = r["bits_per_nz_container"]
            flags = next(f["bits_per_nz_container"] for f in results if f["source"] == src and f["slice_size"] == "whole"
                         and f["zeros"] == "flags" and f["sparsity"] == r["sparsity"] and f["qp"] == r["qp"])
            rows.append([f"{100 * r['sparsity']:g}%", r["qp"], _f(flags), _f(ours), _f(a["zstd_dense"]),
                         _f(a["lzma_dense"]), _f(a["zstd_csr"]), _f(a["lzma_csr"]),
                         _f(min(a.values()) / ours if ours else None, "{:.2f}x")])
        md += md_table(["sparsity", "QP", "gpucabac flags (whole, container)", "gpucabac auto (whole, container)",
                        f"zstd-{ZSTD_LEVEL} dense", f"lzma-{LZMA_PRESET} dense",
                        f"zstd-{ZSTD_LEVEL} CSR", f"lzma-{LZMA_PRESET} CSR", "best anchor / gpucabac auto"], rows)
        md += "\n\n"
    md += (f"With sig flags, the coder's cost of a zero level at its most skewed estimator state: {floor:.4f} bits (an all-zero tensor "
           f"of 2^20 levels in one slice). At a non-zero fraction p the zeros alone cost about {floor:.4f}·(1−p)/p "
           f"bits per non-zero: {floor * 9:.2f} at 90%, {floor * 99:.2f} at 99%, {floor * 999:.2f} at 99.9% sparsity, "
           f"where the positions' entropy is about {math.log2(math.e / 0.1):.1f}, {math.log2(math.e / 0.01):.1f} and "
           f"{math.log2(math.e / 0.001):.1f} bits per non-zero (log2(e/p)).\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: a 21 k-weight CNN, Gaussian deltas only")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    info = machine_info()
    t0 = time.perf_counter()
    sources = update_sources(args.tiny)
    results = []
    sizes = {}
    for label, make in sources.items():
        update = make()
        sizes[label] = {n: list(x.shape) for n, x in update.items()}
        results += run_source(label, update, QPS)
    floor = zero_floor_bits()
    info["loadavg_end"] = _common.loadavg()
    settings = dict(sources=list(sources), sparsities=list(SPARSITIES), qps=list(QPS), quantizer="urq (rounding)",
                    slice_sizes=[s if s else "whole" for s in SLICE_SIZES], sparsifier="topk per tensor",
                    update_scale=SCALE, zstd_level=ZSTD_LEVEL, lzma_preset=LZMA_PRESET,
                    seconds=round(time.perf_counter() - t0, 1))
    md = markdown(info, settings, results, floor)
    d = out_dir(args.out, args.tiny)
    jp, mp = write_results(d, "fl_sparse_bits", dict(machine=info, settings=settings, tensor_shapes=sizes,
                                                     zero_floor_bits_per_level=floor, results=results), md)
    print(md)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
