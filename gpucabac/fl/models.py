"""Flax NNX CNNs for 28x28x1 images (MNIST, Fashion-MNIST) and 10 classes, plus the bridge between
a model's variables and flat ``{name: np.ndarray}`` dicts.

Models (``build_model(name, *, seed, size)``; the same seed gives the same weights):

=========== ======= ============ ===============================================================
name        size    parameters   layout
=========== ======= ============ ===============================================================
vgg         tiny         13,974  conv4-conv4-pool, conv8-conv8-pool, dense 32, dense 10
vgg         small     1,009,102  conv32-conv32-pool, conv64-conv64-pool, dense 300, dense 10
resnet      tiny          1,382  conv4+BN, one basic block per stage (4, 8/2), avg-pool, dense 10
resnet      small        77,754  ResNet-8: conv16+BN, basic blocks 16, 32/2, 64/2, avg-pool, dense
mobilenet   tiny            554  conv4/2+BN, depthwise-separable 8, 16/2, avg-pool, dense 10
mobilenet   small        31,946  conv16/2+BN, depthwise-separable 32, 64/2, 128, 128, avg-pool, dense
=========== ======= ============ ===============================================================

(``/2``: stride 2. Parameter counts are ``nnx.Param`` elements, BatchNorm statistics excluded.)

Every convolution is an ``nnx.Conv`` (kernel ``(kh, kw, in / groups, out)``) and every dense layer
an ``nnx.Linear`` (kernel ``(in, out)``): the output filter is always the **last** axis, which is
what ``gpucabac.fl.scaling`` scales. No model has dropout or any other random state after
construction, so a model is its variables and nothing else.

BatchNorm (ResNet and MobileNet). ``nnx.BatchNorm`` holds two kinds of variables:

- ``scale`` and ``bias`` are ``nnx.Param``: trained by gradient descent like every weight, part of
  ``get_params`` and so of every federated update (coded as non-kernel tensors, never scaled);
- ``mean`` and ``var`` (running statistics) are ``nnx.BatchStat``: not trained by gradient, updated
  by forward passes in train mode. **They stay local**: a client keeps its own statistics across
  rounds and never sends them (as NNCodec's FedBNF does, and FedBN argues for non-IID clients);
  an update carries ``nnx.Param`` only. Whoever evaluates a model whose statistics it has not
  trained (the server, with the aggregated parameters) first re-estimates them on data it holds
  with ``gpucabac.fl.train.recalibrate_batch_stats``. ``get_batch_stats`` / ``set_batch_stats``
  expose them should a run ship them after all.

The BatchNorm momentum is 0.9 (Flax's default 0.99 needs hundreds of steps to forget its
initial mean 0 / var 1, more than one local epoch of a client has).

Names. ``get_params(model)`` returns ``{name: np.ndarray}`` with ``name = "/".join(str(k) for k
in path)`` over the variable's path in the module tree, e.g. ``"conv1/kernel"``,
``"blocks/0/conv1/kernel"``, ``"blocks/0/bn1/scale"``; ``set_params`` writes such a dict back.
``variable_kinds(model)`` says which name is a trained parameter and which a statistic.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

from . import xla_threads as _xla_threads  # noqa: F401, I001  (before JAX starts; see that module)
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import InputError

NUM_CLASSES = 10
INPUT_SHAPE = (28, 28, 1)
_BN_MOMENTUM = 0.9


# ------------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------------


class VGG(nnx.Module):
    """VGG-style: blocks of 3x3 conv (bias, ReLU) followed by 2x2 max-pooling; then a hidden dense
    layer (ReLU) and the 10-way classifier. No BatchNorm."""

    def __init__(self, blocks: tuple[tuple[int, ...], ...], hidden: int, *, rngs: nnx.Rngs):
        convs = []
        c_in = INPUT_SHAPE[-1]
        for block in blocks:
            for c_out in block:
                convs.append(nnx.Conv(c_in, c_out, (3, 3), padding="SAME", rngs=rngs))
                c_in = c_out
        self.block_sizes = tuple(len(b) for b in blocks)
        self.convs = nnx.List(convs)
        side = INPUT_SHAPE[0] // 2 ** len(blocks)
        self.fc1 = nnx.Linear(side * side * c_in, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, NUM_CLASSES, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        i = 0
        for n in self.block_sizes:
            for _ in range(n):
                x = nnx.relu(self.convs[i](x))
                i += 1
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))


def _bn(n: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(n, momentum=_BN_MOMENTUM, rngs=rngs)


class BasicBlock(nnx.Module):
    """ResNet basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut (identity, or a
    1x1 conv + BN where the shape changes), then ReLU. Convolutions before a BN have no bias."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = _bn(c_out, rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = _bn(c_out, rngs)
        if stride != 1 or c_in != c_out:
            self.proj = nnx.Conv(c_in, c_out, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.proj_bn = _bn(c_out, rngs)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
        return nnx.relu(y + shortcut)


class _StemBlocksHead(nnx.Module):
    """The forward pass ResNet and MobileNet share: stem conv + BN + ReLU, the blocks, global
    average pooling, the dense head (attributes stem, stem_bn, blocks, fc)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(axis=(1, 2)))


class ResNet(_StemBlocksHead):
    """ResNet-style for 28x28: a 3x3 stem conv + BN + ReLU, stages of basic blocks (the first block
    of every stage after the first has stride 2), global average pooling, a dense classifier."""

    def __init__(self, widths: tuple[int, ...], blocks_per_stage: int, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(INPUT_SHAPE[-1], widths[0], (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = _bn(widths[0], rngs)
        blocks = []
        c_in = widths[0]
        for stage, width in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(c_in, width, stride, rngs=rngs))
                c_in = width
        self.blocks = nnx.List(blocks)
        self.fc = nnx.Linear(c_in, NUM_CLASSES, rngs=rngs)


class SeparableBlock(nnx.Module):
    """Depthwise-separable conv: depthwise 3x3 (stride, ``feature_group_count = channels``, kernel
    ``(3, 3, 1, c_in)``) + BN + ReLU, then pointwise 1x1 ``c_in -> c_out`` + BN + ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, *, rngs: nnx.Rngs):
        self.dw = nnx.Conv(
            c_in, c_in, (3, 3), strides=stride, padding="SAME", feature_group_count=c_in, use_bias=False, rngs=rngs
        )
        self.dw_bn = _bn(c_in, rngs)
        self.pw = nnx.Conv(c_in, c_out, (1, 1), use_bias=False, rngs=rngs)
        self.pw_bn = _bn(c_out, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.dw_bn(self.dw(x)))
        return nnx.relu(self.pw_bn(self.pw(x)))


class MobileNet(_StemBlocksHead):
    """MobileNet-style, kept small (depthwise convolutions are slow in XLA on the CPU): a stride-2
    3x3 stem conv + BN + ReLU (28 -> 14), depthwise-separable blocks, global average pooling, a
    dense classifier."""

    def __init__(self, stem: int, blocks: tuple[tuple[int, int], ...], *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(INPUT_SHAPE[-1], stem, (3, 3), strides=2, padding="SAME", use_bias=False, rngs=rngs)
        self.stem_bn = _bn(stem, rngs)
        layers = []
        c_in = stem
        for c_out, stride in blocks:
            layers.append(SeparableBlock(c_in, c_out, stride, rngs=rngs))
            c_in = c_out
        self.blocks = nnx.List(layers)
        self.fc = nnx.Linear(c_in, NUM_CLASSES, rngs=rngs)


_CONFIGS: dict[str, dict[str, tuple[type[nnx.Module], dict[str, Any]]]] = {
    "vgg": {
        "tiny": (VGG, dict(blocks=((4, 4), (8, 8)), hidden=32)),
        "small": (VGG, dict(blocks=((32, 32), (64, 64)), hidden=300)),
    },
    "resnet": {
        "tiny": (ResNet, dict(widths=(4, 8), blocks_per_stage=1)),
        "small": (ResNet, dict(widths=(16, 32, 64), blocks_per_stage=1)),
    },
    "mobilenet": {
        "tiny": (MobileNet, dict(stem=4, blocks=((8, 1), (16, 2)))),
        "small": (MobileNet, dict(stem=16, blocks=((32, 1), (64, 2), (128, 1), (128, 1)))),
    },
}
MODEL_NAMES = tuple(_CONFIGS)
SIZES = ("tiny", "small")


def build_model(name: str, *, seed: int = 0, size: str = "small") -> nnx.Module:
    """A freshly initialised model: ``name`` in ``MODEL_NAMES`` ("vgg", "resnet", "mobilenet"),
    ``size`` in ``SIZES`` ("tiny" for tests, "small" for runs). Deterministic given ``seed``.
    Input: float32 ``(N, 28, 28, 1)``; output: ``(N, 10)`` logits. BatchNorm layers start in
    train mode; ``gpucabac.fl.train`` picks the mode itself (train to train, eval to evaluate).

    Initialisation (``init_variables``): every kernel LeCun-normal, truncated at two standard
    deviations (Flax's default initialiser), every bias 0, BatchNorm scale 1, bias 0, mean 0, var 1.
    The values are drawn with NumPy, one generator per variable seeded by ``(seed, name)``: the
    module is built abstractly (``nnx.eval_shape``) and filled in, which takes ~0.1 s where JAX's
    own initialisers spend seconds compiling one small XLA program per shape on the CPU."""
    if name not in _CONFIGS:
        raise InputError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    if size not in _CONFIGS[name]:
        raise InputError(f"unknown size {size!r} of model {name!r}; known: {', '.join(_CONFIGS[name])}")
    cls, kwargs = _CONFIGS[name][size]
    model = nnx.eval_shape(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
    init_variables(model, seed=seed)
    return model


def _truncated_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    z = rng.standard_normal(shape)
    while True:
        bad = np.abs(z) > 2.0
        if not bad.any():
            break
        z[bad] = rng.standard_normal(int(bad.sum()))
    # 0.8796...: the standard deviation of a unit normal truncated to [-2, 2]
    return (z * (std / 0.87962566103423978)).astype(np.float32)


def init_variables(model: nnx.Module, *, seed: int = 0) -> None:
    """(Re-)initialise every variable of ``model`` in place, as ``build_model`` describes."""
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name = path_name(path)
        leaf = str(path[-1])
        shape = tuple(var.get_value().shape)
        if isinstance(var, nnx.Param) and leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
            value = _truncated_normal(rng, shape, math.sqrt(1.0 / fan_in))
        elif leaf in ("bias", "mean"):
            value = np.zeros(shape, np.float32)
        elif leaf in ("scale", "var"):
            value = np.ones(shape, np.float32)
        else:
            raise InputError(f"init_variables: no initialiser for {name} ({type(var).__name__})")
        var.set_value(jnp.asarray(value))


# ------------------------------------------------------------------------------------------------
# Variables <-> flat {name: array} dicts
# ------------------------------------------------------------------------------------------------


def path_name(path: tuple) -> str:
    """The flat name of a variable path: ``("blocks", 0, "conv1", "kernel") -> "blocks/0/conv1/kernel"``."""
    return "/".join(str(k) for k in path)


def _named(state: nnx.State) -> dict[str, Any]:
    return {path_name(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def get_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """The trained parameters (every ``nnx.Param``: kernels, biases, BatchNorm scale/bias) as
    ``{name: float32 np.ndarray}``, copies, sorted by name."""
    return {k: np.array(v) for k, v in sorted(_named(nnx.state(model, nnx.Param)).items())}


def get_batch_stats(model: nnx.Module) -> dict[str, np.ndarray]:
    """The BatchNorm running statistics (every ``nnx.BatchStat``: ``.../mean``, ``.../var``) as
    ``{name: np.ndarray}``; empty for a model without BatchNorm."""
    return {k: np.array(v) for k, v in sorted(_named(nnx.state(model, nnx.BatchStat)).items())}


def variable_kinds(model: nnx.Module) -> dict[str, str]:
    """``{name: "param" | "batch_stat"}`` for every variable of the model."""
    kinds = {k: "param" for k in _named(nnx.state(model, nnx.Param))}
    kinds.update({k: "batch_stat" for k in _named(nnx.state(model, nnx.BatchStat))})
    return dict(sorted(kinds.items()))


def _set(model: nnx.Module, kind: type, named: dict[str, Any], what: str, partial: bool) -> None:
    state = nnx.state(model, kind)
    flat = {path_name(path): (path, var) for path, var in nnx.to_flat_state(state)}
    unknown = sorted(set(named) - set(flat))
    if unknown:
        raise InputError(f"{what}: no such variable(s) in the model: {', '.join(unknown[:5])}")
    missing = sorted(set(flat) - set(named))
    if missing and not partial:
        raise InputError(f"{what}: missing variable(s): {', '.join(missing[:5])} (pass partial=True to keep them)")
    for name, value in named.items():
        var = flat[name][1]
        old = var.get_value()
        value = jnp.asarray(value)
        if value.shape != old.shape:
            raise InputError(f"{what}: {name} has shape {value.shape}, the model's is {old.shape}")
        var.set_value(value.astype(old.dtype))
    nnx.update(model, state)


def set_params(model: nnx.Module, named: dict[str, Any], *, partial: bool = False) -> None:
    """Write ``{name: array}`` into the model's ``nnx.Param`` variables, in place. Every parameter
    must be given unless ``partial``; unknown names and wrong shapes raise ``InputError``."""
    _set(model, nnx.Param, named, "set_params", partial)


def set_batch_stats(model: nnx.Module, named: dict[str, Any], *, partial: bool = False) -> None:
    """Write ``{name: array}`` into the model's BatchNorm statistics (``nnx.BatchStat``), in place."""
    _set(model, nnx.BatchStat, named, "set_batch_stats", partial)


def num_params(model: nnx.Module) -> int:
    """The number of trained parameter elements (``nnx.Param``; BatchNorm statistics excluded)."""
    return int(sum(np.size(v) for v in _named(nnx.state(model, nnx.Param)).values()))


def is_kernel(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a flat parameter is a conv or dense kernel (output filters on its last axis): its
    name ends in ``kernel`` and it has at least 2 dimensions. Biases and BatchNorm scale/bias are not."""
    return name.rsplit("/", 1)[-1] == "kernel" and len(shape) >= 2


class ParamLayout:
    """How a model's ``nnx.Param`` state maps to flat names, for use inside ``jax.jit``: ``graphdef``
    and ``rest`` (every non-Param variable) from ``nnx.split``, the parameter names in the order of
    the state's leaves, and ``to_state`` / ``from_state`` between ``{name: jax.Array}`` and the State.
    The dict is traced (no NumPy conversion), so a loss can be a function of flat parameters."""

    def __init__(self, model: nnx.Module):
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        leaves_with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        names = []
        for key_path, _ in leaves_with_paths:
            keys = [k.key for k in key_path if isinstance(k, jax.tree_util.DictKey)]
            names.append(path_name(tuple(keys)))
        self.names = tuple(names)
        if sorted(self.names) != sorted(_named(params)):  # the tree's paths are the nnx paths
            raise AssertionError("ParamLayout: tree paths disagree with nnx paths")

    def to_state(self, named: dict[str, Any]) -> nnx.State:
        return jax.tree_util.tree_unflatten(self.treedef, [named[n] for n in self.names])

    def from_state(self, state: nnx.State) -> dict[str, Any]:
        return dict(zip(self.names, jax.tree_util.tree_leaves(state)))
