"""The Flower app (Flower 1.42's Message API): gpucabac bitstreams travel as bytes in records, up
and down, and the same app runs in Flower's simulation engine and as a real deployment
(`flwr run`). The only module of gpucabac that imports flwr.

- `client_app` (ClientApp): on "query" it reports its partition id; on "train" it applies the
  downloads it was sent, trains, and replies with its upload (protocol.client_round). Its state
  (the model it holds, its residual, its BatchNorm statistics) lives in Flower's context.state,
  so a client that Flower recreates carries on where it stopped.
- `server_app` (ServerApp): reads an FLConfig from the run config and runs `CodedFedAvg`, a
  FedAvg subclass whose rounds are protocol.aggregate; the public model is evaluated on the
  server after every round.

Clients are chosen by partition id (asked once, before round 1) with a seeded generator, and
uploads are averaged in partition order, so a simulation and a deployment with the same seeds
reach the same model bit for bit. Bytes per round and direction are the payloads' lengths;
Flower's own record sizes (`count_bytes`) are reported beside them.
"""

from __future__ import annotations

import io
import json
import pathlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from ..errors import GpucabacError, InputError
from ..io import atomic_write_bytes
from .config import FLConfig
from .protocol import ClientState, ServerState, aggregate, chosen_clients, client_round, round_seconds
from .task import ClientTask, ServerTask, initial_params

STATE_KEY = "gpucabac"
# run-config keys that are not FL settings
RUN_KEYS = ("log-path", "record-dir")


def _arrays(named: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in named.items()})


def _named(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: record[k].numpy() for k in record.keys()}


def _downloads(record: ConfigRecord) -> list[bytes]:
    return [bytes(record[str(i)]) for i in range(int(record["count"]))]


# --- the client ----------------------------------------------------------------------------------

client_app = ClientApp()
_tasks: dict[tuple[FLConfig, int], ClientTask] = {}  # per process: the model object and data, rebuilt on demand


def _task(config: FLConfig, partition_id: int) -> ClientTask:
    key = (config, partition_id)
    if key not in _tasks:
        _tasks.clear()
        _tasks[key] = ClientTask(config, partition_id)
    return _tasks[key]


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, ValueError, TypeError) as e:
        raise InputError("this SuperNode has no partition-id in its node config "
                         "(flower-supernode --node-config 'partition-id=0 num-partitions=2')") from e


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"node": MetricRecord({"partition-id": _partition_id(context)})}), reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    record = msg.content["config"]
    server_round = int(record["server-round"])
    from_version = int(record["from-version"])
    config = FLConfig.from_record({k: v for k, v in record.items() if k not in ("server-round", "from-version")})
    pid = _partition_id(context)
    if STATE_KEY in context.state:
        state = ClientState.from_arrays(_named(context.state[STATE_KEY]))
    else:
        state = ClientState(initial_params(config))
    if state.version != from_version:
        raise InputError(f"client {pid} holds model version {state.version}, the server sent updates from {from_version}")
    residual_before = state.residual.norm()
    task = _task(config, pid)
    result = client_round(state, _downloads(msg.content["downloads"]), config, task.train_fn(server_round),
                          task.scale_fn(server_round) if config.method == "scaled" else None,
                          seed=task.seed(server_round))
    context.state[STATE_KEY] = _arrays(state.to_arrays())
    metrics = {k: float(v) for k, v in result.metrics.items()}
    metrics |= {"num-examples": task.num_examples, "partition-id": pid, "upload-bytes": len(result.upload),
                "state-version": state.version, "residual-norm-before": residual_before}
    return Message(RecordDict({"upload": ConfigRecord({"bitstream": result.upload}), "metrics": MetricRecord(metrics)}),
                   reply_to=msg)


# --- the server ----------------------------------------------------------------------------------


class CodedFedAvg(FedAvg):
    """FedAvg over gpucabac updates: configure_train sends each chosen client the downloads it
    lacks; aggregate_train decodes the uploads and makes the next download (protocol.aggregate).
    The ArrayRecord Flower passes between rounds is the public model, for Flower's result."""

    def __init__(self, config: FLConfig, *, log_path=None, record_dir=None,
                 echo: Callable[[str], None] | None = print, wait_s: float = 600.0):
        super().__init__(fraction_train=config.fraction_train, fraction_evaluate=0.0,
                         min_train_nodes=1, min_available_nodes=config.num_clients)
        self.fl = config
        self.server = ServerState(initial_params(config))
        self.initial = dict(self.server.model)
        self.task = ServerTask(config)
        self.nodes: dict[int, int] = {}  # partition id -> node id
        self.held: dict[int, int] = {}  # partition id -> the model version it holds
        self.history: list[dict[str, Any]] = []
        self.log_path = None if log_path is None else pathlib.Path(log_path)
        self.record_dir = None if record_dir is None else pathlib.Path(record_dir)
        self.echo = echo or (lambda line: None)
        self.wait_s = wait_s
        self._round: dict[str, Any] = {}
        self._start = time.perf_counter()

    # which clients

    def _discover(self, grid: Grid) -> None:
        deadline = time.monotonic() + self.wait_s
        while len(ids := sorted(grid.get_node_ids())) < self.fl.num_clients:
            if time.monotonic() > deadline:
                raise InputError(f"{len(ids)} of {self.fl.num_clients} clients connected after {self.wait_s:.0f} s")
            time.sleep(0.5)
        messages = [grid.create_message(RecordDict(), MessageType.QUERY, node, "discover") for node in ids]
        for reply in grid.send_and_receive(messages, timeout=self.wait_s):
            if reply.has_error():
                raise InputError(f"client {reply.metadata.src_node_id} failed to answer: {reply.error.reason}")
            pid = int(reply.content["node"]["partition-id"])
            if pid in self.nodes:
                raise InputError(f"two clients have partition id {pid}")
            self.nodes[pid] = reply.metadata.src_node_id
        if sorted(self.nodes) != list(range(self.fl.num_clients)):
            raise InputError(f"the clients' partition ids are {sorted(self.nodes)}, expected 0..{self.fl.num_clients - 1}")
        self.held = dict.fromkeys(self.nodes, 0)

    def chosen(self, server_round: int) -> list[int]:
        """The partitions that train in a round: a seeded sample of fraction_train of them."""
        return chosen_clients(self.fl, server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if not self.nodes:
            self._discover(grid)
        messages, down, flower_down = [], 0, 0
        for pid in self.chosen(server_round):
            downloads = self.server.downloads_since(self.held[pid])
            content = RecordDict({
                "config": ConfigRecord(self.fl.to_record() | {"server-round": server_round, "from-version": self.held[pid]}),
                "downloads": ConfigRecord({"count": len(downloads), **{str(i): d for i, d in enumerate(downloads)}}),
            })
            down += sum(len(d) for d in downloads)
            flower_down += sum(r.count_bytes() for r in content.values())
            messages.append(grid.create_message(content, MessageType.TRAIN, self.nodes[pid], str(server_round)))
        self._round = {"round": server_round, "clients": self.chosen(server_round), "download-bytes": down,
                       "flower-download-bytes": flower_down}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [r for r in replies if r.has_error()]
        if failed:
            raise InputError(f"round {server_round}: {len(failed)} client(s) failed: {failed[0].error.reason}")
        by_pid = sorted(((int(r.content["metrics"]["partition-id"]), r) for r in replies), key=lambda t: t[0])
        uploads, clients = [], []
        for pid, reply in by_pid:
            data = bytes(reply.content["upload"]["bitstream"])
            metrics = dict(reply.content["metrics"])
            if int(metrics["upload-bytes"]) != len(data):
                raise InputError(f"client {pid} reported {metrics['upload-bytes']} bytes, sent {len(data)}")
            uploads.append((data, float(metrics["num-examples"])))
            clients.append(metrics | {"flower-upload-bytes": sum(r.count_bytes() for r in reply.content.values())})
            self.held[pid] = int(metrics["state-version"])
            if self.record_dir is not None:
                self._save(f"upload-r{server_round:04d}-c{pid}.gcbu", data)
        summary = aggregate(self.server, uploads, self.fl)
        if self.record_dir is not None:
            self._save(f"download-{self.server.version:04d}.gcbu", self.server.downloads[-1])
        self._round |= {"upload-bytes": summary["upload-bytes"], "next-download-bytes": summary["download-bytes"],
                        "flower-upload-bytes": sum(c["flower-upload-bytes"] for c in clients), "clients-detail": clients,
                        **round_seconds(clients, summary)}
        metrics = MetricRecord({k: float(v) for k, v in self._round.items() if isinstance(v, (int, float))})
        return _arrays(self.server.model), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # the public model is evaluated on the server (evaluate_global)

    def aggregate_evaluate(self, server_round, replies):
        return None

    def evaluate_global(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        loss, accuracy = self.task.evaluate(self.server.model)
        entry = {"round": server_round, "accuracy": accuracy, "loss": loss, "seconds": time.perf_counter() - self._start}
        if server_round > 0:
            entry |= {k: v for k, v in self._round.items() if k != "round"}
        self.history.append(entry)
        self._report(entry)
        return MetricRecord({"accuracy": float(accuracy), "loss": float(loss)})

    def _report(self, entry: dict) -> None:
        if entry["round"] == 0:
            line = f"round 0/{self.fl.num_rounds}: accuracy {entry['accuracy']:.4f}, loss {entry['loss']:.4f}"
        else:
            line = (f"round {entry['round']}/{self.fl.num_rounds}: accuracy {entry['accuracy']:.4f}, "
                    f"loss {entry['loss']:.4f}, up {entry['upload-bytes']:,.0f} B, down {entry['download-bytes']:,.0f} B "
                    f"(+{entry['next-download-bytes']:,.0f} B next), coding {entry['coding-seconds']:.2f} s "
                    f"vs training {entry['train-seconds']:.2f} s")
        self.echo(f"gpucabac fl: {line}")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = {"config": self.fl.to_record(), "rounds": self.history}
            atomic_write_bytes(self.log_path, json.dumps(log, indent=1).encode())

    def _save(self, name: str, data: bytes) -> None:
        self.record_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.record_dir / name, data)

    def run(self, grid: Grid) -> dict[str, np.ndarray]:
        """All rounds; the final public model."""
        self.start(grid, initial_arrays=_arrays(self.initial), num_rounds=self.fl.num_rounds,
                   evaluate_fn=self.evaluate_global, timeout=self.wait_s)
        if self.record_dir is not None:
            buf = io.BytesIO()
            np.savez(buf, **self.server.model)
            atomic_write_bytes(self.record_dir / "final.npz", buf.getvalue())
        return self.server.model


def split_run_config(run_config: dict) -> tuple[FLConfig, dict]:
    """(FLConfig, the other keys: log-path, record-dir) of a Flower run config."""
    extras = {k: run_config[k] for k in RUN_KEYS if k in run_config and run_config[k] not in ("", "none")}
    return FLConfig.from_record({k: v for k, v in run_config.items() if k not in RUN_KEYS}), extras


def make_server_app(config: FLConfig | None = None, *, log_path=None, record_dir=None,
                    done: Callable[[CodedFedAvg], None] | None = None,
                    echo: Callable[[str], None] | None = print) -> ServerApp:
    """A ServerApp running `config` (None: the run config's), logging to `log_path`, keeping every
    bitstream and the final model in `record_dir`, printing a line per round with `echo`; `done`
    gets the strategy when all rounds ran."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        fl, extras = split_run_config(dict(context.run_config)) if config is None else (config, {})
        strategy = CodedFedAvg(fl, log_path=extras.get("log-path", log_path), record_dir=extras.get("record-dir", record_dir),
                               echo=echo)
        try:
            strategy.run(grid)
        except GpucabacError as e:
            print(f"gpucabac fl: error: {e}")
            raise
        if done is not None:
            done(strategy)

    return app


server_app = make_server_app()

__all__ = ["CodedFedAvg", "client_app", "make_server_app", "server_app", "split_run_config"]
