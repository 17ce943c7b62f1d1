"""The federation end to end: the round protocol directly, the Flower app in Flower's simulation
engine, and the same app as a real deployment (SuperLink and SuperNodes on loopback).

A tiny run (2 clients, 2 rounds, the tiny VGG, 300 MNIST samples each) with coded bidirectional
updates, error feedback and filter scaling. Checks: the server's model is, bit for bit, what its
downloads imply from the initial model (and what the uploads imply); every byte count in the log
is its bitstream's length; a client's state (model version, residual) persists across rounds;
the deployment reaches the simulation's model exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("flwr")

import gpucabac  # noqa: E402
from fl_datasets import needs_dataset  # noqa: E402
from gpucabac.fl import protocol  # noqa: E402
from gpucabac.fl.sparsify import sparsify  # noqa: E402
from gpucabac.fl.config import FLConfig  # noqa: E402
from gpucabac.fl.update import read_header, read_update  # noqa: E402

needs_data = needs_dataset("mnist")

TINY = FLConfig(model="vgg", model_size="tiny", samples_per_client=300, test_samples=500, num_rounds=2,
                num_clients=2, method="scaled", scale_steps=10, density=0.02)


def _run_protocol(config: FLConfig):
    """The rounds without Flower: (server, client states, uploads per round)."""
    from gpucabac.fl.task import ClientTask, initial_params

    init = initial_params(config)
    server = protocol.ServerState(dict(init))
    states = [protocol.ClientState(dict(init)) for _ in range(config.num_clients)]
    tasks = [ClientTask(config, i) for i in range(config.num_clients)]
    rounds = []
    for rnd in range(1, config.num_rounds + 1):
        uploads = []
        for i, task in enumerate(tasks):
            states[i] = protocol.ClientState.from_arrays(states[i].to_arrays())  # as Flower's context.state keeps it
            res = protocol.client_round(states[i], server.downloads_since(states[i].version), config,
                                        task.train_fn(rnd), task.scale_fn(rnd), seed=task.seed(rnd))
            uploads.append((res.upload, task.num_examples))
        protocol.aggregate(server, uploads, config)
        rounds.append(uploads)
    return init, server, states, rounds


@needs_data
def test_the_server_model_is_what_the_decoded_updates_imply():
    init, server, states, rounds = _run_protocol(TINY)
    replayed = protocol.replay(init, server.downloads)
    assert all(np.array_equal(replayed[k], server.model[k]) for k in init)
    for state in states:  # every client applied every download it got
        assert state.version == TINY.num_rounds - 1 and state.residual.norm() > 0
    # the first download is the sample-weighted mean of the uploads' effective updates, coded
    scales_of = protocol.scale_names_of(init)
    base = protocol.with_unit_scales(init, scales_of)
    total = sum(w for _, w in rounds[0])
    mean = {}
    for data, w in rounds[0]:
        eff = protocol._effective(init, read_update(data, base).deltas, TINY, scales_of)
        for k, d in eff.items():
            mean[k] = np.float32(w / total) * d if k not in mean else mean[k] + np.float32(w / total) * d
    first = read_update(server.downloads[0], init).deltas
    kept, _ = sparsify(mean, "topk", density=TINY.download_density())
    expected = gpucabac.quantize(kept, protocol.coding_settings(TINY))
    assert first.keys() == expected.keys()
    for k in expected:  # exactly: the coded top-k of the mean (the server's residual keeps the rest)
        np.testing.assert_array_equal(first[k], expected[k])
    assert server.residual.norm() > 0


@needs_data
def test_a_dense_run_is_float32_fedavg_exactly():
    config = TINY.replace(method="dense", num_rounds=1)
    init, server, _, rounds = _run_protocol(config)
    from gpucabac.fl.task import ClientTask

    expected = {}
    total = sum(w for _, w in rounds[0])
    for (data, w), i in zip(rounds[0], range(config.num_clients)):
        deltas = read_update(data, init).deltas
        assert len(data) > 4 * sum(d.size for d in deltas.values())  # uncoded float32
        for k, d in deltas.items():
            expected[k] = np.float32(w / total) * d if k not in expected else expected[k] + np.float32(w / total) * d
    for k, d in expected.items():
        np.testing.assert_array_equal(server.model[k], (init[k].astype(np.float32) + d).astype(init[k].dtype))
    assert ClientTask(config, 0).num_examples == 300


@needs_data
def test_a_partial_update_sends_only_its_layers():
    full = _run_protocol(TINY.replace(num_rounds=1))[3][0]
    part = _run_protocol(TINY.replace(num_rounds=1, layers=("fc1", "fc2")))[3][0]
    from gpucabac.fl.task import initial_params

    init = initial_params(TINY)
    names = read_update(part[0][0], protocol.with_unit_scales(init, protocol.scale_names_of(init))).names
    assert names and all(n.startswith(("fc1/", "fc2/")) for n in names), names
    assert len(part[0][0]) < len(full[0][0])


def _simulate(config: FLConfig, tmp_path):
    from flwr.simulation import run_simulation

    from gpucabac.fl.flower import client_app, make_server_app

    done = {}
    run_simulation(server_app=make_server_app(config, log_path=tmp_path / "log.json", record_dir=tmp_path / "rec",
                                              done=lambda s: done.update(strategy=s)),
                   client_app=client_app, num_supernodes=config.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert "strategy" in done, "the server app did not finish"
    return done["strategy"]


def _check_record(config: FLConfig, rec, log):
    from gpucabac.fl.task import initial_params

    init = initial_params(config)
    downloads = [(rec / f"download-{v:04d}.gcbu").read_bytes() for v in range(1, config.num_rounds + 1)]
    final = dict(np.load(rec / "final.npz"))
    replayed = protocol.replay(init, downloads)
    assert all(np.array_equal(replayed[k], final[k]) for k in init)
    rounds = [r for r in log["rounds"] if r["round"] > 0]
    assert len(rounds) == config.num_rounds
    for r in rounds:
        uploads = [(rec / f"upload-r{r['round']:04d}-c{c}.gcbu").read_bytes() for c in r["clients"]]
        assert r["upload-bytes"] == sum(len(u) for u in uploads)
        assert r["next-download-bytes"] == len(downloads[r["round"] - 1])
        # what each client was sent: the downloads it lacked (all clients train every round here)
        assert r["download-bytes"] == len(r["clients"]) * sum(len(d) for d in downloads[: r["round"] - 1][-1:])
        assert r["flower-upload-bytes"] >= r["upload-bytes"]
        for c in r["clients-detail"]:
            assert c["state-version"] == r["round"] - 1
            if r["round"] > 1:  # the residual of round 1 came back from context.state
                assert c["residual-norm-before"] > 0
    for u in (rec.glob("upload-*.gcbu")):
        read_header(u.read_bytes())
    return final


# What Ray and Flower warn about while a simulation starts and stops (their own files and
# subprocesses; JAX's os.fork notice as Ray spawns its processes): not errors of this code.
RAY_WARNINGS = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


def _with(marks):
    def wrap(fn):
        for m in marks:
            fn = m(fn)
        return fn
    return wrap


@needs_data
@_with(RAY_WARNINGS)
def test_flower_simulation_matches_the_protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    strategy = _simulate(TINY, tmp_path)
    log = json.loads((tmp_path / "log.json").read_text())
    final = _check_record(TINY, tmp_path / "rec", log)
    _, server, _, _ = _run_protocol(TINY)  # the same rounds without Flower
    assert all(np.array_equal(server.model[k], final[k]) for k in final)
    assert all(np.array_equal(strategy.server.model[k], final[k]) for k in final)
    assert log["rounds"][-1]["accuracy"] == pytest.approx(strategy.history[-1]["accuracy"])


@needs_data
@pytest.mark.slow
@_with(RAY_WARNINGS[:2])
def test_a_real_deployment_reaches_the_simulation_model(tmp_path, monkeypatch):
    """SuperLink + 2 SuperNodes on loopback, `flwr run` of the same app: the same final model as
    the protocol (and so the simulation) with the same seeds, every process stopped after."""
    from gpucabac.fl.deploy import deploy

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    lines = []
    pids = deploy(TINY, log_path=tmp_path / "log.json", record_dir=tmp_path / "rec", workdir=tmp_path / "work",
           timeout_s=400, echo=lines.append)
    assert any("round 2/2" in line for line in lines), lines
    final = _check_record(TINY, tmp_path / "rec", json.loads((tmp_path / "log.json").read_text()))
    _, server, _, _ = _run_protocol(TINY)
    assert all(np.array_equal(server.model[k], final[k]) for k in final)
    assert len(pids) == 1 + TINY.num_clients + 1  # SuperLink, SuperNodes, flwr run
    for pid in pids:  # every process the deployment started has exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@needs_data
def test_batchnorm_statistics_stay_on_the_client_and_persist():
    """ResNet's running means and variances never travel: uploads and downloads carry
    parameters only, and each client keeps its own statistics in its state across rounds."""
    config = TINY.replace(model="resnet", num_rounds=2)
    init, server, states, rounds = _run_protocol(config)
    from gpucabac.fl.task import ClientTask

    stats = ClientTask(config, 0).model
    from gpucabac.fl.models import get_batch_stats

    stat_names = set(get_batch_stats(stats))
    assert stat_names and not stat_names & set(init)
    base = protocol.with_unit_scales(init, protocol.scale_names_of(init))
    for uploads in rounds[:1]:
        for data, _ in uploads:
            assert not stat_names & set(read_update(data, base).names)
    for state in states:
        assert set(state.local) == stat_names
        restored = protocol.ClientState.from_arrays(state.to_arrays())
        assert all(np.array_equal(restored.local[k], state.local[k]) for k in stat_names)
    assert not np.array_equal(states[0].local[sorted(stat_names)[0]], states[1].local[sorted(stat_names)[0]])


@needs_data
def test_partial_participation_sends_the_downloads_a_client_missed():
    from gpucabac.fl.flower import CodedFedAvg

    config = TINY.replace(num_clients=3, fraction_train=0.3, num_rounds=3)
    strategy = CodedFedAvg(config, echo=None)
    chosen = [strategy.chosen(r) for r in (1, 2, 3)]
    assert all(len(c) == 1 for c in chosen) and chosen == [strategy.chosen(r) for r in (1, 2, 3)]  # seeded
    from gpucabac.fl.task import ClientTask, initial_params

    init = initial_params(config)
    server = protocol.ServerState(dict(init))
    states = {p: protocol.ClientState(dict(init)) for p in range(3)}
    for rnd, (pid,) in enumerate(chosen, start=1):
        task = ClientTask(config, pid)
        missed = server.downloads_since(states[pid].version)
        assert len(missed) == server.version - states[pid].version and len(missed) >= (rnd > 1)
        res = protocol.client_round(states[pid], missed, config, task.train_fn(rnd), task.scale_fn(rnd),
                                    seed=task.seed(rnd))
        assert states[pid].version == server.version  # up to date before it trained
        protocol.aggregate(server, [(res.upload, task.num_examples)], config)
    assert all(np.array_equal(protocol.replay(init, server.downloads)[k], server.model[k]) for k in init)
