"""RD plots of sweep files: per method the Pareto front over all (step, lam) settings.

matplotlib is optional (`pip install gpucabac[plot]`) and loads only when a figure is drawn.
"""

from __future__ import annotations

import io
import math
import pathlib
from collections.abc import Sequence

from .errors import InputError
from .io import atomic_write_bytes
from .sweeps import METHODS, SweepResult



def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(rate, snr) points on the upper-left front: no other point has less rate and more SNR."""
    front, best = [], -math.inf
    for r, s in sorted(points):
        if s > best:
            front.append((r, s))
            best = s
    return front


def plot_sweeps(paths: Sequence, output, *, rate: str = "exact", title: str | None = None, metric: str = "snr") -> None:
    """RD curves (bits/weight vs SNR, or vs the task metric of `evaluate_task` with metric="task")
    of one or more sweep JSON files on one figure: per method the Pareto front over all (step, lam)
    settings, the settings themselves faint, and NNCodec's points where a file holds them (key
    "nncodec": [{"label", "bpw", "snr_db"}]; drawn for metric="snr")."""
    if metric not in ("snr", "task"):
        raise InputError(f"metric must be 'snr' or 'task', got {metric!r}")
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover
        raise InputError("plotting needs matplotlib: pip install 'gpucabac[plot]'") from e
    fig, ax = plt.subplots(figsize=(7, 5))
    ylabel = "SNR (dB)"
    for path in paths:
        res = SweepResult.from_json(path)
        tag = pathlib.Path(path).stem if len(paths) > 1 else ""
        sign, key = 1.0, "snr_db"
        if metric == "task":
            info = res.settings.get("task")
            if not info:
                raise InputError(f"{path}: the sweep has no task metric (gpucabac sweep --task, or sweep.evaluate_task)")
            ylabel, key = info["label"], "task"
            sign = 1.0 if info["higher_is_better"] else -1.0
        for method in res.settings.get("methods", METHODS):
            pts = [(m.get(f"{rate}_bpw", m["est_bpw"]), m[key]) for m in res.model if m["method"] == method]
            if not pts:
                continue
            zero = [(m.get(f"{rate}_bpw", m["est_bpw"]), m[key]) for m in res.model if m["method"] == method and m["lam"] == 0]
            ax.scatter(*zip(*pts), s=6, alpha=0.25)
            front = [(r, sign * y) for r, y in pareto([(r, sign * y) for r, y in pts])]
            ax.plot(*zip(*front), "-o", ms=3, label=f"{tag} {method.upper()} + RD (front over step, λ)".strip())
            if zero:
                ax.plot(*zip(*sorted(zero)), "--", lw=1, label=f"{tag} {method.upper()} λ=0".strip())
        for series in res.extra.get("nncodec", []) if metric == "snr" else []:
            ax.plot([p["bpw"] for p in series["points"]], [p["snr_db"] for p in series["points"]], "k:^", ms=4,
                    label=series.get("label", "NNCodec"))
        for series in res.extra.get("reference", []) if metric == "snr" else []:
            ax.plot(series["bpw"], series["snr_db"], ":", color="gray", label=series.get("label", "bound"))
    ax.set_xlabel(f"bits per weight ({rate})")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_figure_atomic(fig, output)
    plt.close(fig)


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
