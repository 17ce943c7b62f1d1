"""Coding time against local training time per FL round (issue 13, item 5: target <= 5% for a
1 M-parameter model on the CPU).

Per method and local workload, a few bidirectional rounds of the VGG small (1 009 102
parameters) on Fashion-MNIST IID, in this process (gpucabac.fl.inprocess); per round the
"coding" of the Flower app's log: the slowest client's encode + decode of its upload + decode of
its downloads, plus the server's decode (with the averaging) and encode of the download; and the
slowest client's local training. Sparsifying, the scales' training and evaluation are not coding.

Workloads: "small" (run.py --size small: 600 samples per client, one epoch of ~10 steps) and
"full" (all ~6 000 samples of a client's part, ~94 steps), 10 clients, 3 a round. A warm-up
round (JAX and numba compilations) is run first and left out.

    python experiments/fl/coding_time.py [--size tiny|default] [--rounds N] [--methods a,b] [--out DIR]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # experiments/, for _common

import _common  # noqa: E402, F401  (sys.path for gpucabac)
from _common import RESULTS_DIR, machine_info, md_table, write_results  # noqa: E402

import run as fl_run  # noqa: E402  (experiments/fl/, this script's directory)

WORKLOADS = {"small": {}, "full": {"samples_per_client": None}}
DEFAULT_METHODS = ("sparse-ef", "scaled-delta", "stc", "gpucabac-dense")


def measure(method: str, workload: str, rounds: int, size: str) -> dict:
    from gpucabac.fl.inprocess import run_in_process
    from gpucabac.fl.task import initial_params

    config = fl_run.base_config("bidirectional", "tiny" if size == "tiny" else "small", model="vgg",
                                dataset="fashion_mnist", split="iid", fraction=None, rounds=rounds)
    config = config.replace(**fl_run.METHODS[method], **WORKLOADS[workload])
    run_in_process(config.replace(num_rounds=1))  # compilations
    history = run_in_process(config).history[1:]
    per_round = [{"round": h["round"], "coding-seconds": h["coding-seconds"], "train-seconds": h["train-seconds"],
                  "server-coding-seconds": h["server-coding-seconds"],
                  "client-coding-seconds": h["coding-seconds"] - h["server-coding-seconds"],
                  "share": h["coding-seconds"] / h["train-seconds"]} for h in history]
    return {"method": method, "workload": workload, "config": config.to_record(),
            "parameters": sum(v.size for v in initial_params(config).values()),
            "samples-per-client": config.samples_per_client, "rounds": per_round,
            "median-share": statistics.median(r["share"] for r in per_round),
            "max-share": max(r["share"] for r in per_round)}


def markdown(info: dict, settings: dict, results: list[dict]) -> str:
    lines = ["# FL coding time against local training time", "",
             f"- machine: {info['platform']}, {info['cpu']}, {info['cpu_count']} CPUs; date {info['date']}; "
             f"git commit {info['git_commit']}",
             f"- load average (1/5/15 min) at start: {info['loadavg_start']}, at end: {info.get('loadavg_end')}",
             "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()), "",
             "Per round (after a warm-up round): coding = the slowest client's encode + decode of its upload + "
             "decode of its downloads, plus the server's decode (with the averaging) and encode; training = the "
             "slowest client's local training. Sparsifying, the scales' training and evaluation are not coding. "
             "Share = coding / training (target <= 5%).", ""]
    rows = []
    for r in results:
        rs = r["rounds"]
        rows.append([r["method"], r["workload"], r["samples-per-client"] or "all",
                     f"{statistics.median(x['client-coding-seconds'] for x in rs) * 1e3:.0f}",
                     f"{statistics.median(x['server-coding-seconds'] for x in rs) * 1e3:.0f}",
                     f"{statistics.median(x['train-seconds'] for x in rs):.2f}",
                     f"{100 * r['median-share']:.1f}%", f"{100 * r['max-share']:.1f}%"])
    lines.append(md_table(["method", "workload", "samples per client", "client coding ms (median)",
                           "server coding ms (median)", "training s (median)", "share (median)", "share (max)"], rows))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "default"), default="default",
                   help="tiny: the tests' smoke run (tiny VGG, 2 rounds, small workload, one method)")
    p.add_argument("--rounds", type=int, default=None, help="rounds after the warm-up (default 4; tiny 2)")
    p.add_argument("--methods", default=None, help=f"comma-separated (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--out", help="results directory (default experiments/results/fl; tiny: a temp dir)")
    a = p.parse_args()
    tiny = a.size == "tiny"
    methods = a.methods.split(",") if a.methods else (["sparse-ef"] if tiny else list(DEFAULT_METHODS))
    unknown = sorted(set(methods) - set(fl_run.METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}")
    rounds = a.rounds or (2 if tiny else 4)
    workloads = ["small"] if tiny else list(WORKLOADS)
    info = machine_info()
    t0 = time.perf_counter()
    results = []
    for workload in workloads:
        for method in methods:
            r = measure(method, workload, rounds, a.size)
            print(f"{method} ({workload}): coding / training median {100 * r['median-share']:.1f}%, "
                  f"max {100 * r['max-share']:.1f}%", flush=True)
            results.append(r)
    info["loadavg_end"] = _common.loadavg()
    first = results[0]["config"]
    settings = {"experiment": "bidirectional", "model": f"vgg ({first['model-size']}, {results[0]['parameters']:,} "
                f"parameters)", "dataset": first["dataset"], "split": "iid", "num-clients": first["num-clients"],
                "fraction-train": first["fraction-train"], "density": first["density"],
                "scale-steps": first["scale-steps"], "rounds": rounds, "methods": methods, "workloads": workloads,
                "size": a.size, "seconds": round(time.perf_counter() - t0, 1)}
    out = pathlib.Path(a.out) if a.out else (pathlib.Path(tempfile.gettempdir()) / "gpucabac_fl" if tiny
                                             else RESULTS_DIR / "fl")
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(info, settings, results)
    jp, mp = write_results(out, "coding_time" + ("_tiny" if tiny else ""),
                           {"machine": info, "settings": settings, "results": results}, md)
    print(md)
    print(f"wrote {jp} and {mp}")


if __name__ == "__main__":
    main()
