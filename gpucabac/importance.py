"""Importance files: per-weight importance (e.g. a diagonal Fisher estimate) saved beside a model,
and the coding settings and sweep weights made from them.

An importance file is a model file (.safetensors, .npz, .pt) whose arrays are named and shaped
like the model's tensors. Encoding with one gives each named tensor of two or more dimensions its
own step (rdquant.steps_from_importance) and, optionally, weights each weight's error in the
quantizer by its smoothed importance (rdquant.importance_shapes); a sweep with one weights each
weight's error by its shape and each tensor's by its scale (rdquant.importance_scales).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from . import io as gio
from .errors import InputError
from .rdquant import importance_scales, importance_shapes, steps_from_importance
from .settings import CodingSettings


def read_importance(path, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of an importance file, as float64. Every array must name a tensor of the model
    and have its shape (tensors that are not quantized, such as integer ones, ignore theirs)."""
    importance = gio.read_model(path)
    for name, a in importance.items():
        if name not in tensors:
            raise InputError(f"importance file {path}: {name!r} is not a tensor of the model")
        a, x = np.asarray(a), np.asarray(tensors[name])
        if a.shape != x.shape:
            raise InputError(f"importance file {path}: {name!r} has shape {a.shape}, the tensor {x.shape}")
    return {k: np.asarray(a, np.float64) for k, a in importance.items()}


def importance_settings(importance: Mapping[str, np.ndarray], settings: CodingSettings, *,
                        weighted: bool = False) -> tuple[dict[str, CodingSettings], dict[str, np.ndarray] | None]:
    """(per-tensor settings, per-weight importance or None) for `encode`: every array of two or
    more dimensions gives its tensor the step settings.step · (its mean importance / their
    geometric mean)^(-1/2), clamped to 1/16..16 times; with `weighted`, each weight's error in the
    quantizer also counts by its smoothed importance."""
    coded = {k: a for k, a in importance.items() if a.ndim >= 2}
    if not coded:
        raise InputError("importance file: no array of two or more dimensions, nothing to set steps from")
    steps = steps_from_importance(coded, settings.step)
    per_tensor = {name: settings.replace(step=step) for name, step in steps.items()}
    return per_tensor, importance_shapes(coded) if weighted else None


def sweep_weighting(importance: Mapping[str, np.ndarray], names: list[str]) -> tuple[dict, dict]:
    """What a sweep with an importance file weights: each swept tensor's per-weight shape (mean 1,
    in the quantizer and the weighted error) and its scale against the other swept tensors (the
    weighted error only)."""
    missing = [n for n in names if n not in importance]
    if missing:
        raise InputError(f"importance file: no array for the swept tensor(s) {', '.join(map(repr, missing))}")
    arrays = {n: importance[n] for n in names}
    return importance_shapes(arrays), importance_scales(arrays)


def file_digest(path) -> str:
    """sha256 of a file's bytes, hex (how a sweep records the importance file it was run with)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
