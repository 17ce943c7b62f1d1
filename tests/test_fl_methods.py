"""Every FL method of issue 14 through the round protocol at tiny size (the in-process runner,
gpucabac.fl.inprocess): dense float32 FedAvg, gpucabac-coded dense differences, sparse updates
with and without error feedback, scaled sparse updates (both placements), sparse ternary
compression up and (bidirectional) down with a server residual. Checks per method: the server's
model is what its downloads imply; byte counts are the payloads' lengths; each payload is what
the method says it is. And the in-process runner reaches the Flower simulation's model bit for
bit.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("flax")

import gpucabac  # noqa: E402
from fl_datasets import needs_dataset  # noqa: E402
from gpucabac.fl import protocol, stc  # noqa: E402
from gpucabac.fl.config import FLConfig  # noqa: E402
from gpucabac.fl.update import is_snapshot, read_header, read_update  # noqa: E402

pytestmark = needs_dataset("mnist")

TINY = FLConfig(model="vgg", model_size="tiny", samples_per_client=200, test_samples=300, num_rounds=2,
                num_clients=2, scale_steps=5, density=0.02, downstream_density=0.04)


@functools.lru_cache(maxsize=None)
def _run(config: FLConfig):
    from gpucabac.fl.inprocess import run_in_process

    return run_in_process(config)


def _check_accounting(run):
    """The model is the downloads' replay; every byte count is a payload's length."""
    replayed = protocol.replay(run.initial, run.server.downloads)
    assert all(np.array_equal(replayed[k], run.server.model[k]) for k in run.initial)
    assert len(run.history) == run.config.num_rounds + 1
    for entry in run.history[1:]:
        r = entry["round"]
        assert entry["next-download-bytes"] == len(run.server.downloads[r - 1])
        assert entry["upload-bytes"] == sum(c["upload-bytes"] for c in entry["clients-detail"])
        sent = sum(len(d) for d in run.server.downloads[r - 2:r - 1]) if r > 1 else 0  # every client trains every round
        assert entry["download-bytes"] == len(entry["clients"]) * sent
        assert 0 <= entry["accuracy"] <= 1 and entry["coding-seconds"] > 0 and entry["train-seconds"] > 0


def _uploads(config: FLConfig):
    """Round 1's uploads and the clients' states after it, with the round replayed from the same seeds."""
    from gpucabac.fl.task import ClientTask, initial_params

    init = initial_params(config)
    out = []
    for pid in range(config.num_clients):
        task = ClientTask(config, pid)
        state = protocol.ClientState(dict(init))
        res = protocol.client_round(state, [], config, task.train_fn(1),
                                    task.scale_fn(1) if config.method == "scaled" else None, seed=task.seed(1))
        out.append((res.upload, state))
    return init, out


def test_dense_fedavg_is_float32_both_ways_whatever_downstream_says():
    for downstream in ("coded", "dense"):
        run = _run(TINY.replace(method="dense", downstream=downstream))
        _check_accounting(run)
        n = sum(v.size for v in run.initial.values() if v.dtype.kind == "f")
        for data in run.server.downloads:
            assert gpucabac.info(read_header(data)[2]).tensors[0].mode == "raw"
            assert 4 * n < len(data) < 4 * n + 2000  # float32 values and the headers


def test_a_client_that_missed_more_than_the_model_is_worth_gets_one_snapshot():
    from gpucabac.fl.task import ClientTask, initial_params

    config = TINY.replace(method="dense", num_clients=3, fraction_train=0.3, num_rounds=6)
    init = initial_params(config)
    server = protocol.ServerState(dict(init))
    states = {p: protocol.ClientState(dict(init)) for p in range(config.num_clients)}
    snapshots = 0
    for rnd in range(1, config.num_rounds + 1):
        (pid,) = protocol.chosen_clients(config, rnd)
        missed = server.downloads[states[pid].version:]
        sent = server.downloads_since(states[pid].version)
        if len(missed) > 1:  # dense downloads are each as large as the model: one snapshot instead
            assert len(sent) == 1 and is_snapshot(sent[0]) and len(sent[0]) < sum(len(d) for d in missed)
            snapshots += 1
        else:
            assert sent == missed
        task = ClientTask(config, pid)
        res = protocol.client_round(states[pid], sent, config, task.train_fn(rnd), seed=task.seed(rnd))
        assert states[pid].version == server.version
        assert all(states[pid].model[k].tobytes() == server.model[k].tobytes() for k in init)
        protocol.aggregate(server, [(res.upload, task.num_examples)], config)
    assert snapshots >= 1
    with pytest.raises(gpucabac.InputError, match="snapshot of model version"):  # never one that goes back
        protocol.client_round(states[pid], [server.snapshot()] * 2, config, task.train_fn(1))


def test_coded_dense_updates_send_every_value_quantized_with_error_feedback():
    config = TINY.replace(method="coded")
    run = _run(config)
    _check_accounting(run)
    init, uploads = _uploads(config)
    floats = {k for k, v in init.items() if v.dtype.kind == "f"}
    for data, state in uploads:
        deltas = read_update(data, init).deltas
        assert set(deltas) == floats
        intended = {k: deltas[k] + state.residual.residual[k] for k in floats}
        expected = gpucabac.quantize(intended, protocol.coding_settings(config))
        for k in floats:  # the upload is the quantized intended update, the residual what quantizing left
            np.testing.assert_array_equal(deltas[k], expected[k])
        big = "fc1/kernel"
        assert np.count_nonzero(deltas[big]) > 0.2 * deltas[big].size  # not sparsified
    down = read_update(run.server.downloads[0], run.initial).deltas
    assert np.count_nonzero(down["fc1/kernel"]) > 0.2 * down["fc1/kernel"].size and run.server.residual.norm() > 0


@pytest.mark.parametrize("error_feedback", [False, True])
def test_sparse_updates_with_and_without_error_feedback(error_feedback):
    config = TINY.replace(method="sparse", error_feedback=error_feedback)
    run = _run(config)
    _check_accounting(run)
    norms = [c["residual-norm"] for e in run.history[1:] for c in e["clients-detail"]]
    assert (min(norms) > 0) if error_feedback else (max(norms) == 0 and run.server.residual.norm() == 0)
    a, b = _run(TINY.replace(method="sparse", error_feedback=False)), _run(TINY.replace(method="sparse"))
    # round 1 is the same either way (no residual yet); round 2's uploads differ by the residual
    assert a.history[1]["upload-bytes"] == b.history[1]["upload-bytes"]
    assert not all(np.array_equal(a.server.model[k], b.server.model[k]) for k in a.initial)


@pytest.mark.parametrize("placement", ["delta", "filter"])
def test_scaled_updates_in_both_placements(placement):
    run = _run(TINY.replace(method="scaled", placement=placement))
    _check_accounting(run)
    other = _run(TINY.replace(method="scaled", placement="filter" if placement == "delta" else "delta"))
    assert not all(np.array_equal(run.server.model[k], other.server.model[k]) for k in run.initial)


@pytest.mark.parametrize("downstream", ["dense", "coded"])
def test_stc_uploads_and_downloads_are_ternary_streams(downstream):
    config = TINY.replace(method="stc", downstream=downstream)
    run = _run(config)
    _check_accounting(run)
    init, uploads = _uploads(config)
    floats = [k for k, v in init.items() if v.dtype.kind == "f"]
    for data, state in uploads:
        assert stc.is_stc(data)
        deltas = stc.read_stc(data, init).deltas
        assert list(deltas) == floats
        for k in floats:
            nz = deltas[k][deltas[k] != 0]
            assert nz.size == stc.stc_count(config.density, deltas[k].size)  # no exact zeros among the top-k here
            assert len(set(np.abs(nz).tolist())) == 1
        assert state.residual.norm() > 0
    for i, data in enumerate(run.server.downloads):
        if downstream == "dense":  # unidirectional: float32 down
            assert not stc.is_stc(data) and gpucabac.info(read_header(data)[2]).tensors[0].mode == "raw"
        else:  # bidirectional: STC of the mean plus the server's residual
            down = stc.read_stc(data, protocol.replay(init, run.server.downloads[:i])).deltas["fc1/kernel"]
            k = stc.stc_count(config.download_density(), down.size)
            # round 1's mean of two 2% uploads may have fewer non-zeros than a 4% top-k keeps;
            # from round 2 the server's residual fills the rest
            assert (np.count_nonzero(down) == k) if i else (0 < np.count_nonzero(down) <= k)
    if downstream == "coded":
        assert run.server.residual.norm() > 0
        assert run.history[2]["download-bytes"] < 0.1 * _run(config.replace(downstream="dense")).history[2]["download-bytes"]


def test_stc_costs_few_bits_per_kept_value():
    run = _run(TINY.replace(method="stc"))
    for entry in run.history[1:]:
        kept = sum(c["kept"] for c in entry["clients-detail"])
        # ~b* + 2 bits per non-zero, plus per tensor a header of ~30 B (14 tensors) and per update 48 B
        assert entry["upload-bytes"] < kept * (stc.expected_bits(0.02) + 1) / 8 + 2 * (48 + 14 * 40)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning",
                            "ignore::ResourceWarning", "ignore:os.fork:RuntimeWarning",
                            "ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_in_process_runner_matches_flowers_simulation(tmp_path, monkeypatch):
    """STC both ways with partial participation (2 of 3 clients a round): the in-process runner
    and Flower's simulation engine reach the same model, the same bytes and accuracies."""
    pytest.importorskip("flwr")
    import json

    from flwr.simulation import run_simulation

    from gpucabac.fl.flower import client_app, make_server_app

    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    config = TINY.replace(method="stc", num_clients=3, fraction_train=0.6, num_rounds=3)
    done = {}
    run_simulation(server_app=make_server_app(config, log_path=tmp_path / "log.json",
                                              done=lambda s: done.update(strategy=s), echo=None),
                   client_app=client_app, num_supernodes=config.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    assert "strategy" in done, "the server app did not finish"
    flower = done["strategy"]
    ours = _run(config)
    assert all(np.array_equal(ours.server.model[k], flower.server.model[k]) for k in ours.initial)
    assert ours.server.downloads == flower.server.downloads
    log = json.loads((tmp_path / "log.json").read_text())["rounds"]
    keys = ("round", "clients", "accuracy", "loss", "upload-bytes", "download-bytes", "next-download-bytes")
    assert [{k: e.get(k) for k in keys} for e in ours.history] == [{k: e.get(k) for k in keys} for e in log]
    assert all(len(e["clients"]) == 2 for e in log[1:]) and len({tuple(e["clients"]) for e in log[1:]}) > 1
