"""The FL experiments of issue 14: every update method on the same federation, the same seeds and
the same schedule, in one of three settings, with accuracy against rounds and against every byte
sent.

    python experiments/fl/run.py unidirectional|bidirectional|partial [--size tiny|small|full]
        [--model vgg|resnet|mobilenet] [--dataset fashion_mnist|mnist] [--split iid|noniid]
        [--fraction F] [--rounds N] [--methods a,b,...] [--nncodec-methods a,b,...|none] [--out DIR]
    python experiments/fl/run.py report RESULT.json      # the table and figures again, from the JSON

Settings (docs/fl.md §3): "unidirectional" codes client → server and sends the server's update
as float32; "bidirectional" codes both ways, the server keeping its own residual (error
feedback) for its downloads; "partial" is bidirectional with only some layers trained and sent
(partial_layers: the last block and the classifier).

Methods (METHODS; FLConfig fields in brackets): fedavg (dense float32 both ways, the reference),
gpucabac-dense (the dense differences coded at the QP), sparse (top-k, no error feedback),
sparse-ef (top-k with error feedback), scaled-delta and scaled-filter (top-k, error feedback and
one trained scale per output filter, on the differential filter or the whole filter), stc
(sparse ternary compression, Sattler et al. 2019, with error accumulation; gpucabac/fl/stc.py).
Every sparse method keeps `density` of each update; the server's download keeps density x the
clients per round (FLConfig.download_density), for every method alike.

Each method runs in this process (gpucabac.fl.inprocess: the Flower app's rounds without Flower,
the same model bit for bit). Per round the JSON holds accuracy and loss of the server's model on
the test set, the bytes of the uploads and of the downloads sent that round (the bitstreams'
lengths: a download counts once per client that receives it), coding and training time; with
the machine, date, git commit and every setting. The Markdown table: the target accuracy (dense
FedAvg's final accuracy minus 1 point), per method the rounds and the total bytes (up + down,
cumulative, as sent) to reach it, that total as a ratio against FedAvg's, the final accuracy.
Figures: accuracy against rounds, and against cumulative bytes (log scale), one colour per
method in every figure.

NNCodec on the same updates (issue 14, item 4; experiments/fl/same_updates.py): for the methods
of --nncodec-methods (default sparse-ef and scaled-delta, where run) every coded update sent —
uploads, and downloads when coded — is recorded during the run and coded again afterwards by
gpucabac at NNCodec's FL QP (-26) and by NNCodec 2.1.3 at its FL defaults (methods_spec §6.1) in
its own venv; per round and direction the JSON (the method's "same-updates") and a section of the
Markdown give those bytes beside the bytes as sent. The training is the method's own, unchanged.
Without NNCodec's venv (or with GPUCABAC_NO_NNCODEC=1) NNCodec's part is skipped with a note.

Sizes: tiny (the tests' smoke run, seconds: tiny VGG, 2 clients, 2 rounds, a few hundred
samples), small (a 2-core CPU: VGG small, 10 clients, 3 of them per round, 600 samples each,
15 rounds, the full test set), full (a GPU or a long CPU run: 10 clients, half of them per round,
all training samples, 40 rounds). Results go to experiments/results/fl/ (tiny: a temp dir unless --out),
named <experiment>_<model>_<dataset>_<split>_<size>, with _<N>rounds and _fraction<F> added when
--rounds or --fraction leave the size's schedule.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # experiments/, for _common

import _common  # noqa: E402, F401  (sys.path for gpucabac)
from _common import RESULTS_DIR, machine_info, md_table, write_results  # noqa: E402

import same_updates as su  # noqa: E402  (experiments/fl/, this script's directory)

EXPERIMENTS = ("unidirectional", "bidirectional", "partial")
# method name -> FLConfig fields; the order is the colour order of every figure
METHODS = {
    "fedavg": {"method": "dense"},
    "gpucabac-dense": {"method": "coded"},
    "sparse": {"method": "sparse", "error_feedback": False},
    "sparse-ef": {"method": "sparse", "error_feedback": True},
    "scaled-delta": {"method": "scaled", "placement": "delta"},
    "scaled-filter": {"method": "scaled", "placement": "filter"},
    "stc": {"method": "stc", "error_feedback": True},
}
MODELS = ("vgg", "resnet", "mobilenet")
SIZES = {
    # tiny: a few local steps at a higher rate, so that the deltas outgrow the QP's half step
    "tiny": {"model_size": "tiny", "num_clients": 2, "fraction_train": 1.0, "samples_per_client": 128,
             "batch_size": 32, "lr": 0.005, "test_samples": 200, "num_rounds": 2, "scale_steps": 5, "density": 0.05},
    # small: sized for a 2-core CPU (clients run one after the other, ~3-8 s each a round)
    "small": {"model_size": "small", "num_clients": 10, "fraction_train": 0.3, "samples_per_client": 600,
              "test_samples": None, "num_rounds": 15, "scale_steps": 50, "density": 0.01},
    "full": {"model_size": "small", "num_clients": 10, "fraction_train": 0.5, "samples_per_client": None,
             "test_samples": None, "num_rounds": 40, "scale_steps": 50, "density": 0.01},
}
# the methods whose updates gpucabac codes (encode_deltas): what --nncodec-methods may name
SAME_UPDATES_METHODS = tuple(n for n, f in METHODS.items() if f["method"] in ("coded", "sparse", "scaled"))
TARGET_DROP = 0.01  # the target accuracy: dense FedAvg's final accuracy minus 1 point
# accuracies are counts over the test set: 0.115 - 0.01 is 0.10500000000000001 in floats, which an
# accuracy of exactly 0.105 must reach
TARGET_SLACK = 1e-9
ROUND_KEYS = ("round", "accuracy", "loss", "upload-bytes", "download-bytes", "next-download-bytes",
              "train-seconds", "coding-seconds", "server-coding-seconds", "seconds", "clients")


def base_config(experiment: str, size: str, *, model: str, dataset: str, split: str, fraction: float | None,
                rounds: int | None):
    from gpucabac.fl.config import FLConfig

    fields = dict(SIZES[size], model=model, dataset=dataset, alpha=0.5 if split == "noniid" else None, seed=0)
    if fraction is not None:
        fields["fraction_train"] = fraction
    if rounds is not None:
        fields["num_rounds"] = rounds
    fields["downstream"] = "dense" if experiment == "unidirectional" else "coded"
    config = FLConfig(**fields)
    if experiment == "partial":
        config = config.replace(layers=partial_layers(config))
    return config


def partial_layers(config) -> tuple[str, ...]:
    """The partial-update setting's layers: the model's last block (convs/N or blocks/N, N the
    highest) and its classifier (the top-level fc* layers)."""
    from gpucabac.fl.task import initial_params

    names = list(initial_params(config))
    blocks = {(n.split("/")[0], int(n.split("/")[1])) for n in names if n.split("/")[0] in ("convs", "blocks")}
    group, last = max(blocks, key=lambda b: b[1])
    return (f"{group}/{last}", *sorted({n.split("/")[0] for n in names if n.startswith("fc")}))


def run_method(config, name: str, echo, *, same_updates: tuple | None = None) -> dict:
    """One method's rounds; `same_updates` = (NNCodec's python or None, why not): also record its
    coded updates and code them again (same_updates.py), as the method's "same-updates"."""
    from gpucabac.fl.inprocess import run_in_process

    t0 = time.perf_counter()
    say = lambda line: echo(f"  {name}: {line}")  # noqa: E731
    if same_updates is None:
        run = run_in_process(config, echo=say)
    else:
        with tempfile.TemporaryDirectory(prefix="gpucabac_fl_same_") as td:
            with su.Recorder(pathlib.Path(td)) as recorder:
                run = run_in_process(config, echo=say, on_round=recorder.on_round)
            wall = time.perf_counter() - t0
            t1 = time.perf_counter()
            same = su.compare(recorder.messages, *same_updates, pathlib.Path(td))
            same["seconds"] = time.perf_counter() - t1
        for r in same["rounds"]:
            nn = r["nncodec-bytes"]
            say(f"same updates, round {r['round']} {r['direction']}: sent {r['sent-bytes']:,} B; at QP {same['qp']} "
                f"gpucabac {r['ours-bytes']:,} B (payload {r['ours-payload-bytes']:,} B), NNCodec payload "
                f"{'skipped' if nn is None else f'{nn:,} B'}")
    rounds = []
    for entry in run.history:
        row = {k: entry[k] for k in ROUND_KEYS if k in entry}
        if entry["round"]:
            row["kept"] = sum(c["kept"] for c in entry["clients-detail"])
            row["clients-detail"] = [{k: c[k] for k in ("partition-id", "upload-bytes", "kept", "encode-seconds",
                                                        "decode-seconds", "download-decode-seconds", "train-seconds",
                                                        "scale-seconds", "residual-norm") if k in c}
                                     for c in entry["clients-detail"]]
        rounds.append(row)
    out = {"config": config.to_record(), "wall-seconds": time.perf_counter() - t0, "rounds": rounds}
    if same_updates is not None:
        out["wall-seconds"] = wall  # the run's own; the coding again is same["seconds"]
        out["same-updates"] = same
    return out


# --- the report: computed from the JSON alone ---------------------------------------------------


def cumulative_bytes(rounds: list[dict]) -> list[float]:
    """Bytes sent up to and including each round (round 0: none), both directions."""
    out, total = [], 0.0
    for r in rounds:
        total += r.get("upload-bytes", 0.0) + r.get("download-bytes", 0.0)
        out.append(total)
    return out


def summarize(results: dict) -> dict:
    """The target accuracy and, per method, rounds and bytes to reach it, the ratio against FedAvg."""
    methods = results["methods"]
    ref = methods.get("fedavg")
    target = None if ref is None else ref["rounds"][-1]["accuracy"] - TARGET_DROP
    rows = {}
    for name, m in methods.items():
        cum = cumulative_bytes(m["rounds"])
        reached = None if target is None else next((r["round"] for r in m["rounds"][1:]
                                                     if r["accuracy"] >= target - TARGET_SLACK), None)
        rows[name] = {"final-accuracy": m["rounds"][-1]["accuracy"], "rounds-to-target": reached,
                      "bytes-to-target": None if reached is None else cum[reached],
                      "total-bytes": cum[-1], "upload-bytes": sum(r.get("upload-bytes", 0) for r in m["rounds"]),
                      "download-bytes": sum(r.get("download-bytes", 0) for r in m["rounds"]),
                      "coding-seconds": sum(r.get("coding-seconds", 0) for r in m["rounds"]),
                      "train-seconds": sum(r.get("train-seconds", 0) for r in m["rounds"])}
    ref_bytes = rows.get("fedavg", {}).get("bytes-to-target")
    for row in rows.values():
        row["ratio-vs-fedavg"] = (None if ref_bytes is None or row["bytes-to-target"] is None
                                  else ref_bytes / row["bytes-to-target"])
    # lower accuracy levels too, every 5 points from 0.5 up to the target: where sparse methods do
    # not reach the target in the rounds run, what each needs to reach the same accuracy as another
    top = target if target is not None else max(m["rounds"][-1]["accuracy"] for m in methods.values())
    levels = [round(0.5 + 0.05 * i, 2) for i in range(int((top - 0.5) / 0.05 + 1e-9) + 1)] if top >= 0.5 else []
    for name, m in methods.items():
        cum = cumulative_bytes(m["rounds"])
        first = {lv: next((r["round"] for r in m["rounds"][1:] if r["accuracy"] >= lv - TARGET_SLACK), None)
                 for lv in levels}
        rows[name]["bytes-to-level"] = {f"{lv:.2f}": None if r is None else cum[r] for lv, r in first.items()}
    return {"target-accuracy": target, "levels": [f"{lv:.2f}" for lv in levels], "methods": rows}


_PER_METHOD = {k.replace("_", "-") for fields in METHODS.values() for k in fields}


def _fmt_ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2f}x"


def _fmt_bytes(x: float | None) -> str:
    if x is None:
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"


def markdown(results: dict, summary: dict, figures: list[str]) -> str:
    info, settings = results["machine"], results["settings"]
    target = summary["target-accuracy"]
    rows = []
    for name, s in summary["methods"].items():
        ratio = s["ratio-vs-fedavg"]
        rows.append([name, "not reached" if s["rounds-to-target"] is None else str(s["rounds-to-target"]),
                     _fmt_bytes(s["bytes-to-target"]), "—" if ratio is None else f"{ratio:,.1f}x",
                     f"{s['final-accuracy']:.4f}", _fmt_bytes(s["upload-bytes"]), _fmt_bytes(s["download-bytes"]),
                     f"{s['coding-seconds']:.1f} / {s['train-seconds']:.1f}"])
    lines = [
        f"# FL {results['experiment']} ({results['size']}): bytes to reach the target accuracy",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {info['platform']}, {info['cpu']}, {info['cpu_count']} CPUs; devices {results['devices']}",
        f"- date: {info['date']}; git commit: {info['git_commit']}; wall time {results['wall-seconds']:.0f} s",
        "- settings (all methods): " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in _PER_METHOD),
        "- per method: " + "; ".join(f"{name}: " + ", ".join(f"{k.replace('_', '-')}={v}" for k, v in fields.items())
                                     for name, fields in METHODS.items() if name in results["methods"]),
        "",
        "Target: dense FedAvg's final accuracy minus 1 point"
        + ("" if target is None else f" = {target:.4f}") + ". Bytes are cumulative, both directions, as sent "
        "(uploads of the clients that trained, and each download once per client that received it) up to the "
        "first round whose accuracy reaches the target; the ratio is FedAvg's bytes over the method's (higher: "
        "less data). Coding / training: seconds summed over rounds (per round the slowest client's, plus the "
        "server's coding).",
        "",
        md_table(["method", "rounds to target", "bytes to target", "vs FedAvg", "final accuracy", "bytes up",
                  "bytes down", "coding / training s"], rows),
        "",
    ]
    if summary["levels"]:
        ref = summary["methods"].get("fedavg", {}).get("bytes-to-level", {})
        level_rows = []
        for name, s in summary["methods"].items():
            cells = []
            for lv in summary["levels"]:
                b = s["bytes-to-level"][lv]
                r = ref.get(lv)
                cells.append("—" if b is None else _fmt_bytes(b) + ("" if not r else f" ({_fmt_ratio(r / b)})"))
            level_rows.append([name, *cells])
        lines += ["## Bytes to reach each accuracy", "",
                  "Cumulative bytes, both directions, as above, to the first round at or above each accuracy "
                  "(in brackets: FedAvg's bytes to the same accuracy over the method's); —: not reached in the rounds run.",
                  "", md_table(["method", *summary["levels"]], level_rows), ""]
    lines += su.markdown_section(results, md_table)
    lines += [f"![{f}]({f})" for f in figures]
    return "\n".join(lines)


def figures(results: dict, directory: pathlib.Path, stem: str, target: float | None) -> list[str]:
    """accuracy vs rounds and vs cumulative bytes (log x); a method's colour is its place in METHODS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpucabac.plotting import save_figure_atomic

    colours = plt.get_cmap("tab10").colors
    colour = {name: colours[i % len(colours)] for i, name in enumerate(METHODS)}
    names = []
    for kind in ("rounds", "bytes"):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for name, m in results["methods"].items():
            acc = [r["accuracy"] for r in m["rounds"]]
            if kind == "rounds":
                ax.plot([r["round"] for r in m["rounds"]], acc, marker=".", color=colour.get(name), label=name)
            else:  # round 0 sent nothing: not on a log axis
                ax.plot(cumulative_bytes(m["rounds"])[1:], acc[1:], marker=".", color=colour.get(name), label=name)
        if target is not None:
            ax.axhline(target, color="0.5", linestyle="--", linewidth=1, label="target (FedAvg − 1 pt)")
        if kind == "bytes":
            ax.set_xscale("log")
            ax.set_xlabel("cumulative bytes sent, up + down (log scale)")
        else:
            ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        st = results["settings"]
        split = "IID" if st.get("alpha") in (None, "none") else f"non-IID α {st['alpha']}"
        ax.set_title(f"{results['experiment']} ({results['size']}), {st['model']} on {st['dataset']}, {split}, "
                     f"{st['num-rounds']} rounds: accuracy vs {kind}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{stem}_accuracy_vs_{kind}.png"
        save_figure_atomic(fig, directory / name)
        plt.close(fig)
        names.append(name)
    return names


def report(results: dict, directory: pathlib.Path, stem: str) -> pathlib.Path:
    summary = summarize(results)
    results["summary"] = summary
    figs = figures(results, directory, stem, summary["target-accuracy"])
    jp, mp = write_results(directory, stem, results, markdown(results, summary, figs))
    return mp


# --- the command ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=(*EXPERIMENTS, "report"))
    p.add_argument("json", nargs="?", help="report: the result JSON to tabulate and plot again")
    p.add_argument("--size", choices=tuple(SIZES), default="small")
    p.add_argument("--model", choices=MODELS, default="vgg")
    p.add_argument("--dataset", choices=("fashion_mnist", "mnist"), default="fashion_mnist")
    p.add_argument("--split", choices=("iid", "noniid"), default="iid", help="noniid: Dirichlet alpha 0.5")
    p.add_argument("--fraction", type=float, help="clients per round, as a fraction (default: the size's)")
    p.add_argument("--rounds", type=int, help="rounds (default: the size's)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--nncodec-methods", default="sparse-ef,scaled-delta",
                   help="methods whose updates NNCodec codes again, where run (same_updates.py); 'none': no method")
    p.add_argument("--out", help="results directory (default experiments/results/fl; --size tiny: a temp dir)")
    a = p.parse_args(argv)
    if a.experiment == "report":
        if not a.json:
            p.error("report needs the result JSON")
        path = pathlib.Path(a.json)
        print(report(json.loads(path.read_text()), path.parent, path.stem))
        return 0
    methods = [m for m in a.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    again = [] if a.nncodec_methods == "none" else [m for m in a.nncodec_methods.split(",") if m]
    wrong = [m for m in again if m not in SAME_UPDATES_METHODS]
    if wrong:
        p.error(f"--nncodec-methods {wrong}: only methods gpucabac codes ({', '.join(SAME_UPDATES_METHODS)})")
    again = [m for m in again if m in methods]
    out = pathlib.Path(a.out) if a.out else (pathlib.Path(tempfile.gettempdir()) / "gpucabac_fl" if a.size == "tiny"
                                             else RESULTS_DIR / "fl")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{a.experiment}_{a.model}_{a.dataset}_{a.split}_{a.size}"
    # a run off its size's schedule gets a name of its own, beside the size's results
    if a.rounds is not None and a.rounds != SIZES[a.size]["num_rounds"]:
        stem += f"_{a.rounds}rounds"
    if a.fraction is not None and a.fraction != SIZES[a.size]["fraction_train"]:
        stem += f"_fraction{a.fraction:g}"
    base = base_config(a.experiment, a.size, model=a.model, dataset=a.dataset, split=a.split, fraction=a.fraction,
                       rounds=a.rounds)
    from gpucabac.fl import xla_threads  # noqa: F401  (XLA's flags before JAX starts, as every FL process)
    import jax

    results = {"experiment": a.experiment, "size": a.size, "command": " ".join(["python", "experiments/fl/run.py",
                                                                               *(argv or sys.argv[1:])]),
               "machine": machine_info(), "devices": [str(d) for d in jax.devices()],
               "xla-flags": os.environ.get("XLA_FLAGS", ""), "settings": base.to_record(),
               "target-drop": TARGET_DROP, "nncodec-methods": again, "methods": {}}
    nncodec = None
    if again:
        nncodec = su.nncodec_python()
        if nncodec[0] is None:
            print(f"NNCodec on the same updates of {', '.join(again)}: skipped, {nncodec[1]}; "
                  "gpucabac's side still runs", flush=True)
    t0 = time.perf_counter()
    for name in methods:
        print(f"{a.experiment} ({a.size}): {name}", flush=True)
        config = base.replace(**METHODS[name])
        results["methods"][name] = run_method(config, name, lambda line: print(line, flush=True),
                                              same_updates=nncodec if name in again else None)
        results["wall-seconds"] = time.perf_counter() - t0
        write_results(out, stem, results, f"# FL {a.experiment} ({a.size}): running, {len(results['methods'])} of "
                      f"{len(methods)} methods done")  # partial results survive an interrupted run
    results["machine"]["loadavg_end"] = _common.loadavg()
    print(report(results, out, stem))
    return 0


if __name__ == "__main__":
    sys.exit(main())
