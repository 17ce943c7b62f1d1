"""GPU engine check and throughput, in one command for a machine with a CUDA GPU and CuPy.

1. build: compile kernels/gpucabac.cu with CuPy (RawModule), timed;
2. bit-exactness against the CPU reference (numba): the default model (gpucabac.io.read_model
   "minilm") and random tensors encoded with device="gpu" give the same container bytes as the
   CPU, and decode to the same arrays; random level sequences (URQ and DQ, N = 0/1/11/20, slice
   edge cases) give the same slice bytes;
3. throughput on synthetic Laplacian levels (qp -32-like statistics), for tensor sizes and slice
   sizes given on the command line: decode (kernel only: payload, slice table and output already on
   the device, float32 written) and encode (levels on the device -> compacted payload, including
   the size read-backs), in G weights/s and GB/s of output, beside a device-to-device copy of the
   decoded size and, when `nvidia.nvcomp` imports, nvCOMP's ANS on the same levels as int8/int16
   bytes. CUDA events time every run, the warm-up run is discarded, every timed run is validated
   (decoded values == level * step computed independently on the device; encoded payload ==
   the first run's bytes, itself checked against the CPU engine up to --cpu-check-max weights).

    python experiments/gpu_check.py --out results/gpu                 # defaults: 1M..512M, S 256..16384
    python experiments/gpu_check.py --out /tmp/g --sizes 1e6 1e7 --slice-sizes 1024 8192
    python experiments/gpu_check.py --tiny --out /tmp/g               # CPU engine, tiny sizes (smoke test)

Writes gpu_check.json and gpu_check.md into --out. --tiny (alias --dry-run) needs no CuPy: the
numba engine stands in for the device, so the script's plumbing runs in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

import ml_dtypes  # noqa: E402

import gpucabac  # noqa: E402
from gpucabac import codec, container, slices  # noqa: E402
from gpucabac.context_init import choose_context_init  # noqa: E402
from gpucabac.engines import gpu as engine_gpu  # noqa: E402
from gpucabac.quantization import dequantize  # noqa: E402
from gpucabac.binarize import full_context_init, used_contexts  # noqa: E402
from gpucabac.tables import NUM_PRESETS  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
STEP = float(np.float32(2.0**-6))
NUM_GT_FLAGS = 11


# ---------------------------------------------------------------------------------------------
# Engines: what runs "on the device", and how it is timed


class CpuEngine:
    """The numba engine as a stand-in device (--tiny): host arrays, perf_counter timing."""

    name = "cpu"
    xp = np

    def device(self) -> str:
        return f"CPU: {C.cpu_model()} (dry run, numba engine)"

    def build(self) -> float:
        return 0.0

    def put(self, a):
        return np.ascontiguousarray(a)

    def get(self, a):
        return np.asarray(a)

    @contextlib.contextmanager
    def timer(self, out: list):
        t0 = time.perf_counter()
        yield
        out.append(time.perf_counter() - t0)

    def encode(self, levels, s, dq, ngt, init):
        ctx_init = init[used_contexts(ngt, dq)]
        _, payload, lengths = codec.encode_levels(levels, s, dq, ngt, ctx_init)
        return payload, lengths

    def prepare_decode(self, payload, lengths, n, s, dq, ngt, init, step):
        ctx_init = init[used_contexts(ngt, dq)]
        offs = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]])
        crcs = slices.slice_crcs(payload, offs, lengths.astype(np.int64))
        rec = container.TensorRecord("t", "float32", (n,), gpucabac.dq_mode(dq), step, ngt, s, ctx_init, 0,
                                     lengths.astype(np.uint32), crcs)
        return rec, payload

    def decode(self, state):
        rec, payload = state
        levels = codec.decode_levels(rec, payload)
        return dequantize(levels, rec.step, levels.shape, np.float32)

    def copy(self, src, dst):
        np.copyto(dst, src)

    def sync(self):
        pass


class GpuEngine:
    """The GPU engine's kernels (gpucabac.engines.gpu) through CuPy, timed with CUDA events."""

    name = "gpu"

    def __init__(self):
        import cupy

        self.cp = cupy
        self.xp = cupy
        self.k = None

    def device(self) -> str:
        return engine_gpu.device_name()

    def build(self) -> float:
        t0 = time.perf_counter()
        self.k = engine_gpu.kernels()
        self.cp.cuda.Device().synchronize()
        return time.perf_counter() - t0

    def put(self, a):
        return self.cp.asarray(a)

    def get(self, a):
        return self.cp.asnumpy(a)

    @contextlib.contextmanager
    def timer(self, out: list):
        start, stop = self.cp.cuda.Event(), self.cp.cuda.Event()
        start.record()
        yield
        stop.record()
        stop.synchronize()
        out.append(self.cp.cuda.get_elapsed_time(start, stop) / 1e3)

    def encode(self, levels, s, dq, ngt, init):
        payload, lengths, _, bad = engine_gpu.encode_slices(levels, s, dq, ngt, init, k=self.k)
        assert bad == -1
        return payload, lengths

    def prepare_decode(self, payload, lengths, n, s, dq, ngt, init, step):
        cp = self.cp
        lengths = cp.asarray(lengths).astype(np.int64)
        ns = int(lengths.size)
        offs = cp.cumsum(lengths) - lengths
        crcs = self.k.crc(cp.asarray(payload), offs, lengths)
        out = cp.empty(n, np.float32)
        first = cp.arange(ns, dtype=np.int64) * s
        table = engine_gpu.DecodeTable(
            payload=cp.asarray(payload), slice_offset=offs, slice_length=lengths.astype(np.uint32), slice_crc=crcs,
            slice_tensor=cp.zeros(ns, np.int32), slice_first=first, slice_count=cp.minimum(s, n - first),
            tensor_params=cp.asarray(np.array([int(dq), ngt, 1, 1], np.int32)), tensor_step=cp.asarray(np.float32([step])),
            tensor_out=cp.asarray(np.array([out.data.ptr], np.uint64)), tensor_init=cp.asarray(init.astype(np.uint8)),
        )
        table.check(cp)  # once, outside the timed decodes
        return table, out

    def decode(self, state):
        table, out = state
        errors = self.k.decode(table, validate=False)
        self._last_errors = errors
        return out

    def copy(self, src, dst):
        self.cp.copyto(dst, src)

    def sync(self):
        self.cp.cuda.Device().synchronize()


# ---------------------------------------------------------------------------------------------


def synthetic_levels(rng: np.random.Generator, n: int, dq: int, slice_size: int = 1 << 62) -> np.ndarray:
    """Levels with the statistics of rounded network weights (|q| mostly 0..3, heavy tail)."""
    k = np.rint(rng.laplace(0.0, 1.2, n)).astype(np.int32)
    k[rng.random(n) < 0.01] *= 9
    if not dq:
        return k
    # DQ: map coded levels k to reconstruction indices r through the trellis of dq states (docs/engine.md §3.5)
    from gpucabac.tables import dq_next_table

    out = np.empty(n, np.int32)
    nxt = dq_next_table(dq).ravel()
    state = 0
    for i in range(n):  # small sizes only
        if i % slice_size == 0:
            state = 0  # the DQ state restarts at every slice
        v = int(k[i])
        out[i] = 0 if v == 0 else 2 * v - (1 if v > 0 else -1) * (state & 1)
        state = int(nxt[2 * state + (v & 1)])
    return out


def check_bit_exact(eng, tiny: bool, rng: np.random.Generator, model: str = "minilm") -> dict:
    res = {"model": [], "random_levels": [], "all_equal": True}
    if tiny:
        model_name, tensors = "tiny random (seeded)", C.tiny_model()
    else:
        model_name, tensors = model, C.read_any_model(model)
    res["model_name"] = model_name
    res["model_weights"] = int(sum(t.size for t in tensors.values()))
    for kw in (dict(qp=-32), dict(qp=-36, dq=True), dict(qp=-32, slice_size=256, num_gt_flags=0), dict(qp=-34, dq=256)):
        data_cpu = gpucabac.encode(tensors, **kw)
        t0 = time.perf_counter()
        data_dev = gpucabac.encode(tensors, **kw, device=eng.name)
        t_enc = time.perf_counter() - t0
        want = gpucabac.decode(data_cpu)
        t0 = time.perf_counter()
        got = gpucabac.decode(data_cpu, device=eng.name)
        t_dec = time.perf_counter() - t0
        same_dec = list(got) == list(want) and all(
            engine_gpu.to_numpy(got[n], "bfloat16" if want[n].dtype == BF16 else None).tobytes() == want[n].tobytes()
            and got[n].shape == want[n].shape for n in want)
        row = {"settings": kw, "bytes": len(data_cpu), "encode_bytes_equal": data_dev == data_cpu,
               "decode_equal": bool(same_dec), "encode_wall_s": t_enc, "decode_wall_s": t_dec}
        res["model"].append(row)
        res["all_equal"] &= row["encode_bytes_equal"] and row["decode_equal"]
    # random level sequences straight through the engine contract
    cases = [(1, 1), (63, 64), (64, 64), (65, 64), (1000, 256), (5000, 4096)] + ([] if tiny else [(1_000_003, 8192)])
    for n, s in cases:
        for dq in (0, 8, 256) if n <= 10_000 else (0,):  # synthetic DQ levels come from a Python loop
            for ngt in (0, 1, 11, 20):
                levels = synthetic_levels(rng, n, dq, s)
                ctx_init = rng.integers(0, NUM_PRESETS, len(used_contexts(ngt, dq))).astype(np.uint8)
                init = full_context_init(ctx_init, ngt, dq).astype(np.uint8)
                _, want_payload, want_lengths = codec.encode_levels(levels, s, dq, ngt, ctx_init)
                payload, lengths = eng.encode(eng.put(levels), s, dq, ngt, init)
                ok = (np.asarray(eng.get(payload)).tobytes() == want_payload.tobytes()
                      and np.array_equal(np.asarray(eng.get(lengths)), want_lengths))
                res["random_levels"].append({"n": n, "slice_size": s, "dq": dq, "num_gt_flags": ngt, "equal": bool(ok)})
                res["all_equal"] &= bool(ok)
    return res


def nvcomp_ans(eng, levels_dev, repeats: int) -> dict | None:
    try:
        from nvidia import nvcomp  # noqa: PLC0415
    except Exception as e:
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}
    cp = eng.cp
    lo, hi = int(levels_dev.min()), int(levels_dev.max())
    narrow = cp.int8 if -128 <= lo and hi <= 127 else cp.int16
    data = levels_dev.astype(narrow)
    try:
        codec_ = nvcomp.Codec(algorithm="ANS")
        arr = nvcomp.as_array(data)
        comp = codec_.encode(arr)
        eng.sync()
        t_enc, t_dec = [], []
        for i in range(repeats + 1):
            ts = []
            with eng.timer(ts):
                comp = codec_.encode(arr)
            if i:
                t_enc += ts
            ts = []
            with eng.timer(ts):
                dec = codec_.decode(comp)
            if i:
                t_dec += ts
            back = cp.asarray(dec).view(narrow).reshape(-1)
            if not bool((back == data).all()):
                return {"available": True, "error": "nvCOMP ANS round trip differs"}
        size = int(cp.asarray(comp).nbytes)
        return {"available": True, "dtype": np.dtype(narrow).name, "compressed_bytes": size,
                "bits_per_weight": 8 * size / data.size, "encode_s": min(t_enc), "decode_s": min(t_dec)}
    except Exception as e:  # API differences between nvCOMP versions: report, do not fail the run
        return {"available": True, "error": f"{type(e).__name__}: {e}"}


def throughput(eng, sizes, slice_sizes, repeats, cpu_check_max, rng, with_nvcomp) -> list[dict]:
    rows = []
    xp = eng.xp
    for n in sizes:
        levels_h = synthetic_levels(rng, n, False)
        levels = eng.put(levels_h)
        ref = levels.astype(xp.float32) * xp.float32(STEP)  # the reconstruction, computed independently
        copy_dst = xp.empty(n, xp.float32)
        t_copy = []
        for i in range(repeats + 1):
            ts = []
            with eng.timer(ts):
                eng.copy(ref, copy_dst)
            if i:
                t_copy += ts
        nv = nvcomp_ans(eng, levels, repeats) if with_nvcomp and eng.name == "gpu" else None
        for s in slice_sizes:
            if s > n:
                continue
            ctx_init = choose_context_init(levels_h, s, False, NUM_GT_FLAGS)
            init = full_context_init(ctx_init, NUM_GT_FLAGS, False).astype(np.uint8)
            first_payload = None
            t_enc, t_dec = [], []
            validated = True
            for i in range(repeats + 1):  # run 0 is the warm-up, discarded
                ts = []
                with eng.timer(ts):
                    payload, lengths = eng.encode(levels, s, False, NUM_GT_FLAGS, init)
                if first_payload is None:
                    first_payload = np.asarray(eng.get(payload))
                    lengths_h = np.asarray(eng.get(lengths))
                    if n <= cpu_check_max:
                        _, want, want_len = codec.encode_levels(levels_h, s, False, NUM_GT_FLAGS, ctx_init)
                        validated &= want.tobytes() == first_payload.tobytes() and np.array_equal(want_len, lengths_h)
                else:
                    validated &= np.asarray(eng.get(payload)).tobytes() == first_payload.tobytes()
                if i:
                    t_enc += ts
            state = eng.prepare_decode(payload, lengths, n, s, False, NUM_GT_FLAGS, init, STEP)
            for i in range(repeats + 1):
                ts = []
                with eng.timer(ts):
                    out = eng.decode(state)
                validated &= bool((out == ref).all())
                if eng.name == "gpu":
                    validated &= int(eng._last_errors.max()) == 0
                if i:
                    t_dec += ts
            dec, enc, cp_ = min(t_dec), min(t_enc), min(t_copy)
            nbytes = int(first_payload.size)
            row = {
                "n": n, "slice_size": s, "num_slices": -(-n // s), "payload_bytes": nbytes,
                "bits_per_weight": 8 * nbytes / n,
                "decode_s": dec, "decode_gweights_s": n / dec / 1e9, "decode_out_GBps": 4 * n / dec / 1e9,
                "encode_s": enc, "encode_gweights_s": n / enc / 1e9, "encode_out_GBps": nbytes / enc / 1e9,
                "d2d_copy_s": cp_, "d2d_copy_GBps": 2 * 4 * n / cp_ / 1e9,  # read + write
                "nvcomp_ans": nv, "validated": bool(validated), "repeats": repeats,
                "cpu_bytes_checked": n <= cpu_check_max,
            }
            rows.append(row)
            print(f"[gpu_check] n={n:>11,} S={s:>6}: decode {row['decode_gweights_s']:.3f} Gw/s "
                  f"({row['decode_out_GBps']:.2f} GB/s), encode {row['encode_gweights_s']:.3f} Gw/s, "
                  f"copy {row['d2d_copy_GBps']:.1f} GB/s, {row['bits_per_weight']:.3f} bits/w, "
                  f"{'ok' if validated else 'VALIDATION FAILED'}", flush=True)
        del levels, ref, copy_dst
    return rows


def markdown(res: dict) -> str:
    info = res["machine"]
    lines = [C.header_md("gpucabac GPU engine: bit-exactness and throughput", info, res["bit_exact"]["model_name"],
                         res["settings"]).rstrip(), f"- engine: {res['engine']} on {res['device']}",
             f"- build (RawModule compile): {res['build_s']:.2f} s", "",
             f"Bit-exact against the CPU engine: **{'yes' if res['bit_exact']['all_equal'] else 'NO'}** "
             f"({len(res['bit_exact']['model'])} container settings on the model, "
             f"{len(res['bit_exact']['random_levels'])} random level sequences)", ""]
    header = ["weights", "S", "bits/w", "decode Gw/s", "decode GB/s", "encode Gw/s", "encode GB/s out",
              "D2D copy GB/s", "nvCOMP ANS bits/w", "ANS dec GB/s", "validated"]
    rows = []
    for r in res["throughput"]:
        nv = r["nvcomp_ans"] or {}
        ans_bits = f"{nv['bits_per_weight']:.3f}" if "bits_per_weight" in nv else "-"
        ans_dec = f"{r['n'] * np.dtype(nv['dtype']).itemsize / nv['decode_s'] / 1e9:.2f}" if "decode_s" in nv else "-"
        rows.append([f"{r['n']:,}", r["slice_size"], f"{r['bits_per_weight']:.3f}", f"{r['decode_gweights_s']:.3f}",
                     f"{r['decode_out_GBps']:.2f}", f"{r['encode_gweights_s']:.3f}", f"{r['encode_out_GBps']:.3f}",
                     f"{r['d2d_copy_GBps']:.1f}", ans_bits, ans_dec, "yes" if r["validated"] else "NO"])
    lines.append(C.md_table(header, rows))
    lines += ["", "decode GB/s: float32 output bytes per second; encode GB/s out: payload bytes per second; "
              "D2D copy: bytes read + written per second for a float32 array of the same size; "
              "ANS: nvCOMP ANS on the levels as int8/int16 bytes (decode GB/s of those bytes)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--tiny", "--dry-run", action="store_true", help="CPU engine, tiny sizes, no CuPy (smoke test)")
    ap.add_argument("--sizes", type=float, nargs="+", default=None, help="tensor sizes in weights (default 1e6 .. 512e6)")
    ap.add_argument("--slice-sizes", type=int, nargs="+", default=None, help="default 256 1024 4096 8192 16384")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point (after one warm-up)")
    ap.add_argument("--cpu-check-max", type=float, default=64e6, help="compare GPU bytes with the CPU engine up to this size")
    ap.add_argument("--no-nvcomp", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="minilm",
                    help="model of the bit-exactness check: a packaged name, a model file, or a .gcb (gpu_carry.py)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.tiny:
        eng = CpuEngine()
        sizes = [int(x) for x in (args.sizes or [3000, 20000])]
        slice_sizes = args.slice_sizes or [256, 1024]
    else:
        reason = engine_gpu.unavailable_reason()
        if reason is not None:
            print(f"gpu_check: no GPU engine here ({reason}); use --tiny for the CPU dry run", file=sys.stderr)
            return 2
        eng = GpuEngine()
        sizes = [int(x) for x in (args.sizes or [1e6, 4e6, 16e6, 64e6, 256e6, 512e6])]
        slice_sizes = args.slice_sizes or [256, 1024, 4096, 8192, 16384]
    rng = np.random.default_rng(args.seed)
    info = C.machine_info()
    build_s = eng.build()
    print(f"[gpu_check] engine {eng.name} on {eng.device()}, build {build_s:.2f} s", flush=True)
    exact = check_bit_exact(eng, args.tiny, rng, args.model)
    print(f"[gpu_check] bit-exact against the CPU engine: {exact['all_equal']}", flush=True)
    rows = throughput(eng, sizes, slice_sizes, args.repeats, int(args.cpu_check_max), rng, not args.no_nvcomp)
    info["loadavg_end"] = C.loadavg()
    res = {
        "engine": eng.name, "device": eng.device(), "machine": info, "build_s": build_s,
        "settings": {"step": STEP, "num_gt_flags": NUM_GT_FLAGS, "levels": "rint(Laplace(0, 1.2)), 1% x9",
                     "repeats": args.repeats, "sizes": sizes, "slice_sizes": slice_sizes, "seed": args.seed},
        "bit_exact": exact, "throughput": rows,
    }
    out = C.out_dir(args.out, args.tiny)
    jp, mp = C.write_results(out, "gpu_check", res, markdown(res))
    print(f"[gpu_check] wrote {jp} and {mp}")
    ok = exact["all_equal"] and all(r["validated"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
