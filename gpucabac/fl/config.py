"""The settings of a federated run, in one frozen object: how updates travel (method, sparsity,
scaling, coding), what is trained (model, data, local training) and how the federation runs
(rounds, clients per round). The server reads it from Flower's run config and sends it to every
client with each round, so that client and server never disagree.

Run-config keys are the field names with "-" for "_" (Flower's convention): `num-rounds`,
`fraction-train`, `error-feedback`, …; `FLConfig.from_run_config` checks every key and value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from ..errors import InputError

# float32 FedAvg; gpucabac-coded dense differences; sparse coded updates; sparse + filter scales;
# sparse ternary compression (stc.py)
METHODS = ("dense", "coded", "sparse", "scaled", "stc")
DOWNSTREAM = ("coded", "dense")
PLACEMENTS = ("delta", "filter")
SPARSIFIERS = ("topk", "global_topk", "stats", "random")
DATASETS = ("mnist", "fashion_mnist")


@dataclasses.dataclass(frozen=True)
class FLConfig:
    """A federated run. Updates: `method` "dense" sends float32 differences uncoded both ways
    (FedAvg, the baseline); "coded" codes the dense differences at `qp` (no sparsifier);
    "sparse" sparsifies (`sparsifier`, keeping `density` of each update's entries) and codes
    them at `qp`; "scaled" adds one trained scale per output filter (`placement` "delta":
    w + s·Δw, "filter": s·(w + Δw); `scale_steps` Adam steps on local data); "stc" is sparse
    ternary compression (Sattler et al. 2019, stc.py: top-k of every float tensor at `density`,
    ±μ, Golomb-coded positions; `sparsifier` and `qp` unused). `error_feedback` keeps what an
    update left out for the next one (clients, and the server for its downloads). `downstream`
    "coded" codes the server's update to the clients as the method codes uploads ("coded":
    at `qp`, dense; "sparse" and "scaled": top-k keeping `downstream_density`, by default
    `density` times the clients per round, the most non-zeros a mean of their sparse updates
    has without scales, then at `qp`; "stc": STC at `downstream_density`), "dense" sends it
    uncoded (float32). "dense" FedAvg is float32 both ways whatever `downstream` says. `layers`: name prefixes of the tensors trained and sent (a partial update; empty:
    all). `slice_size` None codes every tensor as one slice (the cheapest for sparse updates,
    experiments/results/fl_sparse_bits.md)."""

    # what travels
    method: str = "scaled"
    sparsifier: str = "topk"
    density: float = 0.01
    error_feedback: bool = True
    placement: str = "delta"  # keeps the server's mean update sparse (docs/fl.md §5)
    scale_steps: int = 50
    qp: int = -32
    dq: bool = False
    slice_size: int | None = None
    downstream: str = "coded"
    downstream_density: float | None = None  # None: density x clients per round
    layers: tuple[str, ...] = ()
    # what is trained
    model: str = "vgg"
    model_size: str = "small"
    dataset: str = "mnist"
    alpha: float | None = None  # Dirichlet α of a non-IID split; None: IID
    samples_per_client: int | None = None  # at most this many training samples per client
    test_samples: int | None = None  # the server's test set (None: all)
    epochs: int = 1
    batch_size: int = 64
    lr: float = 1e-3
    # the federation
    num_rounds: int = 5
    num_clients: int = 2
    fraction_train: float = 1.0
    seed: int = 0

    def __post_init__(self):
        def choice(field, options):
            if getattr(self, field) not in options:
                raise InputError(f"FL setting {field}: {getattr(self, field)!r} is not one of {', '.join(map(str, options))}")

        choice("method", METHODS)
        choice("sparsifier", SPARSIFIERS)
        choice("placement", PLACEMENTS)
        choice("downstream", DOWNSTREAM)
        choice("dataset", DATASETS)
        if not 0 < self.density <= 1:
            raise InputError(f"FL setting density: {self.density!r} is not in (0, 1]")
        if self.downstream_density is not None and not 0 < self.downstream_density <= 1:
            raise InputError(f"FL setting downstream_density: {self.downstream_density!r} is not in (0, 1]")
        if not 0 < self.fraction_train <= 1:
            raise InputError(f"FL setting fraction_train: {self.fraction_train!r} is not in (0, 1]")
        for field in ("scale_steps", "epochs", "batch_size", "num_rounds", "num_clients"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "scale_steps" else 1):
                raise InputError(f"FL setting {field}: {value!r} is not a positive integer")
        if self.alpha is not None and not self.alpha > 0:
            raise InputError(f"FL setting alpha: {self.alpha!r} must be > 0 (or None for an IID split)")
        if not isinstance(self.layers, tuple):
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def clients_per_round(self) -> int:
        return max(1, math.ceil(self.fraction_train * self.num_clients - 1e-9))

    def download_density(self) -> float:
        """The fraction of the server's update it sends (coded downstream)."""
        if self.downstream_density is not None:
            return self.downstream_density
        return min(1.0, self.density * self.clients_per_round)

    def sends(self, name: str) -> bool:
        """Whether tensor `name` is trained and sent (a partial update sends a subset)."""
        return not self.layers or any(name == p or name.startswith(p.rstrip("/") + "/") for p in self.layers)

    def replace(self, **changes) -> FLConfig:
        return dataclasses.replace(self, **changes)

    # --- Flower's run config and ConfigRecord (flat str -> bool | int | float | str) -----------------

    def to_record(self) -> dict[str, Any]:
        """Flat values Flower can carry: None as "none", `layers` as a comma-separated string
        ("all" for every tensor; Flower 1.42 cannot count the bytes of an empty string)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if f.name == "layers":
                out[key] = ",".join(v) or "all"
            else:
                out[key] = "none" if v is None else v
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> FLConfig:
        """From `to_record`'s keys (a Flower run config or ConfigRecord); keys it does not know
        are an InputError, missing keys take their defaults."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in record.items():
            name = key.replace("-", "_")
            if name not in fields:
                raise InputError(f"unknown FL setting {key!r}; known: {', '.join(k.replace('_', '-') for k in fields)}")
            default = fields[name].default
            if name == "layers":
                value = () if str(value) in ("", "all") else tuple(p for p in str(value).split(",") if p)
            elif value in ("", "none") and name in ("alpha", "samples_per_client", "test_samples", "slice_size",
                                                    "downstream_density"):
                value = None
            elif isinstance(default, bool):
                value = _as_bool(value, key)
            elif isinstance(default, int) or name in ("samples_per_client", "test_samples", "slice_size"):
                value = _as_int(value, key)
            elif isinstance(default, float) or name in ("alpha", "downstream_density"):
                value = _as_float(value, key)
            kwargs[name] = value
        return cls(**kwargs)


def _as_bool(value, key) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise InputError(f"FL setting {key}: {value!r} is not a boolean")


def _as_int(value, key) -> int:
    if isinstance(value, bool):
        raise InputError(f"FL setting {key}: {value!r} is not an integer")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"FL setting {key}: {value!r} is not an integer") from None
    if f != int(f):
        raise InputError(f"FL setting {key}: {value!r} is not an integer")
    return int(f)


def _as_float(value, key) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"FL setting {key}: {value!r} is not a number") from None


__all__ = ["DATASETS", "DOWNSTREAM", "METHODS", "PLACEMENTS", "SPARSIFIERS", "FLConfig"]
