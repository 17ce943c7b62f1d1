"""Local training and evaluation of the Flax NNX models with Optax.

- ``local_train(model, x, y, *, epochs, batch_size, lr, seed, optimizer, ...)`` trains the model's
  ``nnx.Param`` variables in place (BatchNorm in train mode, its running statistics updated) and
  returns the mean loss of every epoch. The data order is a function of ``seed`` alone:
  ``round_seed(base, client, round)`` gives each (client, round) its own.
- ``evaluate(model, x, y)`` -> ``(mean loss, accuracy)`` with BatchNorm in eval mode (running
  statistics), without changing the model.
- ``recalibrate_batch_stats(model, x)`` re-estimates BatchNorm statistics (train-mode forward
  passes, no gradient step) for a model whose parameters came from elsewhere (the server's
  aggregate: statistics stay local, see ``gpucabac.fl.models``).

Inputs ``x`` are float32 ``(N, 28, 28, 1)`` (``gpucabac.fl.data.normalize``); uint8 ``(N, 28, 28)``
images are accepted and scaled to [0, 1]. Labels are integers 0-9.

Batches. Every epoch is a seeded permutation of the samples cut into ``ceil(N / batch_size)``
batches of exactly ``batch_size`` (``min(batch_size, N)`` for a client with fewer samples); the
last batch is filled up with the first samples of the same permutation, so every sample is seen
at least once per epoch and every step has the same shape (one compile per model and batch size,
also across rounds and clients).

Compilation. The jitted steps are module-level functions of ``(graphdef, state, ...)`` with the
graph definition and the optimizer's name static and the learning rate traced, so calling
``local_train`` again (next round, another client of the same architecture) reuses the compiled
step instead of tracing anew.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from . import xla_threads as _xla_threads  # noqa: F401, I001  (before JAX starts; see that module)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..errors import InputError

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainSettings:
    """Local-training settings: ``local_train(model, x, y, **settings.as_kwargs(), seed=...)``.

    ``optimizer`` "adam" (Optax ``adam``) or "sgd" (``sgd`` with ``momentum``, Nesterov off);
    ``weight_decay`` adds ``wd * w`` to every gradient (coupled L2, before the optimizer)."""

    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def as_kwargs(self) -> dict:
        return dict(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )


def round_seed(base: int, client: int, round_: int) -> int:
    """A 32-bit seed for (client, round) under a run's base seed: distinct streams per pair."""
    return int(np.random.SeedSequence([int(base), int(client), int(round_)]).generate_state(1)[0])


def as_inputs(x: np.ndarray) -> np.ndarray:
    """Images as float32 ``(N, 28, 28, 1)``: uint8 are scaled to [0, 1], float kept as they are."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise InputError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"images must be uint8 or float, got {x.dtype}")
    return x.astype(np.float32, copy=False)


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"labels must be integers of shape ({n},), got {y.dtype} {y.shape}")
    return y.astype(np.int32)


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """The index batches of one epoch, ``(steps, b)`` with ``b = min(batch_size, n)`` and
    ``steps = ceil(n / b)``: a permutation from ``rng``, its tail filled from its head."""
    b = min(int(batch_size), n)
    steps = math.ceil(n / b)
    perm = rng.permutation(n)
    order = np.concatenate([perm, perm[: steps * b - n]])
    return order.reshape(steps, b)


def _view(model: nnx.Module, *, train: bool) -> nnx.Module:
    """The model with BatchNorm in train (batch statistics, running ones updated) or eval mode."""
    return nnx.view(model, use_running_average=not train, raise_if_not_found=False)


def _loss(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _tx(optimizer: str, lr, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    if optimizer == "adam":
        tx = optax.adam(lr)
    else:
        tx = optax.sgd(lr, momentum=momentum if momentum else None)
    if weight_decay:
        tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
    return tx


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer", "momentum", "weight_decay"))
def _train_step(graphdef, params, rest, opt_state, x, y, lr, *, optimizer, momentum, weight_decay):
    def loss_fn(params, rest):  # rest passed in, so the BatchStats live at this trace level
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = _loss(model(x), y)
        return loss, nnx.state(model, nnx.Not(nnx.Param))

    (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    updates, opt_state = _tx(optimizer, lr, momentum, weight_decay).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_rest, opt_state, loss


def local_train(
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    optimizer: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train ``model`` in place on ``(x, y)``; the mean training loss of every epoch.

    A fresh optimizer state every call (a client's local run in one round). Deterministic given
    the model's variables, the data and ``seed`` (the data order). BatchNorm runs in train mode:
    batch statistics in the forward pass, running statistics updated in the model."""
    x = as_inputs(x)
    y = _labels(y, x.shape[0])
    if x.shape[0] == 0:
        raise InputError("local_train: no samples")
    if optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    if int(epochs) != epochs or epochs < 0 or int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"epochs must be >= 0 and batch_size >= 1 (integers), got {epochs}, {batch_size}")
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr}")
    graphdef, params, rest = nnx.split(_view(model, train=True), nnx.Param, ...)
    momentum, weight_decay = float(momentum), float(weight_decay)
    opt_state = _tx(optimizer, 1.0, momentum, weight_decay).init(params)  # the state does not depend on lr
    lr = jnp.float32(lr)
    rng = np.random.default_rng(seed)
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    losses = []
    for _ in range(int(epochs)):
        total = []
        for idx in epoch_batches(x.shape[0], batch_size, rng):
            params, rest, opt_state, loss = _train_step(
                graphdef, params, rest, opt_state, xd[idx], yd[idx], lr,
                optimizer=optimizer, momentum=momentum, weight_decay=weight_decay,
            )  # fmt: skip
            total.append(loss)
        losses.append(float(np.mean(jax.device_get(total))))
    nnx.update(model, params, rest)
    return losses


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eval_batch(graphdef, state, x, y, mask):
    logits = nnx.merge(graphdef, state, copy=True)(x)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(correct * mask)


def _padded_batches(x: np.ndarray, y: np.ndarray, batch_size: int):
    """Fixed-shape batches covering ``x`` in order; the last padded with zeros, masked out."""
    n = x.shape[0]
    b = min(batch_size, n)
    for start in range(0, n, b):
        xb, yb = x[start : start + b], y[start : start + b]
        k = xb.shape[0]
        mask = np.ones(b, np.float32)
        if k < b:
            xb = np.concatenate([xb, np.zeros((b - k, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(b - k, yb.dtype)])
            mask[k:] = 0
        yield xb, yb, mask


def evaluate(model: nnx.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 1000) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` over ``(x, y)``, BatchNorm in eval mode (running
    statistics). The model is not changed."""
    x = as_inputs(x)
    y = _labels(y, x.shape[0])
    if x.shape[0] == 0:
        raise InputError("evaluate: no samples")
    graphdef, state = nnx.split(_view(model, train=False))
    loss_sum = correct = 0.0
    for xb, yb, mask in _padded_batches(x, y, int(batch_size)):
        l, c = _eval_batch(graphdef, state, xb, yb, mask)
        loss_sum += float(l)
        correct += float(c)
    return loss_sum / x.shape[0], correct / x.shape[0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _stats_step(graphdef, params, rest, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    model(x)
    return nnx.state(model, nnx.Not(nnx.Param))


def recalibrate_batch_stats(model: nnx.Module, x: np.ndarray, *, batch_size: int = 256, seed: int = 0) -> None:
    """Re-estimate the BatchNorm running statistics of ``model`` in place from images ``x``.

    One seeded epoch of train-mode forward passes (no gradient, parameters untouched); every
    layer's new mean and var are the averages over the batches of that layer's batch mean and
    (biased) batch variance, the previous statistics forgotten (a cumulative average, as
    PyTorch's ``momentum=None``). A no-op for a model without BatchNorm."""
    if not nnx.state(model, nnx.BatchStat):
        return
    x = as_inputs(x)
    if x.shape[0] == 0:
        raise InputError("recalibrate_batch_stats: no samples")
    # A copy whose BatchNorm layers have momentum 0: the running statistics a forward pass leaves
    # are exactly that batch's statistics.
    probe = nnx.clone(_view(model, train=True))
    for _, module in nnx.iter_modules(probe):
        if isinstance(module, nnx.BatchNorm):
            module.momentum = 0.0
    graphdef, params, rest = nnx.split(probe, nnx.Param, ...)
    xd = jnp.asarray(x)
    batches = epoch_batches(x.shape[0], batch_size, np.random.default_rng(seed))
    total = None
    for idx in batches:
        stats = _stats_step(graphdef, params, rest, xd[idx])
        total = stats if total is None else jax.tree_util.tree_map(jnp.add, total, stats)
    nnx.update(model, jax.tree_util.tree_map(lambda t: t / len(batches), total))
