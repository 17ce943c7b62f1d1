"""Learnable stand-in images for the FL model tests: no data set needed, and a tiny CNN learns
them in a few steps."""

from __future__ import annotations

import numpy as np


def learnable_images(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n, 28, 28, 1) images, uint8 labels): noise plus a bright 6x6 patch whose place
    is the label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = 0.3 * rng.random((n, 28, 28, 1), dtype=np.float32)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 5)
        x[i, 4 + 12 * r : 10 + 12 * r, 1 + 5 * q : 7 + 5 * q] += 0.7
    return x, y
