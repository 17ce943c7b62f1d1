"""The learning task of a federated run: its model, each client's data and training, the
server's evaluation. Everything is a function of the FLConfig (and the client's partition id),
so a client rebuilt by Flower, or running in another process, does exactly the same.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import InputError
from .config import FLConfig
from .data import STATS, load_dataset, normalize, partition
from .models import build_model, get_batch_stats, get_params, set_batch_stats, set_params
from .protocol import Params, ScaleFn, TrainFn
from .scaling import train_scales
from .train import evaluate, local_train, recalibrate_batch_stats, round_seed


@functools.lru_cache(maxsize=4)
def _dataset(name: str):
    return load_dataset(name)


def _inputs(images: np.ndarray, dataset: str) -> np.ndarray:
    mean, std = STATS[dataset]
    return normalize(images, mean=mean, std=std)


@functools.lru_cache(maxsize=16)
def client_data(config: FLConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Client `partition_id`'s training samples (float32 inputs, labels): its part of a seeded
    IID or Dirichlet split, at most `samples_per_client` of them."""
    x_train, y_train, _, _ = _dataset(config.dataset)
    parts = partition(y_train, config.num_clients, alpha=config.alpha, seed=config.seed)
    if not 0 <= partition_id < len(parts):
        raise InputError(f"partition id {partition_id} is outside 0..{len(parts) - 1}")
    idx = parts[partition_id]
    if config.samples_per_client is not None:
        idx = idx[: config.samples_per_client]
    return _inputs(x_train[idx], config.dataset), y_train[idx]


@functools.lru_cache(maxsize=4)
def server_data(config: FLConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(test inputs, test labels, calibration inputs): the test set (its first `test_samples`),
    and training samples the server may use to re-estimate BatchNorm statistics."""
    x_train, _, x_test, y_test = _dataset(config.dataset)
    n = len(x_test) if config.test_samples is None else min(config.test_samples, len(x_test))
    calibration = _inputs(x_train[:1024], config.dataset)
    return _inputs(x_test[:n], config.dataset), y_test[:n], calibration


def new_model(config: FLConfig):
    return build_model(config.model, seed=config.seed, size=config.model_size)


def initial_params(config: FLConfig) -> Params:
    """The round-0 model every participant builds from the seed."""
    return get_params(new_model(config))


class ClientTask:
    """One client's model object and data, reused across rounds within a process."""

    def __init__(self, config: FLConfig, partition_id: int):
        self.config, self.partition_id = config, int(partition_id)
        self.model = new_model(config)
        self.x, self.y = client_data(config, self.partition_id)

    def seed(self, server_round: int) -> int:
        return round_seed(self.config.seed, self.partition_id, server_round)

    def train_fn(self, server_round: int) -> TrainFn:
        def train(base: Params, local: Params) -> tuple[Params, Params]:
            set_params(self.model, base)
            if local:
                set_batch_stats(self.model, local)
            local_train(self.model, self.x, self.y, epochs=self.config.epochs, batch_size=self.config.batch_size,
                        lr=self.config.lr, seed=self.seed(server_round))
            return get_params(self.model), get_batch_stats(self.model)

        return train

    def scale_fn(self, server_round: int) -> ScaleFn:
        def scales(base: Params, delta: Params) -> Params:
            return train_scales(self.model, base, delta, self.x, self.y, placement=self.config.placement,
                                steps=self.config.scale_steps, seed=self.seed(server_round))

        return scales

    @property
    def num_examples(self) -> int:
        return int(len(self.y))


class ServerTask:
    """The server's model object and test data, for evaluating the public model."""

    def __init__(self, config: FLConfig):
        self.config = config
        self.model = new_model(config)
        self.x_test, self.y_test, self.calibration = server_data(config)

    def evaluate(self, params: Params) -> tuple[float, float]:
        """(loss, accuracy) of the public model on the test set; BatchNorm statistics, which
        never travel, re-estimated first on the server's calibration samples."""
        set_params(self.model, params)
        if get_batch_stats(self.model):
            recalibrate_batch_stats(self.model, self.calibration, seed=self.config.seed)
        return evaluate(self.model, self.x_test, self.y_test)


__all__ = ["ClientTask", "ServerTask", "client_data", "initial_params", "new_model", "server_data"]
