"""Quality and rate figures, defined once: SNR in dB and bits per weight."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .dtypes import is_float


def snr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise): inf without noise, -inf for noise without signal."""
    if noise == 0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def signal_of(x: np.ndarray) -> float:
    """Σ w² of a tensor in float64 (the "signal" of an SNR)."""
    w64 = np.asarray(x).astype(np.float64).reshape(-1)
    return float(w64 @ w64)


def tensors_snr_db(original: Mapping[str, np.ndarray], reconstructed: Mapping[str, np.ndarray]) -> float:
    """The SNR of the float tensors of `original` against their reconstructions, over all of them
    together (Σw² / Σ(w−ŵ)², in float64); inf when lossless, nan when there is no float tensor."""
    signal = noise = 0.0
    seen = False
    for name, w in original.items():
        if not is_float(np.asarray(w)):
            continue
        seen = True
        w64 = np.asarray(w, dtype=np.float64).ravel()
        err = w64 - np.asarray(reconstructed[name], dtype=np.float64).ravel()
        signal += float(w64 @ w64)
        noise += float(err @ err)
    return snr_db(signal, noise) if seen else math.nan


def bits_per_weight(nbytes: int, numel: int) -> float:
    """8 · bytes / weights (0 weights count as 1, so that an empty model reads 8 · bytes)."""
    return 8.0 * nbytes / max(1, numel)
