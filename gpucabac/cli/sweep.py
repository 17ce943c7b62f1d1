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
from ._common import Failure, check_output, count, fmt_snr, force_option, note, progress_bar, table, weights


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
@click.argument("models", nargs=-1, required=True)
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
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the sweep's tasks on a Ray cluster (needs gpucabac[ray] on every node): 'auto' for the "
                   "cluster running on this machine (`ray start --head`), 'local' for a new Ray instance of this "
                   "command, or the cluster's address (host:port, ray://host:10001). The results are those of a "
                   "local run.")
@click.option("--ray-gpus", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="With --ray: GPUs each task asks for (1: one GPU per task; 0: CPU workers).")
@force_option
def command(models, output, csv_path, qp_range, steps, qp_density, lams, methods, slice_size, gt_flags, only, exact,
            task_spec, task_label, task_lower_is_better, importance, ray_address, ray_gpus, force):
    """RD sweep of one or more MODELS over steps x lambdas x methods: estimated and exact rate, MSE,
    SNR. Several models go into one result file (rows per model; `gpucabac plot` draws one marker
    per model)."""
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise click.UsageError(f"model {repeated[0]!r} is given twice")
    if importance is not None and len(models) > 1:
        raise click.UsageError("--importance holds one model's importance; sweep the models one at a time")
    if ray_gpus and ray_address is None:
        raise click.UsageError("--ray-gpus needs --ray")
    task = None if task_spec is None else _import_task(task_spec)
    for out in (output, csv_path):
        if out is not None:
            check_output(out, [*models, importance], force)
    all_tensors = {}
    for model in models:
        tensors = gio.read_model(model)
        if only:
            names = [n.strip() for n in only.split(",") if n.strip()]
            missing = [n for n in names if n not in tensors]
            if missing:
                raise Failure(f"{model}: no tensor named {', '.join(map(repr, missing))}")
            tensors = {n: tensors[n] for n in names}
        all_tensors[model] = tensors
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
    swept = {model: {n: t for n, t in tensors.items() if t.ndim >= 2 and is_float(t)}
             for model, tensors in all_tensors.items()}
    weighting: dict = {}
    if importance is not None:
        model, = models
        shapes, scales = sweep_weighting(read_importance(importance, all_tensors[model]), list(swept[model]))
        weighting = dict(importance=shapes, tensor_weights=scales)
    from ..sweeps import sweep_work  # noqa: PLC0415  (the sweep's modules load when it runs, not for --help)

    executor = None
    if ray_address is not None:
        from ..ray_sweeps import RayExecutor  # noqa: PLC0415  (ray loads when the run starts)

        def retried(t, attempt, error):
            note(f"{t.describe()} failed ({type(error).__name__}); resubmitted (attempt {attempt + 2})")

        executor = RayExecutor(ray_address, num_cpus=0 if ray_gpus else 1, num_gpus=ray_gpus, on_retry=retried)
    total = sum(sweep_work(weights(s), len(step_list), len(lam_list), len(method_list), exact) for s in swept.values())
    start = time.perf_counter()
    common = dict(methods=method_list, slice_size=slice_size, num_gt_flags=gt_flags, exact=exact, executor=executor)
    with progress_bar(total, "sweep") as progress:
        if len(models) == 1:
            res = api.sweep(swept[models[0]], step_list, lam_list, progress=progress, **common, **weighting)
        else:
            res = api.sweep_models(swept, step_list, lam_list, progress=progress, **common)
    if importance is not None:
        res.settings["importance_file"] = dict(path=str(importance), sha256=file_digest(importance))
    if task is not None:
        with progress_bar(len(res.model), "task") as progress:
            for model in models:
                one = res.of_model(model) if len(models) > 1 else res
                api.evaluate_task(one, all_tensors[model], task, label=task_label,
                                  higher_is_better=not task_lower_is_better,
                                  importance=weighting.get("importance"), progress=progress)
            res.settings["task"] = one.settings["task"]
    if len(models) == 1:
        res.settings["model"] = str(models[0])
    if executor is not None:
        res.settings["ray"] = dict(address=ray_address, gpus_per_task=ray_gpus,
                                   failed_attempts=[f"{t.describe()}, attempt {a + 1}: {e}" for t, a, e in executor.failures])
    res.settings["seconds"] = time.perf_counter() - start
    res.to_json(output)
    if csv_path is not None:
        res.to_csv(csv_path)
    key = "exact_bpw" if exact else "est_bpw"
    several = len(models) > 1
    rows = [([m["model"]] if several else []) + [
             m["method"], "per tensor" if m["step"] is None else f"{m['step']:.6g}", f"{m['lam']:g}", f"{m['est_bpw']:.4f}",
             f"{m.get('exact_bpw', float('nan')):.4f}", fmt_snr(m["snr_db"])] + ([f"{m['task']:.6g}"] if task else [])
            for m in sorted(res.model, key=lambda m: (models.index(m.get("model", models[0])), m["method"], m[key]))]
    headers = (["model"] if several else []) + ["method", "step", "lam", "est bpw", "exact bpw", "SNR dB"] + (
        [task_label] if task else [])
    click.echo(table(headers, rows, right=set(range(1 + several, len(headers)))))
    n_swept = sum(len(s) for s in swept.values())
    of = f" of {count(len(models), 'model')}" if several else ""
    retries = f", {count(len(executor.failures), 'failed task attempt')} retried" if executor and executor.failures else ""
    click.echo(f"{output}: {len(res.model)} settings over {count(n_swept, 'tensor')}{of} in "
               f"{res.settings['seconds']:.1f} s{retries}")
