"""Shared helpers for the experiment scripts (not part of the gpucabac package)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

import numpy as np

EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = EXPERIMENTS_DIR.parent
RESULTS_DIR = EXPERIMENTS_DIR / "results"

# Let `python experiments/x.py` import gpucabac from the checkout even when it is not installed.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))
if str(EXPERIMENTS_DIR) not in sys.path:
    sys.path.insert(0, str(EXPERIMENTS_DIR))


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    def _git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)

    r = _git("rev-parse", "--short=12", "HEAD")
    if r.returncode != 0:
        return "none (no commit yet)"
    dirty = _git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return r.stdout.strip() + ("+dirty" if dirty else "")


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "numpy": np.__version__,
        "loadavg_start": loadavg(),
    }


def loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes running during a timing make it unreliable."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def read_any_model(spec: str) -> dict[str, np.ndarray]:
    """A packaged model name, a model file, or a .gcb container (decoded on the CPU: the model as
    reconstructed at its coding settings). The .gcb form carries a model to a machine where the
    package holding it cannot be installed (gpu_carry.py)."""
    import gpucabac
    from gpucabac.io import read_model

    if str(spec).endswith(".gcb"):
        return gpucabac.load(spec)
    return read_model(spec)


def load_default_model_2d(name: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """The float32 tensors with ndim == 2 of the default model (40 tensors, ~22.7 M weights for
    MiniLM), or of `name` (see read_any_model)."""
    from gpucabac.models import DEFAULT_MODEL

    name = name or DEFAULT_MODEL
    sd = read_any_model(name)
    ts = {k: np.ascontiguousarray(v) for k, v in sd.items() if v.dtype == np.float32 and v.ndim == 2}
    return name, ts


def tiny_model(seed: int = 0) -> dict[str, np.ndarray]:
    """A small random stand-in (~60 k weights) with a few shapes, including a 2-row tensor."""
    rng = np.random.default_rng(seed)
    shapes = {"emb.weight": (300, 64), "fc1.weight": (96, 64), "fc2.weight": (64, 96),
              "tiny.weight": (2, 64), "attn.weight": (128, 128)}
    out = {}
    for i, (k, s) in enumerate(shapes.items()):
        sigma = 0.02 * (1 + 0.5 * i)
        out[k] = (rng.standard_normal(s) * sigma).astype(np.float32)
    # a heavy tail, so that Exp-Golomb remainders occur
    out["fc1.weight"][0, :8] = np.float32([0.5, -0.7, 1.3, -2.0, 0.9, 3.1, -0.33, 0.0])
    return out


def snr_db(ref: dict[str, np.ndarray], rec: dict[str, np.ndarray]) -> float:
    """The SNR over every tensor of `ref`, integer ones included (as the committed results were
    computed; gpucabac.metrics.tensors_snr_db counts the float tensors only)."""
    from gpucabac.metrics import snr_db as ratio_db

    num = sum(float(np.sum(np.square(ref[k].astype(np.float64)))) for k in ref)
    den = sum(float(np.sum(np.square(ref[k].astype(np.float64) - rec[k].astype(np.float64)))) for k in ref)
    return ratio_db(num, den)


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        return x if isinstance(x, str) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def out_dir(arg: str | None, tiny: bool) -> pathlib.Path:
    """Where results go: --out, else experiments/results (full runs) or a temp dir (--tiny)."""
    if arg:
        p = pathlib.Path(arg)
    elif tiny:
        p = pathlib.Path(tempfile.gettempdir()) / "gpucabac_experiments"
    else:
        p = RESULTS_DIR
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_results(directory: pathlib.Path, stem: str, payload: dict, markdown: str) -> tuple[pathlib.Path, pathlib.Path]:
    """<stem>.json and <stem>.md, each written atomically."""
    from gpucabac.io import atomic_write_bytes

    jp, mp = directory / f"{stem}.json", directory / f"{stem}.md"
    atomic_write_bytes(jp, (json.dumps(payload, indent=1, default=_json_default) + "\n").encode())
    atomic_write_bytes(mp, (markdown.rstrip() + "\n").encode())
    return jp, mp


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, pathlib.Path):
        return str(o)
    raise TypeError(type(o))


def header_md(title: str, info: dict, model: str, settings: dict) -> str:
    return "\n".join([
        f"# {title}",
        "",
        f"- machine: {info['platform']}, {info['cpu']}, {info['cpu_count']} CPUs, Python {info['python']}",
        f"- date: {info['date']}",
        f"- git commit: {info['git_commit']}",
        f"- load average (1/5/15 min) at start: {info.get('loadavg_start')}"
        + (f", at end: {info['loadavg_end']}" if info.get("loadavg_end") else ""),
        f"- model: {model}",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "",
    ])


def save_figure(fig, ax, path) -> None:
    """Legend, tight layout, write at 130 dpi (atomically), close: the common ending of every figure here."""
    import matplotlib.pyplot as plt

    from gpucabac.plotting import save_figure_atomic

    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
