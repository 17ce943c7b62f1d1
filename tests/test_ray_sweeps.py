"""Sweeps over a Ray cluster (gpucabac.RayExecutor, docs/design.md §9): a local Ray instance of 2
workers gives the rows of the local sweep, in its order, to the bit; a worker that dies mid-sweep
costs a reported retry, never a row. Skipped without ray (the `ray` extra)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

import gpucabac  # noqa: E402
from gpucabac import cli  # noqa: E402
from gpucabac import io as gio  # noqa: E402
from gpucabac.ray_sweeps import RayExecutor, crash_on_first_attempt  # noqa: E402

# Ray's own start-up and shutdown warn about things outside gpucabac (its use of deprecated APIs,
# subprocesses it leaves to its raylet, sockets its workers close late); errors are still errors
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

STEPS = [2.0 ** -6, 2.0 ** -5]
LAMS = [0.0, 0.2]


def _model(seed: int = 3):
    rng = np.random.default_rng(seed)
    # equal shapes: every task has the same batch shape, so each worker compiles a method once
    return {"a.weight": (rng.standard_normal((24, 40)) * 0.03).astype(np.float32),
            "b.weight": (rng.standard_normal((40, 24)) * 0.05).astype(np.float32),
            "a.bias": np.zeros(24, np.float32)}


@pytest.fixture(scope="module")
def local():
    return gpucabac.sweep(_model(), STEPS, LAMS, methods=("urq", "dq"), slice_size=512)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _ray_sweep(executor, methods=("urq", "dq"), **kw):
    return gpucabac.sweep(_model(), STEPS, LAMS, methods=methods, slice_size=512, executor=executor, **kw)


def test_a_ray_sweep_is_the_local_sweep(cluster, local):
    seen, finished = [], []
    ex = RayExecutor(tensor_chunk=1000, steps_chunk=1)  # one tensor per task: 2 methods x 2 tensors x 2 grid indices
    res = _ray_sweep(ex, progress=seen.append, on_task=lambda task, rows: finished.append((task, rows)))
    assert ray.is_initialized()  # a session it did not start stays up
    assert res.settings == local.settings
    assert res.rows == local.rows  # the same rows in the same order, every number to the bit
    assert res.model == local.model
    assert len(finished) == 8 and sorted(t.index for t, _ in finished) == list(range(8))
    assert {(t.method, t.tensors, t.grid) for t, _ in finished} == {
        (m, (n,), (k, k + 1)) for m in ("urq", "dq") for n in ("a.weight", "b.weight") for k in (0, 1)}
    assert all(len(rows) == len(LAMS) for _, rows in finished)
    # progress arrives per finished task and adds up to the sweep's work
    assert len(seen) == 8 and sum(seen) == gpucabac.sweeps.sweep_work(2 * 960, 2, 2, 2)
    assert ex.failures == []


def test_a_worker_killed_mid_sweep_costs_a_retry_not_a_row(cluster, local):
    retried = []
    ex = RayExecutor(tensor_chunk=1000, steps_chunk=1, before_task=crash_on_first_attempt(2),
                     on_retry=lambda task, attempt, error: retried.append((task.index, attempt, type(error).__name__)))
    res = _ray_sweep(ex, methods=("urq",))  # one method: the replacement worker compiles one quantizer
    assert retried == [(2, 0, "WorkerCrashedError")]
    assert [(t.index, a) for t, a, _ in ex.failures] == [(2, 0)]
    assert len(res.rows) == 8 and res.rows == [r for r in local.rows if r["method"] == "urq"]
    assert res.model == [m for m in local.model if m["method"] == "urq"]


def test_a_task_that_fails_every_attempt_fails_the_sweep_naming_it(cluster):
    def always_fails(task, attempt):  # a closure: Ray pickles it by value for the workers
        if task.index == 1:
            raise RuntimeError(f"injected failure, attempt {attempt}")

    ex = RayExecutor(steps_chunk=1, retries=1, before_task=always_fails)
    with pytest.raises(gpucabac.SweepTaskError, match=r"sweep task 1 \(urq on 2 tensors.*grid index 1\) failed 2 times"
                       r".*RuntimeError: injected failure, attempt 1"):
        _ray_sweep(ex, methods=("urq",))
    assert [(t.index, a) for t, a, _ in ex.failures] == [(1, 0), (1, 1)]


def test_an_error_in_the_sweeps_data_is_raised_at_once(cluster):
    ex = RayExecutor(steps_chunk=1)
    with pytest.raises(gpucabac.InputError, match="steps must be positive"):
        gpucabac.sweep(_model(), [2.0 ** -6, -1.0], LAMS, methods=("urq",), executor=ex)
    assert all(attempt == 0 for _, attempt, _ in ex.failures)


def test_cli_sweeps_several_models_over_ray(cluster, tmp_path):
    paths = [str(tmp_path / "m1.npz"), str(tmp_path / "m2.npz")]
    models = {p: _model(seed) for p, seed in zip(paths, (3, 4))}
    for p, t in models.items():
        gio.write_model(p, t)
    out = tmp_path / "s.json"
    r = CliRunner().invoke(cli.main, ["sweep", *paths, "-o", str(out), "--steps", "0.015625,0.03125", "--lams", "0,0.2",
                                      "--methods", "urq", "--slice-size", "512", "--ray", "local"])
    assert r.exit_code == 0, r.output
    res = gpucabac.SweepResult.from_json(out)
    want = gpucabac.sweep_models(models, STEPS, LAMS, methods=("urq",), slice_size=512)
    assert res.rows == want.rows and res.model == want.model
    assert res.settings["ray"] == dict(address="local", gpus_per_task=0.0, failed_attempts=[])
    r = CliRunner().invoke(cli.main, ["sweep", paths[0], "-o", str(tmp_path / "t.json"), "--ray", " "])
    assert r.exit_code == 1 and "RayExecutor: address must be" in r.output, r.output
