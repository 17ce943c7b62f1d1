"""Adaptive filter-wise scaling of differential updates (docs/design.md §8; methods_spec §5.2-5.3).

One scale per output filter of every conv and dense kernel (the kernel's last axis: ``(kh, kw,
in, out)`` or ``(in, out)``), shape ``(out,)``, initialised to 1. Given the base ``w_base`` both
sides hold and a (sparse) update ``Δw``, a kernel is rebuilt as

- ``"delta"`` (the differential filter, as the paper's title suggests): ``w = w_base + s·Δw``;
- ``"filter"`` (the whole filter, NNCodec's LSA): ``w = s·(w_base + Δw)``;

with ``s`` broadcast over the last axis. Every other tensor (biases, BatchNorm scale/bias) is
``w_base + Δw``. All functions here work on flat ``{name: array}`` dicts (``gpucabac.fl.models
.get_params``) and are pure; ``apply_scales`` works on NumPy and (traced) JAX arrays alike.

Names: the scale of kernel ``"conv1/kernel"`` is ``"conv1/kernel_scale"`` (``scale_names``). The
suffix ``_scale`` makes "ends in ``scale``" a rule that exempts scales from sparsification (as
NNCodec skips ``*.weight_scaling``); note that BatchNorm's own ``.../scale`` (1-D) matches it too.

``train_scales`` trains only the scales with Adam on local data, the weights (base and delta)
frozen and BatchNorm frozen: it runs in **eval mode**, normalising with the model's running
statistics, which it neither updates nor returns.

The default number of steps (``DEFAULT_STEPS`` = 50) and the learning rates per placement
(``DEFAULT_LR``) were chosen by measurement: the table sits above ``DEFAULT_STEPS``.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

from . import xla_threads as _xla_threads  # noqa: F401, I001  (before JAX starts; see that module)
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..errors import InputError
from .models import ParamLayout, get_params, is_kernel
from .train import _labels, _view, as_inputs, epoch_batches

PLACEMENTS = ("delta", "filter")
SCALE_SUFFIX = "_scale"

# The defaults, by measurement (2 shared CPU cores; tiny VGG, 13,974 parameters, and VGG small,
# 1.0 M): a client holds 2,000 MNIST samples and trains 1 epoch (Adam 1e-3, batch 64) from a base,
# either the initial model ("init", round 1) or one trained 1 epoch on 2,000 other samples ("pre",
# a later round); every kernel of the update keeps its top 1 % magnitudes (biases and BatchNorm
# vectors dense); then the scales train (Adam, batch 64, seed 3, lr DEFAULT_LR[placement]).
# Cross-entropy / accuracy on the client's 2,000 samples (steps 0: the sparse update unscaled):
#
#   scale steps:         0           10          25          50          100         200     dense update
#   tiny  init filter 2.295/.149  2.271/.205  2.184/.208  1.973/.286  1.731/.374  1.600/.418  1.944/.552
#   tiny  init delta  2.295/.149  2.288/.174  2.275/.247  2.248/.339  2.166/.397  1.923/.349
#   tiny  pre  filter 1.942/.482  1.485/.513  1.252/.562  1.030/.671  0.891/.716  0.864/.736  0.875/.755
#   tiny  pre  delta  1.942/.482  1.926/.490  1.901/.507  1.851/.527  1.719/.583  1.411/.697
#   small init filter 2.245/.313  2.075/.416  1.277/.699  0.512/.827  0.363/.883  0.212/.933  0.287/.905
#   small init delta  2.245/.313  2.195/.466  2.114/.537  1.958/.635  1.611/.718  1.034/.762
#   small pre  filter 0.302/.905  0.262/.920  0.238/.928  0.218/.936  0.205/.936  0.159/.953  0.138/.969
#   small pre  delta  0.302/.905  0.277/.914  0.246/.929  0.213/.938  0.178/.948  0.146/.960
#
# With the filter placement, 50 steps recover 51-92 % of the loss gap between the unscaled sparse
# update and the dense one, at about half a local epoch of a 6,000-sample client (VGG small: ~65-80
# ms a step here); 100 steps recover 59-98 % (tiny init: more than the dense update) at twice the
# cost. So 50. Learning rates (searched over 3e-3 ... 3e-1 in an earlier run): for "filter" 3e-2
# improves monotonically with the steps (1e-1 is faster at first but not monotone, scales up to
# 6-9); "delta" needs a larger one, as its scales multiply a sparse update (at 1e-2 they barely
# move): 1e-1 was monotone everywhere measured (3e-1 is faster still on tiny VGG, scales up to ~18).
DEFAULT_STEPS = 50
DEFAULT_LR = {"filter": 3e-2, "delta": 1e-1}
DEFAULT_BATCH_SIZE = 64


def _shapes(params: Mapping[str, Any] | nnx.Module) -> dict[str, tuple[int, ...]]:
    if isinstance(params, nnx.Module):
        params = get_params(params)
    return {k: tuple(np.shape(v)) for k, v in params.items()}


def scale_names(params: Mapping[str, Any] | nnx.Module) -> dict[str, str]:
    """``{kernel_name: scale_name}`` for every conv and dense kernel of ``params`` (a flat dict or
    an NNX model): names ending in ``kernel`` with ndim >= 2; the scale is ``kernel_name + "_scale"``."""
    return _scale_names(_shapes(params))


def _scale_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    out = {k: k + SCALE_SUFFIX for k, shape in sorted(shapes.items()) if is_kernel(k, shape)}
    clash = sorted(set(out.values()) & set(shapes))
    if clash:
        raise InputError(f"scale name(s) already used by parameters: {', '.join(clash)}")
    return out


def init_scales(params: Mapping[str, Any] | nnx.Module) -> dict[str, np.ndarray]:
    """``{scale_name: ones((out,), float32)}`` for every kernel of ``params``."""
    shapes = _shapes(params)
    return {s: np.ones(shapes[k][-1], np.float32) for k, s in _scale_names(shapes).items()}


def _check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise InputError(f"unknown scale placement {placement!r}; known: {', '.join(PLACEMENTS)}")


def _check(base: Mapping[str, Any], delta: Mapping[str, Any], scales: Mapping[str, Any]) -> dict[str, str]:
    """Validate names and shapes; ``{kernel_name: scale_name}`` of the scales given."""
    names = scale_names(base)
    unknown = sorted(set(delta) - set(base))
    if unknown:
        raise InputError(f"delta names not in the base: {', '.join(unknown[:5])}")
    for k, d in delta.items():
        if tuple(np.shape(d)) != tuple(np.shape(base[k])):
            raise InputError(f"delta {k} has shape {tuple(np.shape(d))}, the base's is {tuple(np.shape(base[k]))}")
    by_scale = {s: k for k, s in names.items()}
    unknown = sorted(set(scales) - set(by_scale))
    if unknown:
        raise InputError(f"scales of no kernel: {', '.join(unknown[:5])} (expected names like {next(iter(by_scale), '-')})")
    for s, v in scales.items():
        out = np.shape(base[by_scale[s]])[-1]
        if tuple(np.shape(v)) != (out,):
            raise InputError(f"scale {s} has shape {tuple(np.shape(v))}, expected ({out},)")
    return {by_scale[s]: s for s in scales}


def apply_scales(
    base: Mapping[str, Any], delta: Mapping[str, Any], scales: Mapping[str, Any], placement: str = "delta"
) -> dict[str, Any]:
    """The rebuilt parameters ``{name: array}`` for every name of ``base``:

    - a kernel with a scale ``s``: ``base + s * delta`` ("delta") or ``s * (base + delta)`` ("filter"),
      ``s`` over the last axis;
    - everything else (biases, BatchNorm scale/bias, a kernel without a scale): ``base + delta``.

    ``delta`` may leave names out (a partial update: zero there); ``scales`` may leave kernels out
    (unscaled, i.e. s = 1). Unknown names or wrong shapes raise ``InputError``. Works on NumPy and
    JAX arrays; the result has the arrays' type."""
    _check_placement(placement)
    scaled = _check(base, delta, scales)
    out = {}
    for name, b in base.items():
        d = delta.get(name)
        s = scales.get(scaled[name]) if name in scaled else None
        if s is None:
            out[name] = b if d is None else b + d
        elif placement == "delta":
            out[name] = b if d is None else b + s * d
        else:
            out[name] = s * (b if d is None else b + d)
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "treedef", "names", "placement"))
def _scale_step(graphdef, treedef, names, placement, scales, opt_state, base, delta, rest, x, y, lr):
    def loss_fn(scales, rest):
        params = apply_scales(base, delta, scales, placement)
        state = jax.tree_util.tree_unflatten(treedef, [params[n] for n in names])
        logits = nnx.merge(graphdef, state, rest, copy=True)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(scales, rest)
    updates, opt_state = optax.adam(lr).update(grads, opt_state, scales)
    return optax.apply_updates(scales, updates), opt_state, loss


def train_scales(
    model: nnx.Module,
    base: Mapping[str, Any],
    delta: Mapping[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    *,
    placement: str = "delta",
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float | None = None,
    seed: int = 0,
    init: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Train the filter scales of ``apply_scales(base, delta, scales, placement)`` on ``(x, y)``;
    ``{scale_name: float32 (out,)}`` for every kernel.

    ``model`` supplies the architecture and the BatchNorm statistics only (its parameter values
    are not used, and it is not changed). ``base`` must name every parameter of the model;
    ``delta`` any subset of them. Only the scales are trained (Adam, ``lr``, by default
    ``DEFAULT_LR[placement]``), from ``init`` (all
    ones by default), for ``steps`` steps of ``batch_size`` samples (seeded epochs of ``x``, as in
    ``gpucabac.fl.train``); base and delta are frozen, BatchNorm is in eval mode (running
    statistics, not updated). ``steps=0`` returns the initial scales."""
    _check_placement(placement)
    if int(steps) != steps or steps < 0:
        raise InputError(f"steps must be an integer >= 0, got {steps}")
    if lr is None:
        lr = DEFAULT_LR[placement]
    if not lr > 0:
        raise InputError(f"lr must be > 0, got {lr}")
    layout = ParamLayout(_view(model, train=False))
    missing = sorted(set(layout.names) - set(base))
    extra = sorted(set(base) - set(layout.names))
    if missing or extra:
        raise InputError(f"base does not match the model: missing {missing[:5]}, unknown {extra[:5]}")
    scales = {k: np.asarray(v, np.float32) for k, v in (init_scales(base) if init is None else init).items()}
    _check(base, delta, scales)
    if set(scales) != set(scale_names(base).values()):
        raise InputError("init must give a scale for every kernel (see scale_names)")
    if steps == 0:
        return {k: v.copy() for k, v in scales.items()}
    x = as_inputs(x)
    y = _labels(y, x.shape[0])
    if x.shape[0] == 0:
        raise InputError("train_scales: no samples")
    base_j = {k: jnp.asarray(v, jnp.float32) for k, v in base.items()}
    delta_j = {k: jnp.asarray(delta[k], jnp.float32) if k in delta else jnp.zeros_like(v) for k, v in base_j.items()}
    scales_j = {k: jnp.asarray(v) for k, v in scales.items()}
    opt_state = optax.adam(1.0).init(scales_j)  # Adam's state does not depend on lr
    rng = np.random.default_rng(seed)
    xd, yd = jnp.asarray(x), jnp.asarray(y)
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        batches.extend(epoch_batches(x.shape[0], batch_size, rng))
    lr_j = jnp.float32(lr)
    for idx in batches[:steps]:
        scales_j, opt_state, _ = _scale_step(
            layout.graphdef, layout.treedef, layout.names, placement,
            scales_j, opt_state, base_j, delta_j, layout.rest, xd[idx], yd[idx], lr_j,
        )  # fmt: skip
    return {k: np.asarray(v, np.float32) for k, v in scales_j.items()}
