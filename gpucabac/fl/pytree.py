"""JAX pytrees (a Flax NNX state, nested dicts and lists of arrays) as the named tensors gpucabac
codes, and back with the structure restored exactly.

A leaf's name is its tree path joined by "/": `conv1/kernel`, `layers/0/bias`. A Flax variable's
own `.value` step is left out of the name (an nnx.State leaf's path ends in it). `unflatten` takes
the structure from a template tree of the same kind (the receiver's own model state), checks
that the names, shapes and dtypes agree, and returns leaves of the template's array type (JAX
arrays where it holds JAX arrays, NumPy arrays otherwise).

A flat mapping of names to NumPy arrays passes through without JAX, so that plain dicts of
weights need no pytree machinery.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputError

SEPARATOR = "/"


def _is_named_arrays(tree: Any) -> bool:
    return isinstance(tree, Mapping) and all(
        isinstance(k, str) and isinstance(v, (np.ndarray, np.generic)) for k, v in tree.items())


def _key_name(key) -> str | None:
    """One path entry as a name part (None: left out)."""
    from jax import tree_util  # noqa: PLC0415  (JAX only for real pytrees)

    if isinstance(key, tree_util.DictKey):
        return str(key.key)
    if isinstance(key, tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, tree_util.GetAttrKey):
        return key.name
    if isinstance(key, tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _leaf_names(tree: Any) -> tuple[list[str], list[Any], Any]:
    """(names, leaves, treedef) of a pytree, names unique."""
    from jax import tree_util  # noqa: PLC0415

    with_paths, treedef = tree_util.tree_flatten_with_path(tree)
    names, leaves = [], []
    for path, leaf in with_paths:
        parts = [_key_name(k) for k in path]
        if parts and parts[-1] == "value" and isinstance(path[-1], tree_util.GetAttrKey):
            parts = parts[:-1]  # a Flax variable's own value
        names.append(SEPARATOR.join(p for p in parts if p is not None) or "(root)")
        leaves.append(leaf)
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    twice = sorted(n for n, c in seen.items() if c > 1)
    if twice:
        raise InputError(f"the tree's paths give the same name to two leaves: {', '.join(map(repr, twice))} "
                         f"(a key containing {SEPARATOR!r}?)")
    return names, leaves, treedef


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """The named NumPy arrays of a pytree, in its leaf order."""
    if _is_named_arrays(tree):
        return {k: np.asarray(v) for k, v in tree.items()}
    names, leaves, _ = _leaf_names(tree)
    out = {}
    for name, leaf in zip(names, leaves):
        try:
            out[name] = np.asarray(leaf)
        except Exception as e:  # noqa: BLE001  (a leaf that is no array: an RNG key, an object)
            raise InputError(f"tree leaf {name!r} is a {type(leaf).__name__}, not an array") from e
        if out[name].dtype == object:
            raise InputError(f"tree leaf {name!r} is a {type(leaf).__name__}, not an array")
    return out


def unflatten(named: Mapping[str, np.ndarray], like: Any) -> Any:
    """`named` in the structure of the template tree `like`: every leaf of `like` must be named,
    with its shape and dtype."""
    if _is_named_arrays(like):
        names, leaves = list(like), list(like.values())
    else:
        names, leaves, treedef = _leaf_names(like)
    missing = [n for n in names if n not in named]
    extra = [n for n in named if n not in set(names)]
    if missing or extra:
        raise InputError(f"the tensors do not match the tree: missing {missing[:5]}, not in the tree {extra[:5]}")
    out = []
    for name, leaf in zip(names, leaves):
        value = np.asarray(named[name])
        want = np.asarray(leaf) if not hasattr(leaf, "shape") else leaf
        if tuple(value.shape) != tuple(want.shape) or value.dtype != np.dtype(want.dtype):
            raise InputError(f"tensor {name!r} is {value.dtype}{list(value.shape)}, the tree's leaf "
                             f"{np.dtype(want.dtype)}{list(want.shape)}")
        out.append(value if isinstance(leaf, (np.ndarray, np.generic)) else _like_array(value, leaf))
    if _is_named_arrays(like):
        return dict(zip(names, out))
    from jax import tree_util  # noqa: PLC0415

    return tree_util.tree_unflatten(treedef, out)


def _like_array(value: np.ndarray, leaf: Any):
    """`value` as the template leaf's kind of array (a JAX array stays a JAX array)."""
    import jax  # noqa: PLC0415

    if isinstance(leaf, jax.Array):
        return jax.numpy.asarray(value)
    return value


def encode_tree(tree: Any, settings=None, **keywords) -> bytes:
    """gpucabac.encode of a pytree's named leaves (the same settings and keywords)."""
    from ..codec import encode  # noqa: PLC0415

    return encode(flatten(tree), settings, **keywords)


def decode_tree(data, like: Any, **keywords) -> Any:
    """gpucabac.decode of a container made by `encode_tree`, in the structure of `like`."""
    from ..codec import decode  # noqa: PLC0415

    return unflatten(decode(data, **keywords), like)


__all__ = ["SEPARATOR", "decode_tree", "encode_tree", "flatten", "unflatten"]
