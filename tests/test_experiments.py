"""Every experiment script in experiments/ smoke-run at --tiny, so that a refactor cannot silently
break one.

A --tiny run is the script's own code path at tiny sizes and fewer settings (seconds of work);
each runs here in a subprocess with `--tiny --out <tmp_path>` and must exit 0 and write its
results there (JSON that parses, Markdown that starts with a title). DeprecationWarnings are
errors in those subprocesses, as in this test suite (pyproject.toml), so a script still on a
deprecated gpucabac spelling fails here.

NNCodec: the scripts compare against NNCodec 2.1.3 when its venv (experiments/.nncodec-venv,
built by experiments/nncodec_env.py; CI has none) exists, and skip that part at --tiny when it
does not. `test_experiment_tiny` runs our side of every script with GPUCABAC_NO_NNCODEC=1 (so
the same whether the venv exists or not); `test_experiment_tiny_with_nncodec`, marked `nncodec`
and skipped without the venv, runs the scripts that have an NNCodec part with it and checks
that part's results. Deselect it with -m "not nncodec".

gpu_check.py and bench_rd.py are smoke-run at --tiny by tests/test_kernels.py and
tests/test_rdquant.py (COVERED_ELSEWHERE), not again here; test_every_experiment_is_smoke_run
fails when a script in experiments/ is in neither list.

Compilations: the subprocesses share one persistent JAX compilation cache (a temp dir of this
session), so a shape compiled by one script (e.g. the MiniLM forward and sensitivity ops of
minilm_task and minilm_sweep_choice, or our side again in the NNCodec runs) is loaded by the next.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
NNCODEC_VENV = EXPERIMENTS / ".nncodec-venv"
TIMEOUT_S = 600  # per script; a tiny run takes seconds (about 25 s at most on a busy 2-core machine)

# script -> the result files its --tiny run writes into --out
RESULTS = {
    "bench_cpu.py": ["bench_cpu.json", "bench_cpu.md"],
    "bench_memory.py": ["bench_memory.json", "bench_memory.md"],
    "compare_nncodec.py": ["compare_nncodec.json", "compare_nncodec.md"],
    "fl_sparse_bits.py": ["fl_sparse_bits.json", "fl_sparse_bits.md"],
    "gap_breakdown.py": ["gap_breakdown.json", "gap_breakdown.md"],
    "gpu_carry.py": ["minilm.gcb"],
    "minilm_bound.py": ["minilm_bound.json", "minilm_bound.md"],
    "minilm_sweep_choice.py": ["minilm_sweep_choice.json", "minilm_sweep_choice.md", "minilm_sweep_choice_sweep.json"],
    "minilm_task.py": ["minilm_task.json", "minilm_task.md"],
    "rate_term_states.py": ["rate_term_states.json", "rate_term_states.md"],
    "rd_gaussian.py": ["rd_gaussian.json", "rd_gaussian.md"],
    "rd_minilm.py": ["rd_minilm.json", "rd_minilm.md"],
    "scan_order.py": ["scan_order.json", "scan_order.md"],
    "slice_size_curve.py": ["slice_size_curve_qp-32.json", "slice_size_curve_qp-32.md"],
    "trellis_states.py": ["trellis_states.json", "trellis_states.md"],
    "zero_coding_choice.py": ["zero_coding_choice.json", "zero_coding_choice.md"],
}
# smoke-run at --tiny by another test already (not run twice)
COVERED_ELSEWHERE = {
    "gpu_check.py": ("tests/test_kernels.py", "test_gpu_check_tiny_runs"),
    "bench_rd.py": ("tests/test_rdquant.py", "test_bench_rd_smoke"),
}
NOT_EXPERIMENTS = {"nncodec_env.py"}  # builds NNCodec's venv; _*.py are helpers
# --tiny reads (a few tensors of) the default model
NEEDS_DEFAULT_MODEL = {"gpu_carry.py", "minilm_sweep_choice.py", "minilm_task.py"}


def _nncodec_results(j: dict) -> list:
    return j["model"]["nncodec"]


# script -> (its main JSON, what holds of it when and only when NNCodec ran)
NNCODEC_PART = {
    "bench_cpu.py": ("bench_cpu.json", lambda j: all(q["nncodec"].get("param_opt_1") for q in j["qps"])),
    "compare_nncodec.py": ("compare_nncodec.json",
                           lambda j: all(q["nncodec_urq"]["levels_mismatch_vs_ours"] == 0 and "nncodec_dq" in q for q in j["qps"])),
    "minilm_task.py": ("minilm_task.json", lambda j: j["curves"].get("NNCodec URQ") and j["curves"].get("NNCodec DQ")
                       and j["nncodec_best"]),
    "rate_term_states.py": ("rate_term_states.json", _nncodec_results),
    "rd_gaussian.py": ("rd_gaussian.json", lambda j: j["results"]["NNCodec DQ (param-opt, 1 NDU)"]["points"]),
    "rd_minilm.py": ("rd_minilm.json", lambda j: j["nncodec"][0]["points"]),
    "trellis_states.py": ("trellis_states.json", _nncodec_results),
}


def _nncodec_ran(script: str, parsed: dict[str, dict]) -> bool:
    name, ran = NNCODEC_PART[script]
    try:
        return bool(ran(parsed[name]))
    except (KeyError, IndexError):
        return False


def _marks(script: str) -> list:
    return [pytest.mark.default_model] if script in NEEDS_DEFAULT_MODEL else []


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("jax_cache")


def _run(script: str, out: pathlib.Path, jax_cache: pathlib.Path, *, nncodec: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if nncodec:
        env.pop("GPUCABAC_NO_NNCODEC", None)
    else:
        env["GPUCABAC_NO_NNCODEC"] = "1"
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", str(EXPERIMENTS / script), "--tiny", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, f"{script} --tiny exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _check_results(script: str, out: pathlib.Path) -> dict[str, dict]:
    """Every expected file exists; JSON parses, Markdown starts with a title. Returns the JSONs."""
    parsed = {}
    for name in RESULTS[script]:
        path = out / name
        assert path.is_file(), f"{script} --tiny wrote no {name} (wrote: {sorted(p.name for p in out.iterdir())})"
        if name.endswith(".json"):
            parsed[name] = json.loads(path.read_text())
        elif name.endswith(".md"):
            assert path.read_text().startswith("# "), f"{name} does not start with a Markdown title"
    return parsed


@pytest.mark.parametrize("script", [pytest.param(s, marks=_marks(s)) for s in RESULTS])
def test_experiment_tiny(script, tmp_path, jax_cache):
    carry_before = (EXPERIMENTS / ".carry").exists()
    r = _run(script, tmp_path, jax_cache, nncodec=False)
    parsed = _check_results(script, tmp_path)
    if script in NNCODEC_PART:  # GPUCABAC_NO_NNCODEC kept this run to our side, venv or not
        assert not _nncodec_ran(script, parsed), f"{script} ran NNCodec with GPUCABAC_NO_NNCODEC=1"
    if script == "gpu_carry.py":
        import gpucabac

        sys.path.insert(0, str(EXPERIMENTS))
        try:
            from gpu_carry import TINY_TENSORS
        finally:
            sys.path.remove(str(EXPERIMENTS))
        # the file the device command carries, decoded as gpu_check.py --model reads it
        assert set(gpucabac.load(tmp_path / "minilm.gcb")) == set(TINY_TENSORS)
        assert "gpu_check.py --model experiments/.carry/minilm.gcb" in r.stdout
        assert not list(tmp_path.glob("*.whl")), "--tiny downloads nothing"
        assert (EXPERIMENTS / ".carry").exists() == carry_before, "--tiny --out must not touch experiments/.carry"


@pytest.mark.nncodec
@pytest.mark.skipif(not NNCODEC_VENV.is_dir(), reason="no NNCodec venv (python experiments/nncodec_env.py builds it)")
@pytest.mark.parametrize("script", [pytest.param(s, marks=_marks(s)) for s in NNCODEC_PART])
def test_experiment_tiny_with_nncodec(script, tmp_path, jax_cache):
    _run(script, tmp_path, jax_cache, nncodec=True)
    parsed = _check_results(script, tmp_path)
    assert _nncodec_ran(script, parsed), f"{script} --tiny: no NNCodec results although {NNCODEC_VENV} exists"


def test_every_experiment_is_smoke_run():
    scripts = {p.name for p in EXPERIMENTS.glob("*.py") if not p.name.startswith("_")} - NOT_EXPERIMENTS
    assert scripts == set(RESULTS) | set(COVERED_ELSEWHERE), "add a new experiment script to RESULTS (with a --tiny run)"
    assert set(NNCODEC_PART) <= set(RESULTS)
    for script, (test_file, test_name) in COVERED_ELSEWHERE.items():
        text = (ROOT / test_file).read_text()
        assert f"def {test_name}(" in text and script in text, f"{script}: {test_file}::{test_name} no longer runs it"
