"""The rounds of a federated run in this one process, without Flower: what the Flower app does
(flower.py), through the same functions — the same clients chosen per round
(protocol.chosen_clients), the same downloads sent, uploads aggregated in partition order with
the same sample counts, the same evaluation — so it reaches the same public model bit for bit
(tests/test_fl_flower.py checks it against Flower's simulation). Clients run one after the other;
the experiments (experiments/fl/) run every method this way, free of Ray's start-up and its
per-process memory.

Each round's history entry has the keys of the Flower app's log (accuracy, loss, upload-bytes,
download-bytes, next-download-bytes, train-seconds, coding-seconds, clients-detail, …), less
Flower's own record sizes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from .config import FLConfig
from .protocol import ClientState, Params, ServerState, aggregate, chosen_clients, client_round, round_seconds
from .task import ClientTask, ServerTask, initial_params


@dataclasses.dataclass
class InProcessRun:
    """A finished run: the server (its public model and downloads), every client's state, and one
    history entry per round (round 0: the initial model's evaluation)."""

    config: FLConfig
    initial: Params
    server: ServerState
    clients: dict[int, ClientState]
    history: list[dict[str, Any]]


def run_in_process(config: FLConfig, *, echo: Callable[[str], None] | None = None,
                   on_round: Callable[[dict[str, Any]], None] | None = None) -> InProcessRun:
    """All rounds of `config`; `echo` gets one line per round, `on_round` every history entry as
    it is made (to write a log as the run goes)."""
    start = time.perf_counter()
    initial = initial_params(config)
    server = ServerState(dict(initial))
    clients = {p: ClientState(dict(initial)) for p in range(config.num_clients)}
    tasks: dict[int, ClientTask] = {}
    evaluator = ServerTask(config)
    history: list[dict[str, Any]] = []

    def evaluate(entry: dict[str, Any]) -> None:
        loss, accuracy = evaluator.evaluate(server.model)
        entry |= {"accuracy": accuracy, "loss": loss, "seconds": time.perf_counter() - start}
        history.append(entry)
        if echo is not None:
            echo(_line(config, entry))
        if on_round is not None:
            on_round(entry)

    evaluate({"round": 0})
    for rnd in range(1, config.num_rounds + 1):
        chosen = chosen_clients(config, rnd)
        uploads, details, down = [], [], 0
        for pid in chosen:
            state = clients[pid]
            task = tasks.setdefault(pid, ClientTask(config, pid))
            downloads = server.downloads_since(state.version)
            down += sum(len(d) for d in downloads)
            residual_before = state.residual.norm()
            result = client_round(state, downloads, config, task.train_fn(rnd),
                                  task.scale_fn(rnd) if config.method == "scaled" else None, seed=task.seed(rnd))
            uploads.append((result.upload, float(task.num_examples)))
            details.append({k: float(v) for k, v in result.metrics.items()}
                           | {"num-examples": task.num_examples, "partition-id": pid, "upload-bytes": len(result.upload),
                              "state-version": state.version, "residual-norm-before": residual_before})
        summary = aggregate(server, uploads, config)
        evaluate({"round": rnd, "clients": chosen, "download-bytes": down, "upload-bytes": summary["upload-bytes"],
                  "next-download-bytes": summary["download-bytes"], "clients-detail": details,
                  **round_seconds(details, summary)})
    return InProcessRun(config, initial, server, clients, history)


def _line(config: FLConfig, entry: dict[str, Any]) -> str:
    head = f"round {entry['round']}/{config.num_rounds}: accuracy {entry['accuracy']:.4f}, loss {entry['loss']:.4f}"
    if entry["round"] == 0:
        return head
    return (f"{head}, up {entry['upload-bytes']:,.0f} B, down {entry['download-bytes']:,.0f} B "
            f"(+{entry['next-download-bytes']:,.0f} B next), coding {entry['coding-seconds']:.2f} s "
            f"vs training {entry['train-seconds']:.2f} s")


__all__ = ["InProcessRun", "run_in_process"]
