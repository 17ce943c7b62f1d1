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


# SnrSum works through a tensor this many values at a time (two float64 buffers of this size)
SNR_CHUNK = 1 << 20


class SnrSum:
    """Σw² and Σ(w−ŵ)² of float tensors against their reconstructions, added tensor by tensor
    (`add`) in float64, SNR_CHUNK values at a time: no float64 copy of a whole tensor, so that a
    caller can compare a model with its decoding one tensor at a time. Tensors that are not
    float (integers, bools) are left out."""

    def __init__(self):
        self.signal = self.noise = 0.0
        self.seen = False  # whether a float tensor was added

    def add(self, original, reconstructed) -> None:
        w = np.asarray(original)
        if not is_float(w):
            return
        self.seen = True
        w = w.reshape(-1)
        r = np.asarray(reconstructed).reshape(-1)
        n = min(w.size, SNR_CHUNK)
        a, e = np.empty(n, np.float64), np.empty(n, np.float64)
        for i in range(0, w.size, SNR_CHUNK):
            m = min(SNR_CHUNK, w.size - i)
            a[:m] = w[i : i + m]
            e[:m] = r[i : i + m]
            np.subtract(a[:m], e[:m], out=e[:m])
            self.signal += float(a[:m] @ a[:m])
            self.noise += float(e[:m] @ e[:m])

    def snr_db(self) -> float:
        """10·log10(Σw² / Σ(w−ŵ)²): inf when lossless, nan when no float tensor was added."""
        return snr_db(self.signal, self.noise) if self.seen else math.nan


def tensors_snr_db(original: Mapping[str, np.ndarray], reconstructed: Mapping[str, np.ndarray]) -> float:
    """The SNR of the float tensors of `original` against their reconstructions, over all of them
    together (Σw² / Σ(w−ŵ)², in float64); inf when lossless, nan when there is no float tensor."""
    total = SnrSum()
    for name, w in original.items():
        if is_float(np.asarray(w)):
            total.add(w, reconstructed[name])
    return total.snr_db()


def bits_per_weight(nbytes: int, numel: int) -> float:
    """8 · bytes / weights (0 weights count as 1, so that an empty model reads 8 · bytes)."""
    return 8.0 * nbytes / max(1, numel)
