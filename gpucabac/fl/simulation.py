"""The Flower app in Flower's simulation engine (Ray) on this machine: one virtual SuperNode per
client, each ClientApp on one CPU."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from .config import FLConfig
from .flower import CodedFedAvg, client_app, make_server_app


def simulate(config: FLConfig, *, log_path=None, record_dir=None, echo: Callable[[str], None] = print,
             quiet_flower: bool = True) -> CodedFedAvg:
    """Run `config` in Flower's simulation engine; the strategy after the last round (its
    `server.model` is the final public model, `history` every round's metrics). `quiet_flower`
    keeps Flower's and Ray's own logs at warnings."""
    from flwr.simulation import run_simulation  # noqa: PLC0415

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if quiet_flower:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    done: dict[str, CodedFedAvg] = {}
    run_simulation(server_app=make_server_app(config, log_path=log_path, record_dir=record_dir,
                                              done=lambda s: done.update(strategy=s), echo=echo),
                   client_app=client_app, num_supernodes=config.num_clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"logging_level": logging.WARNING, "log_to_driver": not quiet_flower}})
    if "strategy" not in done:
        from ..errors import InputError  # noqa: PLC0415

        raise InputError("the simulation ended before its last round (see Flower's log above)")
    return done["strategy"]


__all__ = ["simulate"]
