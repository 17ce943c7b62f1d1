"""Peak memory of gpucabac's encode and decode on a synthetic 200 M-weight float32 model.

Issue acceptance: peak memory of `decode` (the API) ≤ 1.1x its output + 64 MiB; of the CLI's
`gpucabac encode` / `gpucabac decode` ≤ 2x the model.

The model: a transformer-like stack written as .safetensors into a temp dir (never committed):
an embedding of 33280 x 1280 (42.6 M weights), 8 layers of q/k/v/o 1280 x 1280 and fc1/fc2
1280 <-> 5120 matrices (1.6 M and 6.6 M weights) with biases, and 1-D layer norms: 163 tensors,
200.0 M float32 weights (763 MiB). Gaussian values, a per-tensor std (0.01..0.04 for matrices),
seed 0. --tiny: the same layout at d 128 / ffn 512 / vocab 4000 (2.1 M weights).

Every measurement is a child process of its own, run one after the other:
  * CLI: `python -m gpucabac -q encode model.safetensors -o model.gcb` (default settings), the
    same with --dq, and `python -m gpucabac -q decode model.gcb -o out.safetensors`. Peak =
    the child's ru_maxrss from os.wait4 (the kernel's high-water mark of its resident set,
    anonymous and file-backed pages together), compared with 2x the model's float32 bytes.
    ru_maxrss also counts the memory image the child was forked (vforked) from, so this parent
    stays small: it never imports gpucabac nor holds the model (a child builds and writes it),
    and its own peak is recorded beside every child's: its VmHWM (what a child it starts can
    inherit), not its own ru_maxrss, which in turn counts whatever process started this script
    (a test runner, say) and says nothing about the children. A sampler thread reads
    /proc/<pid>/status every 10 ms as a cross-check (VmHWM, of the exec'ed image only) and to
    split the peak into anonymous and file-backed pages (RssAnon / RssFile at the maximum).
  * API: a child python that warms up (numba dispatchers loaded from cache on a tiny container),
    reads the .gcb bytes (decode) or nothing (load), resets its high-water mark
    (/proc/self/clear_refs 5), records VmRSS, calls gpucabac.decode(data) / gpucabac.load(path),
    then reads VmHWM. Peak = VmHWM - VmRSS before the call, compared with 1.1x the output
    (sum of the arrays' nbytes) + 64 MiB.
Before those, warm-up runs of the same three CLI commands on a 60 k-weight model (numba's
on-disk cache is filled, so no measured run compiles); their peaks are the CLI's baseline.
MiB = 2^20 bytes throughout.

    python experiments/bench_memory.py            # full run, ~5 min on 2 cores; results to experiments/results
    python experiments/bench_memory.py --no-dq    # without the --dq encode
    python experiments/bench_memory.py --tiny     # seconds; a temp dir or --out (verdicts not meaningful)

Writes bench_memory.{json,md} to experiments/results (full run) or a temp dir (--tiny; see --out);
a full run also shows BEFORE, the same run before the memory work, beside its own figures.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (also puts the repo root on sys.path)

MIB = 1 << 20
DECODE_FACTOR, DECODE_SLACK = 1.1, 64 * MIB  # API decode/load: peak <= 1.1 x output + 64 MiB
CLI_FACTOR = 2.0  # CLI encode/decode: peak <= 2 x the model
SEED = 0
SAMPLE_S = 0.01

# The same full run before the memory work (commit 71b39eb, the benchmark script not yet
# committed; same machine, model and settings): per run, its peak bytes, wall seconds and verdict.
BEFORE = {
    "commit": "71b39ebeaee2 (+ this script, uncommitted)", "date": "2026-12-02T06:12:45+00:00",
    "runs": {"CLI encode": (2978279424, 15.5), "CLI encode --dq": (2951450624, 20.9), "CLI decode": (2636877824, 8.1),
             "API decode": (972390400, 6.5), "API load": (1003757568, 6.6)},
}

# (d_model, d_ffn, layers, vocab)
FULL_LAYOUT = (1280, 5120, 8, 33280)
TINY_LAYOUT = (128, 512, 8, 4000)


# --- the model -----------------------------------------------------------------------------------

def model_shapes(d: int, ffn: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (vocab, d)}
    for i in range(layers):
        p = f"layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[f"{p}attn.{n}_proj.weight"] = (d, d)
            shapes[f"{p}attn.{n}_proj.bias"] = (d,)
        shapes[f"{p}attn_norm.weight"] = (d,)
        shapes[f"{p}attn_norm.bias"] = (d,)
        shapes[f"{p}mlp.fc1.weight"] = (ffn, d)
        shapes[f"{p}mlp.fc1.bias"] = (ffn,)
        shapes[f"{p}mlp.fc2.weight"] = (d, ffn)
        shapes[f"{p}mlp.fc2.bias"] = (d,)
        shapes[f"{p}mlp_norm.weight"] = (d,)
        shapes[f"{p}mlp_norm.bias"] = (d,)
    shapes["final_norm.weight"] = (d,)
    shapes["final_norm.bias"] = (d,)
    return shapes


def build_model(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
    """Gaussian float32 tensors: matrices std 0.02 x 2^U(-1, 1), biases 0.01 x that, norm weights
    1 + N(0, 0.05^2), norm biases N(0, 0.01^2)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape, dtype=np.float32)
        if "norm" in name:
            if name.endswith(".weight"):
                x *= np.float32(0.05)
                x += np.float32(1.0)
            else:
                x *= np.float32(0.01)
        else:
            std = 0.02 * 2.0 ** rng.uniform(-1, 1)
            x *= np.float32(std if len(shape) >= 2 else 0.01 * std)
        out[name] = x
    return out


def write_models(work: pathlib.Path, tiny: bool) -> None:
    """warm.safetensors (the 60 k-weight warm-up model) and model.safetensors, in `work`; run in
    a child (--build-model) so that the measuring parent never holds the model."""
    from gpucabac.io import write_model

    write_model(work / "warm.safetensors", C.tiny_model(seed=1))
    write_model(work / "model.safetensors", build_model(model_shapes(*(TINY_LAYOUT if tiny else FULL_LAYOUT))))


def safetensors_index(path: pathlib.Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a safetensors header (reads the header only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}


# --- measuring a child ---------------------------------------------------------------------------

_STATUS = re.compile(r"^(VmHWM|VmRSS|RssAnon|RssFile):\s+(\d+) kB", re.M)


def _status_kib(pid: int) -> dict[str, int] | None:
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    got = {k: int(v) for k, v in _STATUS.findall(text)}
    return got if "VmRSS" in got else None


class _Sampler(threading.Thread):
    """Polls /proc/<pid>/status: the largest VmRSS seen, RssAnon/RssFile at that moment, and the
    largest RssAnon seen."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.max_rss = self.anon_at_max = self.file_at_max = self.max_anon = self.hwm = 0
        self.samples = 0

    def run(self):
        while not self.stop.is_set():
            s = _status_kib(self.pid)
            if s is not None:
                self.samples += 1
                if s["VmRSS"] > self.max_rss:
                    self.max_rss, self.anon_at_max, self.file_at_max = s["VmRSS"], s.get("RssAnon", 0), s.get("RssFile", 0)
                self.max_anon = max(self.max_anon, s.get("RssAnon", 0))
                self.hwm = max(self.hwm, s.get("VmHWM", 0))
            self.stop.wait(SAMPLE_S)


def _own_peak_bytes() -> int:
    """This process's high-water mark of its own memory image (VmHWM): what the ru_maxrss of a
    child it forks and execs can inherit. Its ru_maxrss would also count the image of whatever
    started this script (exec keeps the larger of the two), so it is only the fallback."""
    s = _status_kib(os.getpid())
    if s is not None and "VmHWM" in s:
        return s["VmHWM"] * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(argv: list[str], cwd: pathlib.Path) -> dict:
    """Run argv; its peak RSS (ru_maxrss from os.wait4), a sampled split, wall time, output."""
    parent_peak = _own_peak_bytes()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        sampler = _Sampler(p.pid)
        sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        p.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {p.returncode}:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    return {"maxrss_bytes": ru.ru_maxrss * 1024, "wall_s": wall, "stdout": stdout.strip(), "stderr": stderr.strip(),
            "parent_peak_bytes": parent_peak,
            "sampled": {"vmhwm_bytes": sampler.hwm * 1024, "max_rss_bytes": sampler.max_rss * 1024, "anon_at_max_bytes": sampler.anon_at_max * 1024,
                        "file_at_max_bytes": sampler.file_at_max * 1024, "max_anon_bytes": sampler.max_anon * 1024,
                        "samples": sampler.samples}}


# The in-process child: warm up, (read the container), reset the high-water mark, call, report.
_API_CHILD = r"""
import gc, json, pathlib, re, sys, time
import gpucabac

def status():
    t = pathlib.Path("/proc/self/status").read_text()
    return {k: int(v) * 1024 for k, v in re.findall(r"^(VmHWM|VmRSS|RssAnon|RssFile):\s+(\d+) kB", t, re.M)}

mode, path, warm = sys.argv[1:4]
gpucabac.load(warm)
gpucabac.decode(pathlib.Path(warm).read_bytes())
data = pathlib.Path(path).read_bytes() if mode == "decode" else None
gc.collect()
try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    reset = True
except OSError:
    reset = False
before = status()
t0 = time.perf_counter()
out = gpucabac.decode(data) if mode == "decode" else gpucabac.load(path)
wall = time.perf_counter() - t0
after = status()
print(json.dumps({"before": before, "after": after, "hwm_reset": reset, "call_s": wall,
                  "out_bytes": sum(int(a.nbytes) for a in out.values()), "tensors": len(out),
                  "container_bytes": pathlib.Path(path).stat().st_size}))
"""


def run_api(mode: str, gcb: pathlib.Path, warm: pathlib.Path, cwd: pathlib.Path) -> dict:
    r = run_child([sys.executable, "-c", _API_CHILD, mode, str(gcb), str(warm)], cwd)
    rep = json.loads(r["stdout"].splitlines()[-1])
    r["api"] = rep
    r["peak_bytes"] = rep["after"]["VmHWM"] - rep["before"]["VmRSS"]
    return r


# --- the benchmark -------------------------------------------------------------------------------

def _mib(b: float) -> str:
    return f"{b / MIB:.1f}"


def _before_md(runs: list[dict]) -> list[str]:
    """The 'before' table (BEFORE, the same full run before the memory work) beside this run."""
    rows = []
    for r in runs:
        if r["name"] not in BEFORE["runs"]:
            continue
        b, w = BEFORE["runs"][r["name"]]
        rows.append([r["name"], f"{_mib(b)} ({b / r['ref_bytes']:.3f} x {r['ref_what']})",
                     "PASS" if b <= r["limit_bytes"] else "FAIL", f"{w:.1f}",
                     f"{_mib(r['peak_bytes'])} ({r['ratio']:.3f} x {r['ref_what']})", "PASS" if r["pass"] else "FAIL",
                     f"{r['wall_s']:.1f}", _mib(r["limit_bytes"]) + f" ({r['limit_rule']})"])
    return [f"## Before and after the memory work", "",
            f"Before: the same full run at commit {BEFORE['commit']}, {BEFORE['date']} (same machine, model and "
            "settings). After: this run. Peak MiB (ratio to the reference); wall seconds vary with the machine's "
            "other load, the memory figures are what the criteria judge.", "",
            C.md_table(["run", "before: peak MiB", "before", "before wall s", "after: peak MiB", "after",
                        "after wall s", "limit MiB"], rows), ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the same layout at 2.1 M weights (smoke test)")
    ap.add_argument("--no-dq", action="store_true", help="skip the `encode --dq` run")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="build the model and containers in DIR and keep them (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="output directory")
    ap.add_argument("--build-model", default=None, metavar="DIR", help=argparse.SUPPRESS)  # the builder child
    args = ap.parse_args(argv)
    if args.build_model:
        write_models(pathlib.Path(args.build_model), args.tiny)
        return 0

    layout = TINY_LAYOUT if args.tiny else FULL_LAYOUT
    shapes = model_shapes(*layout)
    weights = sum(int(np.prod(s)) for s in shapes.values())
    model_bytes = 4 * weights
    largest = max(shapes, key=lambda k: int(np.prod(shapes[k])))
    info = C.machine_info()
    model_desc = (f"synthetic transformer-like stack (d {layout[0]}, ffn {layout[1]}, {layout[2]} layers, vocab {layout[3]}), "
                  f"{len(shapes)} float32 tensors, {weights:,} weights ({_mib(model_bytes)} MiB), Gaussian, seed {SEED}")
    settings = {"encode": "CLI defaults (QP -32, rounding, slice 8192, 11 flags)" + ("" if args.no_dq else "; and --dq"),
                "threads": "CLI default (all cores)", "peak": "ru_maxrss via os.wait4 (CLI); VmHWM - VmRSS before (API)",
                "limits": f"API decode/load <= {DECODE_FACTOR} x output + 64 MiB; CLI <= {CLI_FACTOR:g} x model"}

    work = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="gpucabac_bench_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "gpucabac", "-q"]
    try:
        r = run_child([sys.executable, __file__, "--build-model", str(work.resolve())] + (["--tiny"] if args.tiny else []), work)
        print(f"[bench] model: {model_desc}; built and written in {r['wall_s']:.1f} s", file=sys.stderr)

        # warm-up: the same CLI commands on a tiny model (numba's cache filled); their peaks are the baseline
        baseline = {}
        warm_cmds = {"encode": ["encode", "warm.safetensors", "-o", "warm.gcb", "-f"],
                     "encode --dq": ["encode", "--dq", "warm.safetensors", "-o", "warm_dq.gcb", "-f"],
                     "decode": ["decode", "warm.gcb", "-o", "warm_out.safetensors", "-f"]}
        for key, cmd in warm_cmds.items():
            if key == "encode --dq" and args.no_dq:
                continue
            r = run_child(py + cmd, work)
            baseline[key] = r["maxrss_bytes"]
            print(f"[bench] warm-up {key}: peak {_mib(r['maxrss_bytes'])} MiB, {r['wall_s']:.1f} s", file=sys.stderr)

        runs = []

        def cli(key, cmd, ref_bytes, ref_what):
            r = run_child(py + cmd, work)
            peak = r["maxrss_bytes"]
            limit = CLI_FACTOR * model_bytes
            rec = {"name": f"CLI {key}", "command": "python -m gpucabac -q " + " ".join(cmd), "measured_as": "ru_maxrss",
                   "peak_bytes": peak, "ref_bytes": ref_bytes, "ref_what": ref_what, "ratio": peak / ref_bytes,
                   "limit_bytes": limit, "limit_rule": f"{CLI_FACTOR:g} x model", "pass": peak <= limit,
                   "wall_s": r["wall_s"], "baseline_bytes": baseline.get(key), "sampled": r["sampled"],
                   "parent_peak_bytes": r["parent_peak_bytes"], "stdout": r["stdout"]}
            if r["parent_peak_bytes"] >= peak:
                raise AssertionError(f"{rec['name']}: this parent's peak ({_mib(r['parent_peak_bytes'])} MiB) is not "
                                     f"below the child's ru_maxrss ({_mib(peak)} MiB), which may then be the parent's")
            runs.append(rec)
            print(f"[bench] {rec['name']}: peak {_mib(peak)} MiB = {rec['ratio']:.3f} x {ref_what} "
                  f"(limit {_mib(limit)} MiB: {'PASS' if rec['pass'] else 'FAIL'}), {r['wall_s']:.1f} s", file=sys.stderr)
            return rec

        enc = cli("encode", ["encode", "model.safetensors", "-o", "model.gcb", "-f"], model_bytes, "model")
        enc["container_bytes"] = (work / "model.gcb").stat().st_size
        enc["bits_per_weight"] = 8 * enc["container_bytes"] / weights
        if not args.no_dq:
            dq = cli("encode --dq", ["encode", "--dq", "model.safetensors", "-o", "model_dq.gcb", "-f"], model_bytes, "model")
            dq["container_bytes"] = (work / "model_dq.gcb").stat().st_size
            dq["bits_per_weight"] = 8 * dq["container_bytes"] / weights
        dec = cli("decode", ["decode", "model.gcb", "-o", "out.safetensors", "-f"], model_bytes, "model")
        index = safetensors_index(work / "out.safetensors")
        if index != {k: ("F32", s) for k, s in shapes.items()}:
            raise AssertionError("decode wrote other tensors than the model's")
        dec["output_file_bytes"] = (work / "out.safetensors").stat().st_size

        for mode, call in (("decode", "gpucabac.decode(pathlib.Path('model.gcb').read_bytes())"),
                           ("load", "gpucabac.load('model.gcb')")):
            r = run_api(mode, work / "model.gcb", work / "warm.gcb", work)
            out_b = r["api"]["out_bytes"]
            if out_b != model_bytes or r["api"]["tensors"] != len(shapes):
                raise AssertionError(f"API {mode}: {r['api']['tensors']} tensors, {out_b} bytes; expected the model's")
            limit = DECODE_FACTOR * out_b + DECODE_SLACK
            peak = r["peak_bytes"]
            rec = {"name": f"API {mode}", "command": call, "measured_as": "VmHWM after - VmRSS before the call",
                   "peak_bytes": peak, "ref_bytes": out_b, "ref_what": "output", "ratio": peak / out_b,
                   "limit_bytes": limit, "limit_rule": f"{DECODE_FACTOR} x output + 64 MiB", "pass": peak <= limit,
                   "wall_s": r["api"]["call_s"], "rss_before_bytes": r["api"]["before"]["VmRSS"],
                   "hwm_after_bytes": r["api"]["after"]["VmHWM"], "hwm_reset": r["api"]["hwm_reset"],
                   "process_maxrss_bytes": r["maxrss_bytes"], "process_wall_s": r["wall_s"], "sampled": r["sampled"]}
            runs.append(rec)
            print(f"[bench] {rec['name']}: peak {_mib(peak)} MiB over {_mib(rec['rss_before_bytes'])} MiB before = "
                  f"{rec['ratio']:.3f} x output (limit {_mib(limit)} MiB: {'PASS' if rec['pass'] else 'FAIL'}), "
                  f"{rec['wall_s']:.1f} s", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    info["loadavg_end"] = C.loadavg()
    criteria = {
        "decode <= 1.1 x output + 64 MiB (API decode and load)": all(r["pass"] for r in runs if r["name"].startswith("API")),
        "CLI encode <= 2 x model": all(r["pass"] for r in runs if r["name"].startswith("CLI encode")),
        "CLI decode <= 2 x model": all(r["pass"] for r in runs if r["name"] == "CLI decode"),
    }
    ok = all(criteria.values())
    head = C.header_md("gpucabac peak memory (encode / decode)", info, model_desc, settings)
    rows = [[r["name"], f"`{r['command']}`", _mib(r["peak_bytes"]), _mib(r["ref_bytes"]) + f" ({r['ref_what']})",
             f"{r['ratio']:.3f}", _mib(r["limit_bytes"]) + f" ({r['limit_rule']})", "PASS" if r["pass"] else "FAIL",
             f"{r['wall_s']:.1f}"] for r in runs]
    split = [[r["name"], _mib(r.get("process_maxrss_bytes", r["peak_bytes"])), _mib(r["sampled"]["vmhwm_bytes"]),
              _mib(r["sampled"]["max_rss_bytes"]), _mib(r["sampled"]["anon_at_max_bytes"]),
              _mib(r["sampled"]["file_at_max_bytes"]), _mib(r["sampled"]["max_anon_bytes"]),
              _mib(r["baseline_bytes"]) if r.get("baseline_bytes") else
              (_mib(r["rss_before_bytes"]) + " before the call" if "rss_before_bytes" in r else "—")] for r in runs]
    md = [head,
          "Peak: CLI rows, the child's whole-process ru_maxrss (os.wait4); API rows, VmHWM after the call minus VmRSS "
          "just before it (the high-water mark reset by /proc/self/clear_refs; the API decode child holds the .gcb "
          "bytes before the call). MiB = 2^20 bytes; wall = the command's (CLI) or the call's (API) seconds.",
          *(["", "**--tiny**: a 2 M-weight model; the interpreter alone exceeds the limits, so the verdicts mean "
                 "nothing here."] if args.tiny else []),
          "", C.md_table(["run", "command", "peak MiB", "reference MiB", "peak / ref", "limit MiB", "verdict", "wall s"], rows), "",
          "## Criteria", "", C.md_table(["criterion", "verdict"], [[k, "PASS" if v else "FAIL"] for k, v in criteria.items()]), "",
          f"Overall: {'PASS' if ok else 'FAIL'}", "",
          *([] if args.tiny else _before_md(runs)),
          f"## Where the peak lies (sampled every {SAMPLE_S * 1000:.0f} ms from /proc/<pid>/status)", "",
          C.md_table(["run", "process ru_maxrss", "sampled VmHWM", "max VmRSS", "RssAnon at max", "RssFile at max",
                      "max RssAnon", "baseline"], split), "",
          "MiB. The process columns are whole-process figures (API rows too: interpreter, libraries, the warm-up "
          "and, for decode, the container bytes). Baseline: the same CLI command's peak on a 60 k-weight model "
          "(interpreter, numba, libraries). RssFile is mostly shared libraries (numba/llvmlite). "
          f"This parent's own peak (VmHWM): {_mib(max(r['parent_peak_bytes'] for r in runs if 'parent_peak_bytes' in r))} MiB. "
          f"Containers: default {enc['container_bytes']:,} bytes ({enc['bits_per_weight']:.3f} bits/weight)"
          + ("" if args.no_dq else f"; --dq {dq['container_bytes']:,} bytes ({dq['bits_per_weight']:.3f} bits/weight)") + "."]
    text = "\n".join(md)
    print(text[text.index("Peak:"):])
    payload = {"machine": info, "model": {"description": model_desc, "layout": dict(zip(("d", "ffn", "layers", "vocab"), layout)),
                                          "tensors": len(shapes), "weights": weights, "float32_bytes": model_bytes,
                                          "largest_tensor": [largest, list(shapes[largest])]},
               "settings": settings, "baseline_bytes": baseline, "runs": runs, "criteria": criteria,
               "pass": ok, "tiny": args.tiny,
               "before": None if args.tiny else {**BEFORE, "runs": {k: {"peak_bytes": b, "wall_s": w}
                                                                     for k, (b, w) in BEFORE["runs"].items()}}}
    d = C.out_dir(args.out, args.tiny)
    jp, mp = C.write_results(d, "bench_memory", payload, text)
    print(f"\nwrote {jp} and {mp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
