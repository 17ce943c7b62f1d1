"""How a sweep's work is split and gathered (docs/design.md §9): every split into (model, tensor
chunk, grid chunk) tasks gives the rows of the unsplit sweep, in its order, to the bit; an executor
that loses or cuts a task's rows fails the sweep; several models sweep into one result, which
plots one marker per model and gives each model's operating point. (Ray: tests/test_ray_sweeps.py.)"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

import gpucabac
from gpucabac import cli, sweeps
from gpucabac import io as gio

LAMS = [0.0, 0.15]


def _tensors(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"a.weight": (rng.standard_normal((32, 48)) * 0.02).astype(np.float32),
            "a.bias": np.zeros(48, np.float32),
            "b.weight": (rng.standard_normal((48, 16)) * 0.05).astype(np.float32),
            "c.weight": (rng.standard_normal((8, 8)) * 0.1).astype(np.float32)}  # shorter than a slice


GRIDS = {"a.weight": [2.0 ** -7, 2.0 ** -6], "b.weight": [2.0 ** -6, 2.0 ** -5], "c.weight": [2.0 ** -5, 2.0 ** -4]}


@pytest.mark.slow
def test_every_split_of_a_sweep_gives_the_rows_of_the_whole():
    t = _tensors(1)
    rng = np.random.default_rng(2)
    kw = dict(methods=("urq", "dq"), slice_size=1024, tensor_weights={"b.weight": 2.5},
              importance={"a.weight": rng.uniform(0.5, 1.5, (32, 48))})
    whole = gpucabac.sweep(t, GRIDS, LAMS, **kw)
    seen, finished = [], []
    split = gpucabac.sweep(t, GRIDS, LAMS, executor=gpucabac.LocalExecutor(tensor_chunk=1000, steps_chunk=1),
                           progress=seen.append, on_task=lambda task, rows: finished.append((task, rows)), **kw)
    assert split.settings == whole.settings
    assert split.rows == whole.rows  # same rows, same order, every float to the bit
    assert split.model == whole.model
    # a (1536 weights) alone, b + c (832) together; per method and grid index one task
    chunks = [("a.weight",), ("b.weight", "c.weight")]
    assert [(task.method, task.tensors, task.grid) for task, _ in finished] == [
        (m, c, (k, k + 1)) for m in ("urq", "dq") for c in chunks for k in (0, 1)]
    for task, rows in finished:
        assert [(r["tensor"], r["grid_index"], r["lam"]) for r in rows] == [
            (n, task.grid[0], lam) for n in task.tensors for lam in LAMS]
    assert sum(seen) == sweeps.sweep_work(1536 + 768 + 64, 2, 2, 2)
    assert finished[3][0].describe() == "sweep task 3 (urq on 2 tensors, b.weight .. c.weight, grid index 1)"


class _Dropping(gpucabac.LocalExecutor):
    """Loses one task's rows, or one row of it: what a broken executor would hand back."""

    def __init__(self, lose_task: bool):
        super().__init__(steps_chunk=1)
        self.lose_task = lose_task

    def run(self, tasks, chunks, common, progress=None):
        for task, rows in super().run(tasks, chunks, common, progress):
            if task.index == 1:
                if self.lose_task:
                    continue
                rows = {n: r[:-1] for n, r in rows.items()}
            yield task, rows


@pytest.mark.parametrize("lose_task, message", [(True, r"no rows for 1 of 2 tasks: sweep task 1 \(urq on 3 tensors"),
                                                (False, r"sweep task 1 \(.*grid index 1\): the executor returned incomplete")])
def test_an_executor_that_loses_rows_fails_the_sweep(lose_task, message):
    with pytest.raises(gpucabac.SweepTaskError, match=message):
        gpucabac.sweep(_tensors(1), GRIDS, LAMS, methods=("urq",), slice_size=1024, executor=_Dropping(lose_task))


def test_executors_are_checked():
    with pytest.raises(gpucabac.InputError, match="executor must be a LocalExecutor.*got str"):
        gpucabac.sweep(_tensors(1), GRIDS, LAMS, methods=("urq",), executor="ray")
    with pytest.raises(gpucabac.InputError, match="LocalExecutor: steps_chunk must be a positive integer"):
        gpucabac.LocalExecutor(steps_chunk=0)
    with pytest.raises(gpucabac.InputError, match="RayExecutor: retries must be an integer >= 0"):
        gpucabac.RayExecutor(retries=-1)
    with pytest.raises(gpucabac.InputError, match="RayExecutor: num_cpus and num_gpus are both 0"):
        gpucabac.RayExecutor(num_cpus=0)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two models on disk, their sweep through the CLI and each one's own sweep."""
    d = tmp_path_factory.mktemp("models")
    paths = [str(d / "net1.npz"), str(d / "net2.npz")]
    models = {paths[0]: _tensors(1), paths[1]: {k: v for k, v in _tensors(2).items() if k != "c.weight"}}
    for p, t in models.items():
        gio.write_model(p, t)
    out = d / "both.json"
    r = CliRunner().invoke(cli.main, ["sweep", *paths, "-o", str(out), "--steps", "0.01,0.02", "--lams", "0,0.15",
                                      "--methods", "urq", "--slice-size", "1024"])
    assert r.exit_code == 0, r.output
    alone = {p: gpucabac.sweep(t, [0.01, 0.02], LAMS, methods=("urq",), slice_size=1024) for p, t in models.items()}
    return paths, models, out, r.output, alone


def test_several_models_sweep_into_one_result(two_models):
    paths, models, out, output, alone = two_models
    res = gpucabac.SweepResult.from_json(out)
    assert res.models == paths
    assert [r["model"] for r in res.rows] == [paths[0]] * 12 + [paths[1]] * 8  # model by model, in the order given
    for p in paths:
        one = res.of_model(p)
        assert one.rows == [dict(model=p, **r) for r in alone[p].rows]
        assert one.model == [dict(model=p, **m) for m in alone[p].model]
        assert one.settings["tensors"] == alone[p].settings["tensors"] and one.settings["model"] == p
    # the sweep of two models is the same one from Python, any split
    both = gpucabac.sweep_models(models, [0.01, 0.02], LAMS, methods=("urq",), slice_size=1024,
                                 executor=gpucabac.LocalExecutor(tensor_chunk=1, steps_chunk=1))
    assert both.rows == res.rows and both.model == res.model
    header = next(line for line in output.splitlines() if "method" in line)
    assert header.split()[:2] == ["model", "method"]
    assert "8 settings over 5 tensors of 2 models" in output
    with pytest.raises(gpucabac.InputError, match="takes the sweep of one model.*of_model"):
        gpucabac.choose_operating_point(res, "urq", target_bpw=4.0)
    with pytest.raises(gpucabac.InputError, match="has no model 'net3'"):
        res.of_model("net3")


def test_a_file_of_several_models_gives_each_its_operating_point(two_models, tmp_path):
    paths, models, out, _, alone = two_models
    for p in paths:  # the model whose weights encode is given: found by its weights
        point, _ = gpucabac.point_from_sweep(out, models[p], target_snr_db=20.0)
        assert point == gpucabac.choose_operating_point(alone[p], point.method, target_snr_db=20.0)
    with pytest.raises(gpucabac.InputError, match="none of which was run on these weights"):
        gpucabac.point_from_sweep(out, _tensors(3), target_snr_db=20.0)
    r = CliRunner().invoke(cli.main, ["encode", paths[1], "-o", str(tmp_path / "n2.gcb"), "--sweep", str(out),
                                      "--target-snr", "20"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    data["tensors"][3]["model"] = "elsewhere"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(gpucabac.InputError, match=r"tensors\[3\] names model 'elsewhere'"):
        gpucabac.SweepResult.from_json(tmp_path / "bad.json")


def test_a_file_of_several_models_plots_a_marker_per_model(two_models):
    pytest.importorskip("matplotlib")
    from gpucabac import plotting

    paths, _, out, _, _ = two_models
    ax = plotting.draw_sweeps([out]).axes[0]
    fronts = {ln.get_label(): ln for ln in ax.get_lines() if "front" in ln.get_label()}
    assert sorted(fronts) == ["net1: URQ + RD (front over step, λ)", "net2: URQ + RD (front over step, λ)"]
    assert len({ln.get_marker() for ln in fronts.values()}) == 2  # a marker per model ...
    assert len({ln.get_color() for ln in fronts.values()}) == 1  # ... a colour per method
    assert ax.get_title() == "net1 vs net2"


def test_cli_checks_several_models(tmp_path, two_models):
    paths = two_models[0]
    for args, message in (([paths[0], paths[0]], "given twice"),
                          ([*paths, "--importance", str(tmp_path / "f.safetensors")], "one model's importance"),
                          ([paths[0], "--ray-gpus", "1"], "--ray-gpus needs --ray")):
        r = CliRunner().invoke(cli.main, ["sweep", *args, "-o", str(tmp_path / "s.json")])
        assert r.exit_code == 2 and message in r.output, r.output


def test_cli_scores_each_model_of_several_with_its_own_tensors(tmp_path, monkeypatch, two_models):
    paths, models, _, _, alone = two_models
    # a.weight's L1 norm, and whether c.weight is there: net2 has none, so each model must see its own
    (tmp_path / "per_model_l1task.py").write_text(
        "def score(model):\n    return float(abs(model['a.weight']).sum()) + 1000.0 * ('c.weight' in model)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "task.json"
    r = CliRunner().invoke(cli.main, ["sweep", *paths, "-o", str(out), "--steps", "0.01,0.02", "--lams", "0,0.15",
                                      "--methods", "urq", "--slice-size", "1024", "--task", "per_model_l1task:score"])
    assert r.exit_code == 0, r.output
    res = gpucabac.SweepResult.from_json(out)
    assert res.settings["task"] == {"label": "task metric", "higher_is_better": True}
    from per_model_l1task import score  # noqa: PLC0415

    for p in paths:
        own = copy.deepcopy(alone[p])  # the fixture's, shared with other tests
        gpucabac.evaluate_task(own, models[p], score)
        assert [m["task"] for m in res.of_model(p).model] == [m["task"] for m in own.model]
    assert all(m["task"] > 1000 for m in res.of_model(paths[0]).model)
    assert all(m["task"] < 1000 for m in res.of_model(paths[1]).model)
