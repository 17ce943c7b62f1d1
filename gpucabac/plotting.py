"""RD plots of sweep files: per method the Pareto front over all (step, lam) settings.

Paper-ready styling, the same in every figure: one fixed, colour-blind-safe colour per method
(Okabe-Ito: URQ blue, DQ vermillion, the larger trellises green, purple, ...), one marker per model
(a sweep file, or each model of a file of several), NNCodec in black and a reference/bound in
gray. The front is a solid line with markers on top; the λ=0 curve a thin, lighter dotted line
below it; every setting a faint dot below everything. The model name (the sweep's settings["model"], else the file name) heads the
legend and is the default title.

matplotlib is optional (`pip install gpucabac[plot]`) and loads only when a figure is drawn.
"""

from __future__ import annotations

import io
import math
import pathlib
import zlib
from collections.abc import Sequence

from .errors import InputError
from .io import atomic_write_bytes
from .sweeps import METHODS, SweepResult

# Okabe-Ito (colour-blind safe) without its black (NNCodec's) and yellow (unreadable on white),
# then Tol's wine: one colour per quantizer in METHODS order, whatever a file holds
_PALETTE = ("#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#882255")
METHOD_COLORS = {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(METHODS)}
NNCODEC_COLOR = "black"
REFERENCE_COLOR = "gray"
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")  # one per model, in the order given

# line styles and layers: scatter < λ=0 < reference < fronts < NNCodec (dashed, hollow markers)
SCATTER_Z, ZERO_Z, REFERENCE_Z, FRONT_Z, NNCODEC_Z = 1, 2, 2.5, 3, 4
ZERO_STYLE = ":"

_MODEL_SUFFIXES = {".safetensors", ".npz", ".pt", ".pth", ".bin", ".ckpt", ".onnx", ".h5"}
_GENERIC_STEMS = {"model", "pytorch_model", "weights", "checkpoint", "consolidated"}


def method_color(method: str) -> str:
    """The colour of a quantizer in every figure; a method outside METHODS gets a fixed one from
    its name."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _PALETTE[zlib.crc32(method.encode()) % len(_PALETTE)]


def model_name(settings: dict, path) -> str:
    """The model a sweep file describes: the name or path `gpucabac sweep` recorded in
    settings["model"] (a path shows as its file name without the extension, or as its folder's
    name when the file is a generic "model.safetensors"), else the sweep file's stem."""
    raw = settings.get("model") if isinstance(settings, dict) else None
    if isinstance(raw, str) and raw.strip():
        p = pathlib.PurePath(raw.strip())
        name = p.stem if p.suffix.lower() in _MODEL_SUFFIXES else p.name
        if name.lower() in _GENERIC_STEMS and p.parent.name:
            name = p.parent.name
        if name:
            return name
    return pathlib.Path(path).stem


def default_title(names: Sequence[str]) -> str:
    """One model: its name; two or three: joined by "vs"; more: "RD curves"."""
    distinct = list(dict.fromkeys(names))
    if len(distinct) == 1:
        return distinct[0]
    return " vs ".join(distinct) if len(distinct) <= 3 else "RD curves"


def _legend_names(paths: Sequence, names: list[str]) -> list[str]:
    """Per file the name its legend entries carry: the model name, with the file stem added where
    two files share it (and the position where even that does not tell them apart)."""
    out = []
    for i, (path, name) in enumerate(zip(paths, names)):
        if names.count(name) > 1:
            name = f"{name} ({pathlib.Path(path).stem})"
        out.append(name)
    return [f"{n} [{i + 1}]" if out.count(n) > 1 else n for i, n in enumerate(out)]


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(rate, snr) points on the upper-left front: no other point has less rate and more SNR."""
    front, best = [], -math.inf
    for r, s in sorted(points):
        if s > best:
            front.append((r, s))
            best = s
    return front


def draw_sweeps(paths: Sequence, *, rate: str = "exact", title: str | None = None, metric: str = "snr"):
    """The figure `plot_sweeps` saves (a matplotlib Figure, not attached to pyplot): RD curves
    (bits/weight vs SNR, or vs the task metric of `evaluate_task` with metric="task") of one or
    more sweep JSON files. Per model (a file, or each model of a file of several) and method:
    every (step, lam) setting as a faint dot, the Pareto front over them as a solid line with the
    model's marker, the λ=0 settings as a thin dotted line below; NNCodec's points where a file
    holds them (key "nncodec": [{"label", "points": [{"bpw", "snr_db"}]}]) in black, a reference
    (key "reference": [{"label", "bpw", "snr_db"}]) in gray, both drawn for metric="snr". `title` defaults to the model name(s)."""
    if metric not in ("snr", "task"):
        raise InputError(f"metric must be 'snr' or 'task', got {metric!r}")
    if not paths:
        raise InputError("no sweep files to plot")
    try:
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover
        raise InputError("plotting needs matplotlib: pip install 'gpucabac[plot]'") from e
    # one series (a marker, a legend name) per model: a file of several models (sweep_models) gives one each
    series = []
    for p in paths:
        res = SweepResult.from_json(p)
        views = [res.of_model(m) for m in res.models] or [res]
        for v in views[1:]:  # a file's NNCodec points and reference belong to it once
            v.extra = {}
        series += [(p, v) for v in views]
    paths = [p for p, _ in series]
    results = [r for _, r in series]
    names = [model_name(r.settings, p) for r, p in zip(results, paths)]
    tags = _legend_names(paths, names)
    several = len(paths) > 1
    ylabel, increasing = "SNR (dB)", True
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for i, (path, res) in enumerate(zip(paths, results)):
        marker = MARKERS[i % len(MARKERS)]
        prefix = f"{tags[i]}: " if several else ""
        sign, key = 1.0, "snr_db"
        if metric == "task":
            info = res.settings.get("task")
            if not info:
                raise InputError(f"{path}: the sweep has no task metric (gpucabac sweep --task, or sweep.evaluate_task)")
            ylabel, key = info["label"], "task"
            sign = 1.0 if info["higher_is_better"] else -1.0
            increasing = sign > 0
        listed = list(res.settings.get("methods") or METHODS)
        methods = listed + sorted({m["method"] for m in res.model} - set(listed))
        for method in methods:
            rows = [m for m in res.model if m["method"] == method]
            pts = [(m.get(f"{rate}_bpw", m["est_bpw"]), m[key]) for m in rows]
            if not pts:
                continue
            color, label = method_color(method), method.upper()
            zero = sorted((m.get(f"{rate}_bpw", m["est_bpw"]), m[key]) for m in rows if m["lam"] == 0)
            ax.scatter(*zip(*pts), s=10, marker=marker, color=color, alpha=0.2, linewidths=0, zorder=SCATTER_Z)
            front = [(r, sign * y) for r, y in pareto([(r, sign * y) for r, y in pts])]
            ax.plot(*zip(*front), linestyle="-", lw=1.8, color=color, marker=marker, ms=5, mec="white", mew=0.6,
                    zorder=FRONT_Z, label=f"{prefix}{label} + RD (front over step, λ)")
            if zero:  # added after the front (legend order), drawn below it (zorder)
                ax.plot(*zip(*zero), linestyle=ZERO_STYLE, lw=1.1, alpha=0.6, color=color, marker=marker, ms=3.5,
                        mfc="none", zorder=ZERO_Z, label=f"{prefix}{label}, λ = 0 (no rate term)")
        for series in res.extra.get("nncodec", []) if metric == "snr" else []:
            ax.plot([p["bpw"] for p in series["points"]], [p["snr_db"] for p in series["points"]], linestyle="--",
                    lw=1.2, color=NNCODEC_COLOR, marker=marker, ms=5, mfc="none", zorder=NNCODEC_Z,
                    label=prefix + series.get("label", "NNCodec"))
        for series in res.extra.get("reference", []) if metric == "snr" else []:
            ax.plot(series["bpw"], series["snr_db"], linestyle="-.", lw=1.2, color=REFERENCE_COLOR,
                    zorder=REFERENCE_Z, label=prefix + series.get("label", "bound"))
    ax.set_xlabel(f"bits per weight ({rate})")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, zorder=0)
    ax.set_axisbelow(True)
    labels = ax.get_legend_handles_labels()[1]
    n_entries = len(labels)
    legend = dict(fontsize=7.5, title_fontsize=8, framealpha=0.9, title=None if several else names[0])
    if n_entries > 7:  # many series: beside the axes (the figure widened for them), never over the data
        fig.set_size_inches(6.4 + min(8.0, 0.8 + 0.058 * max(map(len, labels))), 4.6)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **legend)
    elif n_entries:  # RD curves rise to the right (fall, for a loss): the corner below (above) them is free
        ax.legend(loc="lower right" if increasing else "upper right", **legend)
    ax.set_title(title if title else default_title(names))
    return fig


def plot_sweeps(paths: Sequence, output, *, rate: str = "exact", title: str | None = None, metric: str = "snr") -> None:
    """Draw the RD curves of one or more sweep JSON files (`draw_sweeps`) and write the figure to
    `output` (.png, .pdf, .svg, ...), atomically."""
    save_figure_atomic(draw_sweeps(paths, rate=rate, title=title, metric=metric), output)


def save_figure_atomic(fig, path) -> None:
    """Render a matplotlib figure in memory in the format its file name asks for, then write it
    atomically: an unknown extension is an InputError and no file is written."""
    path = pathlib.Path(path)
    fmt = path.suffix.lstrip(".").lower()
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise InputError(f"{path}: cannot write a figure as {fmt or '(no extension)'!r}; "
                         f"use one of {', '.join('.' + k for k in sorted(supported))}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=130)
    atomic_write_bytes(path, buf.getvalue())
