"""Build (once) and locate a private virtual environment holding NNCodec 2.1.3.

NNCodec is only a *benchmark* dependency: it needs numpy<2 and a C++ build,
so it lives in its own venv at ``experiments/.nncodec-venv`` (gitignored) and
is driven through ``experiments/_nncodec_worker.py`` in a subprocess.

Usage::

    python experiments/nncodec_env.py          # build if missing, print python path

GPUCABAC_NO_NNCODEC=1 in the environment makes `nncodec_python_if_present` answer None even where
the venv exists: the experiments' "NNCodec if present" parts are then skipped, as without it
(tests/test_experiments.py runs our side of each script that way, and NNCodec's side under its
`nncodec` marker).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

NNCODEC_VERSION = "2.1.3"
EXPERIMENTS_DIR = pathlib.Path(__file__).resolve().parent
VENV_DIR = EXPERIMENTS_DIR / ".nncodec-venv"
WORKER = EXPERIMENTS_DIR / "_nncodec_worker.py"

_CHECK = "from nncodec.extensions import deepCABAC; import numpy; print(numpy.__version__)"


def _log(msg: str) -> None:
    print(f"[nncodec_env] {msg}", file=sys.stderr, flush=True)


def _venv_python(venv: pathlib.Path) -> pathlib.Path:
    if os.name == "nt":  # pragma: no cover
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def _works(python: pathlib.Path) -> bool:
    if not python.exists():
        return False
    r = subprocess.run([str(python), "-c", _CHECK], capture_output=True, text=True)
    return r.returncode == 0


def nncodec_python_if_present() -> pathlib.Path | None:
    """The venv's python if the venv exists and imports deepCABAC, else None (never builds);
    None as well when GPUCABAC_NO_NNCODEC is set to anything but "" or "0"."""
    if os.environ.get("GPUCABAC_NO_NNCODEC", "") not in ("", "0"):
        return None
    py = _venv_python(VENV_DIR)
    return py if _works(py) else None


def _run(cmd: list[str]) -> None:
    _log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr, stderr=sys.stderr)


def ensure_nncodec_python(venv: pathlib.Path = VENV_DIR) -> pathlib.Path:
    """Return the python of a venv holding nncodec==2.1.3, creating it if missing.

    Building the C++ extension takes a few minutes; progress goes to stderr.
    """
    venv = pathlib.Path(venv)
    py = _venv_python(venv)
    if _works(py):
        return py
    _log(f"building NNCodec {NNCODEC_VERSION} venv at {venv} (a C++ build, takes minutes)")
    if not py.exists():
        _run(["python3", "-m", "venv", str(venv)])
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    _run(pip + ["install", "numpy<2", "pybind11", "setuptools", "wheel"])
    _run(pip + ["install", "--no-deps", "--no-build-isolation", f"nncodec=={NNCODEC_VERSION}"])
    r = subprocess.run([str(py), "-c", _CHECK], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"NNCodec venv at {venv} does not import deepCABAC:\n{r.stderr}")
    _log(f"NNCodec ready (numpy {r.stdout.strip()}): {py}")
    return py


def run_nncodec(tensors, settings: dict, *, python: pathlib.Path | None = None,
                want_arrays: bool = False, timeout: float | None = None):
    """Run ``_nncodec_worker.py`` in the NNCodec venv on ``tensors`` (name -> array).

    ``settings`` as documented in the worker (mode, qp, dq, param_opt, repeats, ...).
    Returns ``(result_dict, arrays)``: ``arrays`` maps name -> {"levels": int32 array,
    "dequant": float32 array (mode "quant")} when ``want_arrays``, else ``{}``.
    Raises RuntimeError when the worker fails (round-trip failures included).
    """
    import json
    import tempfile

    import numpy as np

    py = python or ensure_nncodec_python()
    names = list(tensors)
    with tempfile.TemporaryDirectory(prefix="nncodec_") as td:
        td = pathlib.Path(td)
        np.savez(td / "req.npz", **{f"t{i}": np.asarray(tensors[n]) for i, n in enumerate(names)})
        st = dict(settings)
        st["names"] = names
        st["shapes"] = [list(np.asarray(tensors[n]).shape) for n in names]
        st["output_npz"] = str(td / "out.npz") if want_arrays else None
        (td / "settings.json").write_text(json.dumps(st))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)
        r = subprocess.run([str(py), str(WORKER), str(td / "req.npz"), str(td / "settings.json"),
                            str(td / "result.json")], env=env, capture_output=True, text=True,
                           timeout=timeout)
        if r.stderr:
            sys.stderr.write(r.stderr)
        if r.returncode != 0:
            raise RuntimeError(f"NNCodec worker failed (rc={r.returncode}):\n{r.stderr[-4000:]}")
        result = json.loads((td / "result.json").read_text())
        arrays: dict = {}
        if want_arrays:
            with np.load(td / "out.npz") as z:
                for i, n in enumerate(names):
                    arrays[n] = {"levels": z[f"levels_{i}"]}
                    if f"dequant_{i}" in z.files:
                        arrays[n]["dequant"] = z[f"dequant_{i}"]
    return result, arrays


if __name__ == "__main__":
    print(ensure_nncodec_python())
