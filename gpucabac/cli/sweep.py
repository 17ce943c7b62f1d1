"""`gpucabac sweep`: an RD sweep of a model over steps x lambdas x methods, written as JSON."""

from __future__ import annotations

import importlib
import pathlib
import sys
import time
from collections.abc import Callable

import click

import gpucabac as api

from .. import io as gio
from ..dtypes import is_float
from ..importance import file_digest, read_importance, sweep_weighting
from ..modes import QUANTIZERS
from ..tables import MAX_GT_FLAGS
from ._common import Failure, check_output, count, fmt_snr, force_option, progress_bar, table, weights


def _import_task(spec: str) -> Callable[[dict], float]:
    """FUNC of MODULE:FUNC, imported with the current directory on the path."""
    module, _, func = spec.partition(":")
    if not module or not func:
        raise click.BadParameter(f"--task: {spec!r} is not MODULE:FUNC")
    if "" not in sys.path and str(pathlib.Path.cwd()) not in sys.path:
        sys.path.insert(0, str(pathlib.Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise Failure(f"--task {spec}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise Failure(f"--task {spec}: {func!r} is not callable")
    return fn


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(f"{what}: {text!r} is not a comma-separated list of numbers") from e


@click.command(name="sweep")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="JSON file for the results (per tensor and per model).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Also write the rows as CSV.")
@click.option("--qp-range", default="-40:-26", show_default=True,
              help="Steps from NNC QPs A:B (inclusive, step 1) at --qp-density.")
@click.option("--steps", default=None, help="Comma-separated step sizes instead of --qp-range.")
@click.option("--qp-density", type=click.IntRange(0, 7), default=2, show_default=True,
              help="QPs per doubling of the step are 2^density (for --qp-range).")
@click.option("--lams", default="0,0.05,0.1,0.2", show_default=True,
              help="Comma-separated lambdas, in step² per bit (0: plain quantizer).")
@click.option("--methods", default="urq,dq", show_default=True,
              help=f"Comma-separated quantizers: {', '.join(QUANTIZERS)} (dq: NNC's 8-state trellis; dq16 .. dq256 larger ones).")
@click.option("--slice-size", type=click.IntRange(min=1), default=api.DEFAULT_SLICE_SIZE, show_default=True,
              help="Weights per independently coded slice.")
@click.option("--gt-flags", type=click.IntRange(0, MAX_GT_FLAGS), default=api.DEFAULT_GT_FLAGS, show_default=True,
              help="Greater-than flags before the Exp-Golomb remainder.")
@click.option("--tensors", "only", default=None, help="Comma-separated tensor names (default: all 2-D+ float tensors).")
@click.option("--exact/--no-exact", default=True, show_default=True,
              help="Also run the real coder on every setting's levels (exact rates).")
@click.option("--task", "task_spec", default=None, metavar="MODULE:FUNC",
              help="Also score every setting with FUNC(model) -> float, imported from MODULE (the current "
                   "directory is searched); model maps every tensor name to its array, the swept ones "
                   "quantized at the setting.")
@click.option("--task-label", default="task metric", show_default=True, help="Name of the task metric in plots.")
@click.option("--task-lower-is-better", is_flag=True, help="The task metric is a loss (default: higher is better).")
@click.option("--importance", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Importance of every weight (as for encode), one array per swept tensor: each weight's "
                   "error is weighted by its smoothed importance (mean 1 per tensor, so lambda means the same "
                   "in every tensor), and each tensor's weighted error by its mean importance relative to "
                   "the others', so that `encode --sweep` gives the important tensors the bits.")
@force_option
def command(model, output, csv_path, qp_range, steps, qp_density, lams, methods, slice_size, gt_flags, only, exact,
            task_spec, task_label, task_lower_is_better, importance, force):
    """RD sweep of MODEL over steps x lambdas x methods: estimated and exact rate, MSE, SNR."""
    task = None if task_spec is None else _import_task(task_spec)
    for out in (output, csv_path):
        if out is not None:
            check_output(out, [model, importance], force)
    tensors = gio.read_model(model)
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise Failure(f"{model}: no tensor named {', '.join(map(repr, missing))}")
        tensors = {n: tensors[n] for n in names}
    if steps:
        step_list = _floats(steps, "--steps")
    else:
        try:
            a, b = (int(v) for v in qp_range.split(":"))
        except ValueError as e:
            raise click.BadParameter(f"--qp-range: {qp_range!r} is not A:B") from e
        step_list = [api.step_from_qp(q, qp_density) for q in range(min(a, b), max(a, b) + 1)]
    lam_list = _floats(lams, "--lams")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    swept = {n: t for n, t in tensors.items() if t.ndim >= 2 and is_float(t)}
    weighting: dict = {}
    if importance is not None:
        shapes, scales = sweep_weighting(read_importance(importance, tensors), list(swept))
        weighting = dict(importance=shapes, tensor_weights=scales)
    from ..sweeps import sweep_work  # noqa: PLC0415  (the sweep's modules load when it runs, not for --help)

    total = sweep_work(weights(swept), len(step_list), len(lam_list), len(method_list), exact)
    start = time.perf_counter()
    with progress_bar(total, "sweep") as progress:
        res = api.sweep(swept, step_list, lam_list, methods=method_list, slice_size=slice_size,
                        num_gt_flags=gt_flags, exact=exact, progress=progress, **weighting)
    if importance is not None:
        res.settings["importance_file"] = dict(path=str(importance), sha256=file_digest(importance))
    if task is not None:
        with progress_bar(len(res.model), "task") as progress:
            api.evaluate_task(res, tensors, task, label=task_label, higher_is_better=not task_lower_is_better,
                              importance=weighting.get("importance"), progress=progress)
    res.settings["model"] = str(model)
    res.settings["seconds"] = time.perf_counter() - start
    res.to_json(output)
    if csv_path is not None:
        res.to_csv(csv_path)
    key = "exact_bpw" if exact else "est_bpw"
    rows = [[m["method"], "per tensor" if m["step"] is None else f"{m['step']:.6g}", f"{m['lam']:g}", f"{m['est_bpw']:.4f}",
             f"{m.get('exact_bpw', float('nan')):.4f}", fmt_snr(m["snr_db"])] + ([f"{m['task']:.6g}"] if task else [])
            for m in sorted(res.model, key=lambda m: (m["method"], m[key]))]
    headers = ["method", "step", "lam", "est bpw", "exact bpw", "SNR dB"] + ([task_label] if task else [])
    click.echo(table(headers, rows, right=set(range(1, len(headers)))))
    click.echo(f"{output}: {len(res.model)} settings over {count(len(swept), 'tensor')} in {res.settings['seconds']:.1f} s")
