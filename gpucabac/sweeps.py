"""RD sweeps: every (method, step, lam) setting of a model's tensors, with the estimated rate from
the JAX quantizer (gpucabac.rdquant) and the exact rate of the real coder on the chosen levels;
and the choice of an operating point (target bits/weight, target SNR or MSE) from a sweep.

Results are self-describing JSON (and CSV); plotting is a separate step (`plotting.plot_sweeps`,
matplotlib optional). The work runs as (model, tensor chunk, grid chunk) tasks on an executor:
`LocalExecutor` here, `ray_sweeps.RayExecutor` over a Ray cluster, the same rows either way
(docs/design.md §9).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from . import container
from .dtypes import is_float
from .errors import InputError, SweepTaskError
from .io import atomic_write_bytes
from .layout import num_slices, used_contexts
from .metrics import signal_of as signal_of, snr_db as _snr
from .modes import QUANTIZERS, mode_dq
from .quantization import dequantize
from .settings import CodingSettings

METHODS = QUANTIZERS  # urq; dq (NNC's 8-state trellis), dq16 .. dq256


def _header_bytes(name, x, step, mode, n_gt, slice_size, n_used) -> int:
    nsl = max(1, num_slices(x.size, slice_size))
    rec = container.TensorRecord(name, "float32", tuple(int(d) for d in x.shape), mode, float(step), n_gt, slice_size,
                                 np.zeros(n_used, np.uint8), 0, np.zeros(nsl, np.uint32), np.zeros(nsl, np.uint32))
    return container.record_size(rec)


_NUMBER = (int, float)
# a model row's step is None when the tensors had grids of their own (the row is a grid index)
_MODEL_KEYS = dict(method=str, step=(int, float, type(None)), lam=_NUMBER, numel=int, sse=_NUMBER, wsse=_NUMBER, signal=_NUMBER,
                   est_bits=_NUMBER, est_bpw=_NUMBER, snr_db=_NUMBER)
_ROW_KEYS = dict(_MODEL_KEYS, step=_NUMBER, tensor=str)  # what choose_operating_point, aggregate and the plots read


@dataclasses.dataclass
class SweepResult:
    """rows: one dict per (method, step, lam, tensor); model: one per (method, grid index, lam).
    A sweep of several models (`sweep_models`) has both per model (each row names its "model"),
    and settings["models"] the settings of each; `of_model` is one model's sweep."""

    settings: dict
    rows: list[dict]
    model: list[dict]
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. {"nncodec": [points]}

    @property
    def models(self) -> list[str]:
        """The models of a sweep of several, in sweep order; [] for a sweep of one."""
        return list(self.settings.get("models") or {})

    def of_model(self, name: str) -> SweepResult:
        """One model of a sweep of several: its rows (the same dicts, so a value set on them, as
        `evaluate_task` does, shows in both) and the sweep's settings with that model's own."""
        models = self.settings.get("models") or {}
        if name not in models:
            raise InputError(f"the sweep has no model {name!r} (it has {', '.join(map(repr, models)) or 'one, unnamed'})")
        st = {k: v for k, v in self.settings.items() if k != "models"}
        st.update(models[name])
        st.setdefault("model", name)
        return SweepResult(st, [r for r in self.rows if r.get("model") == name],
                           [m for m in self.model if m.get("model") == name], self.extra)

    def _one_model(self, what: str) -> None:
        if self.models:
            raise InputError(f"{what} takes the sweep of one model; this one has {', '.join(map(repr, self.models))}: "
                             "choose one with result.of_model(name)")

    def to_json(self, path) -> None:
        """Write the sweep as JSON, atomically (a failed run leaves no partial file)."""
        text = json.dumps({"kind": "gpucabac-sweep", "settings": self.settings, "model": self.model,
                           "tensors": self.rows, **self.extra}, indent=1, default=float) + "\n"
        atomic_write_bytes(path, text.encode())

    def to_csv(self, path) -> None:
        """Write the per-tensor rows, then one "(model)" row per setting, as CSV, atomically."""
        keys = list(self.rows[0]) if self.rows else []
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        for m in self.model:
            w.writerow({**{k: "" for k in keys}, **{k: v for k, v in m.items() if k in keys}, "tensor": "(model)"})
        atomic_write_bytes(path, buf.getvalue().encode())

    @classmethod
    def from_json(cls, path) -> SweepResult:
        try:
            d = json.loads(pathlib.Path(path).read_bytes())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"{path}: not a sweep file (not JSON: {e})") from e
        if not isinstance(d, dict) or d.get("kind") != "gpucabac-sweep":
            raise InputError(f"{path}: not a sweep file (written by gpucabac sweep / SweepResult.to_json)")
        for part, keys in (("tensors", _ROW_KEYS), ("model", _MODEL_KEYS)):
            items = d.get(part, [])
            if not isinstance(items, list):
                raise InputError(f"{path}: {part!r} is not a list")
            for i, r in enumerate(items):
                bad = [k for k, kind in keys.items() if not isinstance(r, dict) or not isinstance(r.get(k), kind)]
                if bad:
                    raise InputError(f"{path}: {part}[{i}] lacks {', '.join(bad)} (or has the wrong type)")
        if not isinstance(d.get("settings", {}), dict):
            raise InputError(f"{path}: 'settings' is not an object")
        models = d.get("settings", {}).get("models")
        if models is not None:
            if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
                raise InputError(f"{path}: settings 'models' is not an object of per-model settings")
            for part in ("tensors", "model"):
                for i, r in enumerate(d.get(part, [])):
                    if r.get("model") not in models:
                        raise InputError(f"{path}: {part}[{i}] names model {r.get('model')!r}, which is not in "
                                         "settings 'models'")
        extra = {k: v for k, v in d.items() if k not in ("kind", "settings", "model", "tensors")}
        return cls(d.get("settings", {}), d.get("tensors", []), d.get("model", []), extra)


def _setting_key(r: dict):
    """What identifies a row's setting across tensors: its grid index (sweeps that record it) or
    its step (older sweeps, where every tensor had the same grid)."""
    return r.get("grid_index", r["step"])


@dataclasses.dataclass(frozen=True)
class SweepTask:
    """One unit of a sweep's work, run whole by an executor: one method over a chunk of one
    model's tensors, at the grid indices `grid` = [k0, k1) and every lambda. Every slice is
    quantized and coded on its own, so a task's rows are those of the same settings in any other
    split of the sweep: an executor may run the tasks anywhere, in any order."""

    index: int
    model: str | None  # the model's name in a sweep of several (sweep_models), else None
    method: str
    chunk: int  # which of the sweep's tensor chunks (what `run_task` gets as `chunk`) it quantizes
    tensors: tuple[str, ...]
    grid: tuple[int, int]
    work: int  # its progress units (weight-settings, as `sweep_work` counts them)

    def describe(self) -> str:
        """The task as an error message or a note names it."""
        what = self.tensors[0] if len(self.tensors) == 1 else (
            f"{len(self.tensors)} tensors, {self.tensors[0]} .. {self.tensors[-1]}")
        of = "" if self.model is None else f" of {self.model}"
        k0, k1 = self.grid
        at = f"grid index {k0}" if k1 - k0 == 1 else f"grid indices {k0}..{k1 - 1}"
        return f"sweep task {self.index} ({self.method} on {what}{of}, {at})"


class LocalExecutor:
    """Runs a sweep's tasks one after the other in this process: the default executor.

    `tensor_chunk` (weights; a larger tensor makes a chunk alone) and `steps_chunk` (grid
    indices) split the work into tasks as a distributed executor would; the default is one task
    per method and model, whose quantizer batches the slices of all its tensors."""

    def __init__(self, *, tensor_chunk: int | None = None, steps_chunk: int | None = None):
        self.tensor_chunk = _positive_or_none(tensor_chunk, "LocalExecutor: tensor_chunk")
        self.steps_chunk = _positive_or_none(steps_chunk, "LocalExecutor: steps_chunk")

    def chunking(self, numel: int, n_steps: int, n_lams: int, n_methods: int) -> tuple[int | None, int | None]:
        """(tensor_chunk, steps_chunk) for a sweep whose largest model has `numel` swept weights."""
        return self.tensor_chunk, self.steps_chunk

    def run(self, tasks: Sequence[SweepTask], chunks: Sequence[dict], common: dict,
            progress: Callable[[int], None] | None = None):
        """Yields (task, its rows per tensor) as each task finishes (`run_task`)."""
        for task in tasks:
            yield task, run_task(task, chunks[task.chunk], common, progress)


def _positive_or_none(v, what: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise InputError(f"{what} must be a positive integer or None, got {v!r}")
    return int(v)


@dataclasses.dataclass
class _Model:
    """One model's swept tensors and what its rows need, validated."""

    label: str | None
    names: list[str]
    xs: dict
    grids: dict
    imp: dict
    weights: dict
    signals: dict
    importance: bool
    tensor_weights: bool

    @property
    def numel(self) -> int:
        return int(sum(x.size for x in self.xs.values()))

    def settings(self) -> dict:
        common = all(g == self.grids[self.names[0]] for g in self.grids.values())
        return dict(steps=self.grids[self.names[0]] if common else {n: self.grids[n] for n in self.names},
                    importance=self.importance, tensors=self.names,
                    tensor_weights=self.weights if self.tensor_weights else None, numel=self.numel)


def _prepare(label, tensors, steps, importance, tensor_weights) -> _Model:
    of = "" if label is None else f"model {label!r}: "
    names = [n for n, x in tensors.items() if np.asarray(x).ndim >= 2 and is_float(np.asarray(x))]
    if not names:
        raise InputError(f"{of}no floating-point tensors with two or more dimensions to sweep")
    weights = {n: 1.0 for n in names}
    for n, v in (tensor_weights or {}).items():
        if n not in weights:
            raise InputError(f"{of}tensor_weights names {n!r}, which is not a swept tensor")
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = math.nan
        if not (math.isfinite(v) and v > 0):
            raise InputError(f"{of}tensor_weights[{n!r}] must be a positive number, got {tensor_weights[n]!r}")
        weights[n] = v
    xs = {n: np.asarray(tensors[n]) for n in names}
    if isinstance(steps, Mapping):
        missing = [n for n in names if n not in steps]
        if missing:
            raise InputError(f"{of}steps has no grid for the swept tensors {missing}")
        grids = {n: [float(v) for v in steps[n]] for n in names}
    else:
        grids = {n: [float(v) for v in steps] for n in names}
    K = len(grids[names[0]])
    if K == 0 or any(len(g) != K for g in grids.values()):
        raise InputError(f"{of}every tensor needs a grid of the same, non-zero number of steps")
    imp = {n: np.asarray(importance[n], np.float64).reshape(xs[n].shape) for n in names
           if importance is not None and n in importance}
    return _Model(label, names, xs, grids, imp, weights, {n: signal_of(x) for n, x in xs.items()},
                  importance is not None, tensor_weights is not None)


def _tensor_chunks(m: _Model, tensor_chunk: int | None) -> list[list[str]]:
    """Consecutive tensors, at most `tensor_chunk` weights a chunk (a larger tensor alone)."""
    groups: list[list[str]] = []
    size = 0
    for n in m.names:
        if groups and (tensor_chunk is None or size + m.xs[n].size <= tensor_chunk):
            groups[-1].append(n)
            size += m.xs[n].size
        else:
            groups.append([n])
            size = m.xs[n].size
    return groups


def run_task(task: SweepTask, chunk: dict, common: dict, progress: Callable[[int], None] | None = None) -> dict[str, list[dict]]:
    """The rows of one sweep task, per tensor (in grid, then lambda order): what every executor
    runs. `chunk` holds the task's tensors and what their rows need (the sweep's tensor chunk
    `task.chunk`), `common` the sweep's settings; `progress` as for `sweep`."""
    from .codec import encode_levels  # noqa: PLC0415
    from .rdquant import rd_quantize_tensors  # noqa: PLC0415

    lams, exact, slice_size, num_gt_flags = common["lams"], common["exact"], common["slice_size"], common["num_gt_flags"]
    dq = mode_dq(task.method)
    n_used = len(used_contexts(num_gt_flags, dq))
    xs = {n: chunk["tensors"][n] for n in task.tensors}
    imp = {n: chunk["importance"][n] for n in task.tensors if n in chunk["importance"]}
    total = sum(x.size for x in xs.values())
    k0, k1 = task.grid
    # all the task's slices in one stream per call; steps chunked so that the levels fit level_bytes
    kc = max(1, min(k1 - k0, common["level_bytes"] // max(1, 4 * total * len(lams)))) if exact else k1 - k0
    first = {} if task.model is None else {"model": task.model}
    by_tensor: dict[str, list[dict]] = {n: [] for n in task.tensors}
    for a in range(k0, k1, kc):
        sub = {n: chunk["grids"][n][a : min(k1, a + kc)] for n in task.tensors}
        results = rd_quantize_tensors(xs, sub, lams, dq=dq, slice_size=slice_size, num_gt_flags=num_gt_flags,
                                      importance=imp or None, with_levels=exact, progress=progress)
        for name, x in xs.items():
            res, S, signal, weight = results[name], min(slice_size, x.size), chunk["signals"][name], chunk["weights"][name]
            w64 = x.astype(np.float64).reshape(-1) if exact else None
            f = imp[name].reshape(-1) if name in imp else None
            for ki, step in enumerate(sub[name]):
                hdr = _header_bytes(name, x, step, task.method, num_gt_flags, S, n_used)
                for li, lam in enumerate(lams):
                    row = dict(first, method=task.method, step=step, grid_index=a + ki, lam=lam, tensor=name,
                               numel=int(x.size), est_payload_bits=float(res.bits[ki, li]), header_bits=8 * hdr,
                               est_bits=float(res.bits[ki, li]) + 8 * hdr,
                               wsse=weight * float(res.wdist[ki, li]), sse=float(res.dist[ki, li]), signal=signal)
                    if exact:
                        lv = res.levels[ki, li]
                        _, payload, _ = encode_levels(lv, S, dq, num_gt_flags)
                        err = dequantize(lv, step, (x.size,), np.float32).astype(np.float64) - w64
                        row["exact_bits"] = 8 * int(payload.size) + 8 * hdr
                        row["payload_bits"] = 8 * int(payload.size)
                        row["sse"] = float(err @ err)
                        row["wsse"] = weight * (float((err * err) @ f) if f is not None else row["sse"])
                    n = x.size
                    row.update(est_bpw=row["est_bits"] / n, mse=row["sse"] / n, wmse=row["wsse"] / n,
                               snr_db=_snr(signal, row["sse"]))
                    if exact:
                        row["exact_bpw"] = row["exact_bits"] / n
                        if progress is not None:
                            progress(n)
                    by_tensor[name].append(row)
    return by_tensor


def sweep(tensors: Mapping[str, np.ndarray], steps: Sequence[float] | Mapping[str, Sequence[float]],
          lams: Sequence[float], *,
          methods: Sequence[str] = ("urq", "dq"), slice_size: int = 8192, num_gt_flags: int = 11,
          importance: Mapping[str, np.ndarray] | None = None, tensor_weights: Mapping[str, float] | None = None,
          exact: bool = True, progress: Callable[[int], None] | None = None,
          level_bytes: int = 256 << 20, executor=None,
          on_task: Callable[[SweepTask, list[dict]], None] | None = None) -> SweepResult:
    """RD-quantize every float tensor of two or more dimensions at every (method, step, lam).

    Per setting and tensor: estimated bits (the estimator the quantizer optimises), exact bits
    (codec.encode_levels on the chosen levels; payload plus the tensor's header record) when
    `exact`, weighted and plain squared error, MSE and SNR; then the same per model. `progress`
    is called as the work advances, in weight-settings (a tensor's weights at one (step, lam)):
    once as the quantizer finishes them, and once more as they are coded exactly, so a whole
    sweep is `sweep_work(...)` of them. Steps are in weight units; lam in
    step² per bit (see gpucabac.rdquant). `steps` is one grid for every tensor, or a mapping that
    gives every swept tensor its own grid (all of one length K, e.g. a rule's step per tensor
    times common factors): rows record their `grid_index`, and a model row is one grid index
    (its `step` is None unless the grids agree there).

    `importance` F (per tensor, its shape) weights each weight's error in the quantizer and in
    the weighted error; `tensor_weights` (per tensor, a positive number, default 1) multiplies a
    tensor's weighted error only, not what its quantizer sees: importance shapes of mean 1 (so
    that lam means the same in every tensor) plus tensor weights from `importance_scales` let
    `choose_operating_point(per_tensor=True)` give the important tensors the bits.

    `executor` runs the work as (method, tensor chunk, grid chunk) tasks: None or a
    `LocalExecutor` in this process, a `gpucabac.RayExecutor` over a Ray cluster; every split
    gives the same rows, in the same order, to the bit. `on_task(task, rows)` sees each task's
    rows as it finishes (partial results, in the executor's finishing order)."""
    m = _prepare(None, tensors, steps, importance, tensor_weights)
    return _sweep([m], methods, lams, slice_size, num_gt_flags, exact, progress, level_bytes, executor, on_task)


def sweep_models(models: Mapping[str, Mapping[str, np.ndarray]], steps, lams: Sequence[float], *,
                 methods: Sequence[str] = ("urq", "dq"), slice_size: int = 8192, num_gt_flags: int = 11,
                 importance: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                 tensor_weights: Mapping[str, Mapping[str, float]] | None = None,
                 exact: bool = True, progress: Callable[[int], None] | None = None,
                 level_bytes: int = 256 << 20, executor=None,
                 on_task: Callable[[SweepTask, list[dict]], None] | None = None) -> SweepResult:
    """`sweep` of several models (name -> tensors) at the same settings, in one result: every
    row and model row carries its "model", settings["models"] holds each model's own settings
    (tensors, steps, numel, ...), and `result.of_model(name)` is the sweep of that model alone.
    `steps` is one grid for every tensor, or per model what `sweep` takes; `importance` and
    `tensor_weights` are per model what `sweep` takes. One executor runs the tasks of every
    model together (a cluster works on all of them at once)."""
    if not isinstance(models, Mapping) or not models:
        raise InputError("sweep_models needs a non-empty mapping of model names to tensors")
    for what, given in (("steps", steps), ("importance", importance), ("tensor_weights", tensor_weights)):
        extra = [k for k in given if k not in models] if isinstance(given, Mapping) and what != "steps" else []
        if extra:
            raise InputError(f"{what} names {extra}, which are not among the models {list(models)}")
    if isinstance(steps, Mapping):
        missing = [k for k in models if k not in steps]
        if missing:
            raise InputError(f"steps is a mapping but has no grid for the models {missing}")
    prepared = []
    for label, tensors in models.items():
        if not isinstance(label, str) or not label:
            raise InputError(f"model names must be non-empty strings, got {label!r}")
        prepared.append(_prepare(label, tensors, steps[label] if isinstance(steps, Mapping) else steps,
                                 None if importance is None else importance.get(label),
                                 None if tensor_weights is None else tensor_weights.get(label)))
    return _sweep(prepared, methods, lams, slice_size, num_gt_flags, exact, progress, level_bytes, executor, on_task)


def _sweep(models: list[_Model], methods, lams, slice_size, num_gt_flags, exact, progress, level_bytes,
           executor, on_task) -> SweepResult:
    lams = [float(v) for v in lams]
    methods = list(methods)
    for method in methods:
        if method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {method!r}")
    executor = LocalExecutor() if executor is None else executor
    if not (callable(getattr(executor, "run", None)) and callable(getattr(executor, "chunking", None))):
        raise InputError(f"executor must be a LocalExecutor, a RayExecutor or an object with chunking() and run(), "
                         f"got {type(executor).__name__}")
    K = len(next(iter(models[0].grids.values())))
    if any(len(next(iter(m.grids.values()))) != K for m in models):
        raise InputError("every model needs a grid of the same number of steps")
    tensor_chunk, steps_chunk = executor.chunking(max(m.numel for m in models), K, len(lams), len(methods))
    tensor_chunk = _positive_or_none(tensor_chunk, "the executor's tensor_chunk")
    sc = _positive_or_none(steps_chunk, "the executor's steps_chunk") or K
    chunks, groups = [], []  # groups: per model, (chunk index, tensor names)
    for m in models:
        mine = []
        for names in _tensor_chunks(m, tensor_chunk):
            mine.append((len(chunks), tuple(names)))
            chunks.append(dict(model=m.label, tensors={n: m.xs[n] for n in names},
                               importance={n: m.imp[n] for n in names if n in m.imp},
                               grids={n: m.grids[n] for n in names}, weights={n: m.weights[n] for n in names},
                               signals={n: m.signals[n] for n in names}))
        groups.append(mine)
    tasks: list[SweepTask] = []
    blocks = []  # (model, method, tensor chunk) in row order, with their tasks in grid order
    for m, mine in zip(models, groups):
        for method in methods:
            for ci, names in mine:
                block = []
                numel = sum(m.xs[n].size for n in names)
                for k0 in range(0, K, sc):
                    k1 = min(K, k0 + sc)
                    block.append(SweepTask(len(tasks), m.label, method, ci, names, (k0, k1),
                                           sweep_work(numel, k1 - k0, len(lams), 1, exact)))
                    tasks.append(block[-1])
                blocks.append(block)
    common = dict(lams=lams, slice_size=slice_size, num_gt_flags=num_gt_flags, exact=exact, level_bytes=level_bytes)
    done: dict[int, dict[str, list[dict]]] = {}
    for task, rows in executor.run(tasks, chunks, common, progress):
        want = (task.grid[1] - task.grid[0]) * len(lams)
        if set(rows) != set(task.tensors) or any(len(rows[n]) != want for n in task.tensors):
            raise SweepTaskError(f"{task.describe()}: the executor returned incomplete rows")
        done[task.index] = rows
        if on_task is not None:
            on_task(task, [r for n in task.tensors for r in rows[n]])
    lost = [t.describe() for t in tasks if t.index not in done]
    if lost:
        raise SweepTaskError(f"the executor returned no rows for {len(lost)} of {len(tasks)} tasks: {'; '.join(lost[:5])}")
    rows = [r for block in blocks for n in block[0].tensors for t in block for r in done[t.index][n]]
    common_st = dict(lams=lams, methods=methods, slice_size=slice_size, num_gt_flags=num_gt_flags, exact=exact)
    units = dict(rate_units="bits; exact = coded payload + tensor header record; est = estimator (§2.8) bits of the "
                            "bins + the same header record (known without coding); est_payload = the bins alone",
                 lam_units="step^2 per bit")
    if models[0].label is None:
        own = models[0].settings()
        st = dict(steps=own["steps"], lams=lams, methods=methods, slice_size=slice_size, num_gt_flags=num_gt_flags,
                  importance=own["importance"], exact=exact, tensors=own["tensors"],
                  tensor_weights=own["tensor_weights"], numel=own["numel"], **units)
    else:
        st = dict(common_st, models={m.label: m.settings() for m in models}, **units)
    return SweepResult(st, rows, aggregate(rows))


def sweep_work(numel: int, n_steps: int, n_lams: int, n_methods: int, exact: bool = True) -> int:
    """The progress units of a whole `sweep` over tensors of `numel` swept weights in all."""
    return int(numel) * n_steps * n_lams * n_methods * (2 if exact else 1)


def evaluate_task(result: SweepResult, tensors: Mapping[str, np.ndarray], task: Callable[[dict], float], *,
                  label: str = "task", higher_is_better: bool = True,
                  importance: Mapping[str, np.ndarray] | None = None,
                  progress: Callable[[int], None] | None = None) -> None:
    """Add a task metric to every model-level setting of a sweep: the swept tensors are
    quantized at that (method, step, lam) exactly as `gpucabac.encode` codes them (the same
    function `gpucabac.quantize`, the sweep's slice size, N and `importance`), the other
    tensors of `tensors` are left as they are, and `task(model) -> float` scores the result.
    Stored as m["task"] per model row, with the label and direction in result.settings["task"];
    `plot_sweeps(..., metric="task")` draws it. `progress` is called with 1 per setting."""
    from .codec import quantize  # noqa: PLC0415

    result._one_model("evaluate_task")
    names = result.settings.get("tensors") or []
    missing = [n for n in names if n not in tensors]
    if missing:
        raise InputError(f"the sweep's tensors {missing} are not in the model given to evaluate_task")
    swept = {n: tensors[n] for n in names}
    for m in result.model:
        steps = {r["tensor"]: r["step"] for r in result.rows
                 if (r["method"], _setting_key(r), r["lam"]) == (m["method"], _setting_key(m), m["lam"])}
        base = CodingSettings(quantizer=m["method"], lam=m["lam"], slice_size=result.settings.get("slice_size"),
                              num_gt_flags=result.settings.get("num_gt_flags", 11))
        rec = quantize(swept, base, per_tensor={n: base.replace(step=v) for n, v in steps.items()}, importance=importance)
        value = float(task({**tensors, **rec}))
        if not math.isfinite(value):
            raise InputError(f"the task returned {value} at {m['method']} step {m['step']} lam {m['lam']}")
        m["task"] = value
        if progress is not None:
            progress(1)
    result.settings["task"] = dict(label=label, higher_is_better=bool(higher_is_better))


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (model, method, grid index, lam): sums over tensors, then bits/weight, MSE and SNR of
    the model. The model row's step is the tensors' step when they share it, else None; rows of
    a sweep of several models keep their "model"."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("model"), r["method"], _setting_key(r), r["lam"]), []).append(r)
    out = []
    for (model, method, _, lam), rs in groups.items():
        n = sum(r["numel"] for r in rs)
        steps = {r["step"] for r in rs}
        m = dict({} if model is None else {"model": model}, method=method, step=steps.pop() if len(steps) == 1 else None, lam=lam, numel=n, tensors=len(rs),
                 est_bits=sum(r["est_bits"] for r in rs), est_payload_bits=sum(r.get("est_payload_bits", 0.0) for r in rs),
                 sse=sum(r["sse"] for r in rs),
                 wsse=sum(r["wsse"] for r in rs), signal=sum(r["signal"] for r in rs))
        m.update(est_bpw=m["est_bits"] / n, mse=m["sse"] / n, wmse=m["wsse"] / n, snr_db=_snr(m["signal"], m["sse"]))
        if all("exact_bits" in r for r in rs):
            m["exact_bits"] = sum(r["exact_bits"] for r in rs)
            m["exact_bpw"] = m["exact_bits"] / n
        if "grid_index" in rs[0]:
            m["grid_index"] = rs[0]["grid_index"]
        out.append(m)
    return out


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """A sweep's chosen setting: the method, and per swept tensor its (step, lam); encode it with
    `gpucabac.encode(tensors, point.coding_settings(settings), per_tensor=point.per_tensor(settings))`."""

    method: str
    steps: dict
    lams: dict
    bits: float  # predicted, from the sweep (exact if it has exact rates)
    sse: float
    wsse: float  # the sweep's weighted error (importance and tensor weights), = sse without them
    numel: int
    signal: float
    slice_size: int | None = None  # the sweep's, which its rates were measured with
    num_gt_flags: int | None = None
    exact: bool = False  # `bits` is the real coder's rate (else the quantizer's estimate)

    def coding_settings(self, base: CodingSettings | None = None) -> CodingSettings:
        """`base` (default CodingSettings()) with the point's quantizer and the sweep's slice size
        and flags: the settings of the tensors the sweep did not choose steps for."""
        base = CodingSettings() if base is None else base
        common = {k: v for k, v in (("slice_size", self.slice_size), ("num_gt_flags", self.num_gt_flags)) if v is not None}
        return base.replace(quantizer=self.method, **common)

    def per_tensor(self, base: CodingSettings | None = None) -> dict[str, CodingSettings]:
        """The settings of every swept tensor at this point: coding_settings(base) with the
        tensor's step and lam."""
        common = self.coding_settings(base)
        return {n: common.replace(step=step, lam=self.lams[n]) for n, step in self.steps.items()}

    @property
    def dq(self) -> int:
        """The `dq` argument of gpucabac.encode for this method (the trellis size; 0 for URQ)."""
        return mode_dq(self.method)

    @property
    def bpw(self) -> float:
        return self.bits / self.numel

    @property
    def snr_db(self) -> float:
        return _snr(self.signal, self.sse)


def choose_operating_point(result: SweepResult, method: str, *, target_bpw: float | None = None,
                           target_snr_db: float | None = None, target_mse: float | None = None,
                           per_tensor: bool = True) -> OperatingPoint:
    """The sweep's best setting for one target (exactly one of bits/weight, SNR in dB, MSE).

    per_tensor: every tensor picks its own (step, lam) at a common slope μ (minimising weighted
    error + μ·bits); every μ at which some tensor's choice changes is tried (the breakpoints of
    the tensors' lower convex hulls, so no range or resolution of μ is assumed), and the best
    allocation meeting the target is kept (least weighted error for a rate target, least rate
    for a quality target). Otherwise one setting for all tensors: one (step, lam), or with
    per-tensor grids one (grid index, lam)."""
    if sum(t is not None for t in (target_bpw, target_snr_db, target_mse)) != 1:
        raise InputError("give exactly one of target_bpw, target_snr_db, target_mse")
    result._one_model("choose_operating_point")
    rows = [r for r in result.rows if r["method"] == method]
    if not rows:
        raise InputError(f"the sweep has no results for method {method!r}")
    key = "exact_bits" if "exact_bits" in rows[0] else "est_bits"
    names = sorted({r["tensor"] for r in rows})
    by = {n: [r for r in rows if r["tensor"] == n] for n in names}
    numel = sum(by[n][0]["numel"] for n in names)
    signal = sum(by[n][0]["signal"] for n in names)

    def ok(bits, sse):
        if target_bpw is not None:
            return bits <= target_bpw * numel
        if target_snr_db is not None:
            return _snr(signal, sse) >= target_snr_db
        return sse / numel <= target_mse

    def better(a, b):  # a, b: (bits, wsse, ...)
        return a[1] < b[1] if target_bpw is not None else a[0] < b[0]

    best = None
    if per_tensor:
        for bits, wsse, sse, choice in _slope_allocations(by, key):
            if ok(bits, sse) and (best is None or better((bits, wsse), best)):
                best = (bits, wsse, dict(choice))  # the generator changes `choice` in place
    else:
        settings = sorted({(_setting_key(r), r["lam"]) for r in rows})
        for st in settings:
            choice = {n: next(r for r in by[n] if (_setting_key(r), r["lam"]) == st) for n in names}
            bits, wsse, sse = (math.fsum(c[k] for c in choice.values()) for k in (key, "wsse", "sse"))
            if ok(bits, sse) and (best is None or better((bits, wsse), best)):
                best = (bits, wsse, choice)
    if best is None:
        raise InputError("no setting of the sweep meets the target; widen the step or lambda grid")
    choice = best[2]
    bits, wsse, sse = (math.fsum(c[k] for c in choice.values()) for k in (key, "wsse", "sse"))
    size = result.settings.get("slice_size")
    ngt = result.settings.get("num_gt_flags")
    return OperatingPoint(method, {n: c["step"] for n, c in choice.items()}, {n: c["lam"] for n, c in choice.items()},
                          bits, sse, wsse, numel, signal, size if isinstance(size, int) else None,
                          ngt if isinstance(ngt, int) else None, key == "exact_bits")


def _lower_hull(rows: list[dict], key: str) -> list[dict]:
    """The rows on the lower convex hull of (bits, weighted error), by increasing bits: the only
    settings a common slope can pick."""
    pts = sorted(rows, key=lambda r: (r[key], r["wsse"]))
    front = []
    for r in pts:  # drop settings that more bits do not improve
        if not front or r["wsse"] < front[-1]["wsse"]:
            front.append(r)
    hull: list[dict] = []
    for r in front:
        while len(hull) >= 2:
            (a, b), c = hull[-2:], r
            turn = (b[key] - a[key]) * (c["wsse"] - a["wsse"]) - (b["wsse"] - a["wsse"]) * (c[key] - a[key])
            if turn > 0:
                break
            hull.pop()
        hull.append(r)
    return hull


def _slope_allocations(by: dict[str, list[dict]], key: str):
    """Every per-tensor choice that minimises weighted error + μ·bits for some μ, from μ = ∞ (each
    tensor at its fewest bits) down to μ = 0, one hull edge at a time, steepest first: yields
    (bits, weighted error, error, choice), `choice` a dict updated in place."""
    hulls = {n: _lower_hull(rs, key) for n, rs in by.items()}
    edges = [((h[j]["wsse"] - h[j + 1]["wsse"]) / (h[j + 1][key] - h[j][key]), n, j + 1)
             for n, h in hulls.items() for j in range(len(h) - 1)]
    choice = {n: h[0] for n, h in hulls.items()}

    def totals():  # exact sums (fsum), so that the kept point reports what was compared to the target
        return tuple(math.fsum(c[k] for c in choice.values()) for k in (key, "wsse", "sse"))

    yield (*totals(), choice)
    for _, n, j in sorted(edges, key=lambda e: -e[0]):  # a tensor's own slopes decrease along its hull
        choice[n] = hulls[n][j]
        yield (*totals(), choice)


def _swept_weights_match(res: SweepResult, tensors: Mapping[str, np.ndarray]) -> bool:
    """Every swept tensor of `res` is in `tensors`, with the size and Σw² it was swept with."""
    first_rows: dict = {}
    for r in res.rows:
        first_rows.setdefault(r["tensor"], r)
    for name in res.settings.get("tensors", []):
        row, x = first_rows.get(name), tensors.get(name)
        if x is None or row is None or np.size(x) != row["numel"] or not math.isclose(signal_of(x), row["signal"],
                                                                                      rel_tol=1e-9):
            return False
    return True


def point_from_sweep(sweep, tensors: Mapping[str, np.ndarray], *, target_bpw: float | None = None,
                     target_snr_db: float | None = None, target_mse: float | None = None, method: str | None = None,
                     per_tensor: bool = True, importance_file=None,
                     model: str | None = None) -> tuple[OperatingPoint, dict | None]:
    """The best setting of a sweep (a SweepResult or its JSON file) for one target, checked
    against the model and importance file it was run with: (the point, the per-weight importance
    to encode it with, or None). Encode it as

        point, importance = point_from_sweep(path, tensors, target_bpw=4)
        gpucabac.encode(tensors, point.coding_settings(settings), per_tensor=point.per_tensor(settings),
                        importance=importance)

    Every swept tensor must be in `tensors` with the weights it was swept with (same size and
    Σw²); a sweep weighted by an importance file needs that file again (checked by digest).
    `method` restricts the choice to one of the sweep's methods; otherwise the one that meets the
    target best is taken (least weighted error for a rate target, fewest bits for a quality one).
    A sweep of several models gives the point of `model`, by default of the one model whose swept
    weights `tensors` holds."""
    from .importance import file_digest, read_importance, sweep_weighting  # noqa: PLC0415

    res = sweep if isinstance(sweep, SweepResult) else SweepResult.from_json(sweep)
    where = "the sweep" if isinstance(sweep, SweepResult) else str(sweep)
    if res.models:
        if model is None:
            fits = [m for m in res.models if _swept_weights_match(res.of_model(m), tensors)]
            if len(fits) != 1:
                raise InputError(f"{where}: a sweep of the models {', '.join(map(repr, res.models))}, "
                                 + ("none of which was run on these weights" if not fits else
                                    f"of which {', '.join(map(repr, fits))} all have these weights; name one"))
            model = fits[0]
        res = res.of_model(model)
        where = f"{where} (model {model!r})"
    elif model is not None:
        raise InputError(f"{where}: a sweep of one model; it has no model {model!r} to choose")
    st = res.settings
    first_rows: dict = {}
    for r in res.rows:
        first_rows.setdefault(r["tensor"], r)
    for name in st.get("tensors", []):
        row = first_rows.get(name)
        x = tensors.get(name)
        if x is None or row is None:
            raise InputError(f"{where}: the sweep's tensor {name!r} is not in the model")
        if np.size(x) != row["numel"] or not math.isclose(signal_of(x), row["signal"], rel_tol=1e-9):
            raise InputError(f"{where}: the sweep was run on other weights for {name!r} than the model's")
    recorded = st.get("importance_file")
    if st.get("importance") and not recorded:
        raise InputError(f"{where}: the sweep was weighted by importance arrays from Python; "
                         "encode its operating point from Python (gpucabac.encode) with the same arrays")
    if recorded and importance_file is None:
        raise InputError(f"{where}: the sweep was run with --importance {recorded['path']}; give the same file")
    if importance_file is not None and not recorded:
        raise InputError(f"{where}: the sweep was run without an importance file; drop it or sweep again with it")
    if importance_file is not None and file_digest(importance_file) != recorded["sha256"]:
        raise InputError(f"{importance_file}: not the importance file the sweep was run with ({recorded['path']})")
    methods = [method] if method else list(st.get("methods", []))
    if method and method not in st.get("methods", []):
        raise InputError(f"{where}: the sweep has no {method} settings (it has {', '.join(st.get('methods', []))})")
    missing = [k for k in ("slice_size", "num_gt_flags") if not isinstance(st.get(k), int)]
    if missing:
        raise InputError(f"{where}: the sweep does not record its {' and '.join(missing)}")
    targets = dict(target_bpw=target_bpw, target_snr_db=target_snr_db, target_mse=target_mse)
    candidates = []
    for m in methods:
        try:
            candidates.append(choose_operating_point(res, m, per_tensor=per_tensor, **targets))
        except InputError:
            continue
    if not candidates:
        raise InputError(f"{where}: no setting of the sweep ({', '.join(methods)}) meets the target; "
                         "sweep a wider step or lambda grid")
    point = min(candidates, key=lambda op: (op.wsse, op.bits) if target_bpw is not None else (op.bits, op.wsse))
    shapes = None
    if importance_file is not None:
        shapes, _ = sweep_weighting(read_importance(importance_file, tensors), list(point.steps))
    return point, shapes
