"""Error feedback: what a sender's coded update left out (sparsification and quantization) is
kept and added to its next update, so that nothing is lost for good.

    intended_t = update_t + residual_{t-1};   residual_t = intended_t - decoded_t

so after T rounds  sum(decoded_1..T) + residual_T = sum(update_1..T)  (in float arithmetic, to
rounding). A client keeps one per model; the server keeps one for its downstream updates. The
state is a flat mapping of names to float32 arrays (`to_arrays` / `from_arrays`): Flower's
`context.state` stores it as an ArrayRecord, so it survives the client object being recreated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from ..errors import InputError


@dataclasses.dataclass
class ErrorFeedback:
    """The residual per tensor (float32); a tensor without one has residual zero."""

    residual: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def add(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """update + residual, per tensor of `update` (float32)."""
        out = {}
        for name, u in update.items():
            u = np.asarray(u, np.float32)
            r = self.residual.get(name)
            if r is not None and r.shape != u.shape:
                raise InputError(f"tensor {name!r}: the update has shape {list(u.shape)}, its residual {list(r.shape)}")
            out[name] = u if r is None else u + r
        return out

    def keep(self, intended: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]) -> None:
        """residual = intended - decoded for every tensor of `intended` (a tensor the update did
        not carry keeps all of its intended change)."""
        for name, x in intended.items():
            x = np.asarray(x, np.float32)
            d = decoded.get(name)
            if d is None:
                self.residual[name] = x.copy()
                continue
            d = np.asarray(d, np.float32)
            if d.shape != x.shape:
                raise InputError(f"tensor {name!r}: decoded shape {list(d.shape)}, intended {list(x.shape)}")
            self.residual[name] = x - d

    def norm(self) -> float:
        """The residual's Euclidean norm over all tensors."""
        return float(np.sqrt(sum(float(np.vdot(r, r)) for r in self.residual.values())))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.array(v, np.float32) for k, v in self.residual.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ErrorFeedback:
        return cls({k: np.array(v, np.float32) for k, v in arrays.items()})


__all__ = ["ErrorFeedback"]
