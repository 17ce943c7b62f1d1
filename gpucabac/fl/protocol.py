"""One round of federated learning with coded updates, without Flower: what a client does with
the downloads it receives and what it sends back, and what the server does with the uploads.
`flower.py` carries these bytes in Flower messages; the tests drive them directly too.

The server keeps the public model D (what every up-to-date client holds) and the list of its
downloads u_1, u_2, …: the client that last synchronised at version j gets u_{j+1} … u_k and
applies them in order, so every client's base is exactly D_k, checked by the digest in each
update (docs/fl.md §1); where they add up to more bytes than D_k itself, it gets a snapshot of
D_k instead (§1b). A client trains from D, sends its update against D; the server averages
the decoded (and, under scaling, rescaled) updates by sample count, adds its download residual
(error feedback), codes that as u_{k+1} and applies it: D_{k+1} = D_k + decoded(u_{k+1}).

Updates under `method="scaled"` also carry one scale per output filter (scaling.py), as
differences from 1 against a base extended by all-ones scales that both sides build; the server
folds them into the client's effective update, so the global model has no scales. Under
`method="stc"` uploads (and coded downloads) are sparse ternary streams (stc.py) rather than
gpucabac updates; `read` tells the two apart by their magic.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..settings import CodingSettings
from .config import FLConfig
from .feedback import ErrorFeedback
from .sparsify import sparsify
from .stc import encode_ternary, is_stc, read_stc, ternarize
from .update import (Update, apply_update, base_digest, encode_deltas, encode_snapshot, is_snapshot, read_snapshot,
                     read_update)

Params = dict[str, np.ndarray]
# (base params, the client's local-only variables such as BatchNorm statistics) -> (the params
# trained from the base, the local variables after training)
TrainFn = Callable[[Params, Params], tuple[Params, Params]]
# (base, sparse delta) -> scales {scale_name: (out,) float32}
ScaleFn = Callable[[Params, Params], Params]


def read(data, base: Params, digest: bytes | None = None) -> Update:
    """A gpucabac update or an STC stream (by its magic), decoded for `base` (`digest`: its
    base_digest, where the caller holds it)."""
    return read_stc(data, base, digest=digest) if is_stc(data) else read_update(data, base, digest=digest)


def chosen_clients(config: FLConfig, server_round: int) -> list[int]:
    """The partitions that train in a round: a sample of clients_per_round of them, seeded by
    (seed, round), so that every runner of the rounds (Flower's, the in-process loop) picks the same."""
    rng = np.random.default_rng([config.seed, server_round])
    return sorted(int(p) for p in rng.choice(config.num_clients, size=config.clients_per_round, replace=False))


def coding_settings(config: FLConfig) -> CodingSettings:
    return CodingSettings(qp=config.qp, quantizer="dq" if config.dq else "urq", slice_size=config.slice_size)


def scale_names_of(params: Mapping[str, np.ndarray]) -> dict[str, str]:
    from .scaling import scale_names  # noqa: PLC0415  (JAX loads with the scaling code only)

    return scale_names(params)


def with_unit_scales(base: Mapping[str, np.ndarray], scales_of: Mapping[str, str]) -> Params:
    """The base extended by all-ones scales: what scale updates are differences against."""
    out = dict(base)
    for kernel, scale in scales_of.items():
        out[scale] = np.ones(base[kernel].shape[-1], np.float32)
    return out


def _effective(base: Params, deltas: Mapping[str, np.ndarray], config: FLConfig,
               scales_of: Mapping[str, str]) -> Params:
    """The change a decoded client update makes to `base` (float32 per tensor), its scales folded
    in: "delta" s·Δw, "filter" s·(w + Δw) − w, per output filter (the last axis)."""
    out = {}
    for name, d in deltas.items():
        if name in base:
            out[name] = np.asarray(d, np.float32)
    if config.method != "scaled":
        return out
    for kernel, scale in scales_of.items():
        if kernel not in deltas and scale not in deltas:  # not in this (partial) update
            continue
        s = np.float32(1) + np.asarray(deltas.get(scale, 0), np.float32)
        d = out.get(kernel, np.zeros(base[kernel].shape, np.float32))
        if config.placement == "delta":
            out[kernel] = s * d
        else:
            w = base[kernel].astype(np.float32)
            out[kernel] = s * (w + d) - w
    return out


# --- the client ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ClientState:
    """What a client keeps between rounds: the public model it holds, how many downloads it
    has applied, its upload residual, and its local-only variables (BatchNorm statistics, which
    never travel). Flat named arrays (`to_arrays`) for Flower's context.state."""

    model: Params
    version: int = 0
    residual: ErrorFeedback = dataclasses.field(default_factory=ErrorFeedback)
    local: Params = dataclasses.field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f"model/{k}": v for k, v in self.model.items()}
        out |= {f"residual/{k}": v for k, v in self.residual.to_arrays().items()}
        out |= {f"local/{k}": v for k, v in self.local.items()}
        out["version"] = np.array([self.version], np.int64)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ClientState:
        def part(prefix):
            return {k[len(prefix):]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}

        model = part("model/")
        if "version" not in arrays or not model:
            raise InputError("client state: no model or version (not made by ClientState.to_arrays)")
        return cls(model, int(np.asarray(arrays["version"])[0]), ErrorFeedback.from_arrays(part("residual/")),
                   part("local/"))


@dataclasses.dataclass
class ClientRound:
    """A client's upload and what it measured."""

    upload: bytes
    metrics: dict[str, float]


def client_round(state: ClientState, downloads: Sequence[bytes], config: FLConfig, train: TrainFn,
                 train_scales: ScaleFn | None = None, *, seed: int = 0) -> ClientRound:
    """Apply the downloads, train from the result, and make the upload; `state` is updated in
    place (its model is the new base, its residual what this upload left out). `seed` (one per
    client and round) drives the random-k sparsifier."""
    t0 = time.perf_counter()
    for data in downloads:
        if is_snapshot(data):
            model, version = read_snapshot(data, state.model)
            if version <= state.version:
                raise InputError(f"a snapshot of model version {version} for a client at version {state.version}")
            state.model, state.version = model, version
        else:
            state.model = apply_update(read(data, state.model), state.model)
            state.version += 1
    t_down = time.perf_counter() - t0
    base = state.model
    t0 = time.perf_counter()
    local, state.local = train(base, state.local)
    t_train = time.perf_counter() - t0
    names = [n for n in base if config.sends(n) and base[n].dtype.kind == "f"]
    delta = {n: local[n].astype(np.float32) - base[n].astype(np.float32) for n in names}
    metrics = {"train-seconds": t_train, "download-decode-seconds": t_down}
    if config.method == "dense":
        t0 = time.perf_counter()
        upload = encode_deltas(delta, base, raw=True)
        metrics["encode-seconds"] = time.perf_counter() - t0
        metrics["kept"] = float(sum(d.size for d in delta.values()))
        return ClientRound(upload, metrics)
    intended = state.residual.add(delta) if config.error_feedback else delta
    if config.method == "stc":  # ternarising is STC's sparsifier: not timed as coding, as sparsify is not
        ternary, _ = ternarize(intended, config.density)
        t0 = time.perf_counter()
        digest = base_digest(base)
        upload = encode_ternary(ternary, base, digest=digest)
        t_encode = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = read_stc(upload, base, digest=digest).deltas
        t_decode = time.perf_counter() - t0
        if config.error_feedback:
            state.residual.keep(intended, decoded)
        metrics |= {"encode-seconds": t_encode, "decode-seconds": t_decode, "scale-seconds": 0.0,
                    "kept": float(sum(int(np.count_nonzero(d)) for d in decoded.values())),
                    "residual-norm": state.residual.norm()}
        return ClientRound(upload, metrics)
    if config.method == "coded":
        sparse, kept = intended, sum(d.size for d in intended.values())
    else:
        sparse, info = sparsify(intended, config.sparsifier, density=config.density, seed=seed)
        kept = info.kept
    coded_base, tensors = base, dict(sparse)
    t_scales = 0.0
    if config.method == "scaled":
        if train_scales is None:
            raise InputError("method 'scaled' needs a train_scales function")
        scales_of = scale_names_of(base)  # every kernel's, as the server builds the same base
        t0 = time.perf_counter()
        scales = train_scales(base, sparse)
        t_scales = time.perf_counter() - t0
        coded_base = with_unit_scales(base, scales_of)
        tensors |= {s: np.asarray(scales[s], np.float32) - np.float32(1) for k, s in scales_of.items() if k in sparse}
    t0 = time.perf_counter()
    digest = base_digest(coded_base)  # once, for the encoder and the check of its own decode
    upload = encode_deltas(tensors, coded_base, coding_settings(config), digest=digest)
    t_encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded = read_update(upload, coded_base, digest=digest).deltas
    t_decode = time.perf_counter() - t0
    if config.error_feedback:
        state.residual.keep(intended, {n: decoded[n] for n in sparse if n in decoded})
    metrics |= {"encode-seconds": t_encode, "decode-seconds": t_decode, "scale-seconds": t_scales,
                "kept": float(kept), "residual-norm": state.residual.norm()}
    return ClientRound(upload, metrics)


# --- the server ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ServerState:
    """The public model, every download made so far, and the download residual."""

    model: Params
    downloads: list[bytes] = dataclasses.field(default_factory=list)
    residual: ErrorFeedback = dataclasses.field(default_factory=ErrorFeedback)
    _snapshot: tuple[int, bytes] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def version(self) -> int:
        return len(self.downloads)

    def downloads_since(self, version: int) -> list[bytes]:
        """What a client that holds version `version` needs to be up to date: the downloads it
        missed, or, where they add up to more bytes, one snapshot of the public model (dense
        FedAvg's clients so get the model once, as FedAvg sends it, not every round they missed)."""
        if not 0 <= version <= self.version:
            raise InputError(f"a client claims model version {version}; the server is at {self.version}")
        missed = self.downloads[version:]
        missed_bytes = sum(len(d) for d in missed)
        # a snapshot holds every value raw, so below the model's raw size it cannot be smaller: not built
        if len(missed) > 1 and missed_bytes > sum(np.asarray(v).nbytes for v in self.model.values()):
            snapshot = self.snapshot()
            if len(snapshot) < missed_bytes:
                return [snapshot]
        return missed

    def snapshot(self) -> bytes:
        """The public model as one message (update.encode_snapshot), made once per version."""
        if self._snapshot is None or self._snapshot[0] != self.version:
            self._snapshot = (self.version, encode_snapshot(self.model, self.version))
        return self._snapshot[1]


def aggregate(server: ServerState, uploads: Sequence[tuple[bytes, float]], config: FLConfig) -> dict[str, float]:
    """Decode the uploads (against the server's model, which every uploader held), average their
    effective updates weighted by the given sample counts, in the order given, and make, apply
    and keep the next download. Returns bytes and timings."""
    if not uploads:
        raise InputError("no uploads to aggregate")
    base = server.model
    scales_of = scale_names_of(base) if config.method == "scaled" else {}
    coded_base = with_unit_scales(base, scales_of) if scales_of else base
    total = float(sum(w for _, w in uploads))
    if not total > 0:
        raise InputError("the uploads' sample counts must sum to a positive number")
    t0 = time.perf_counter()
    digest = base_digest(base)  # once, for the uploads (when they apply to the base itself) and the download
    upload_digest = base_digest(coded_base) if scales_of else digest  # every uploader held this base
    mean: dict[str, np.ndarray] = {}
    for data, weight in uploads:
        effective = _effective(base, read(data, coded_base, upload_digest).deltas, config, scales_of)
        w = np.float32(weight / total)
        for name, d in effective.items():
            mean[name] = w * d if name not in mean else mean[name] + w * d
    t_decode = time.perf_counter() - t0
    coded = config.downstream == "coded" and config.method != "dense"
    intended = server.residual.add(mean) if config.error_feedback and coded else mean
    # what the download sends, before it is coded: its sparsifying is the method's, not coding
    # time, as on the clients
    t0 = time.perf_counter()
    if coded and config.method == "stc":
        sparse = ternarize(intended, config.download_density())[0]
    elif coded and config.method != "coded":  # the mean of sparse updates, and under scaling the filters' rescaling
        sparse, _ = sparsify(intended, "topk", density=config.download_density())
    else:
        sparse = intended
    t_sparsify = time.perf_counter() - t0
    t0 = time.perf_counter()
    if not coded:
        download = encode_deltas(sparse, base, raw=True, digest=digest)
    elif config.method == "stc":
        download = encode_ternary(sparse, base, digest=digest)
    else:
        download = encode_deltas(sparse, base, coding_settings(config), digest=digest)
    t_encode = time.perf_counter() - t0
    update = read(download, base, digest)
    if config.error_feedback and coded:
        server.residual.keep(intended, update.deltas)
    server.model = apply_update(update, base)
    server.downloads.append(download)
    return {"upload-bytes": float(sum(len(d) for d, _ in uploads)), "download-bytes": float(len(download)),
            "server-decode-seconds": t_decode, "server-encode-seconds": t_encode, "server-sparsify-seconds": t_sparsify}


def round_seconds(clients: Sequence[Mapping[str, float]], summary: Mapping[str, float]) -> dict[str, float]:
    """A round's times from its clients' metrics and aggregate's summary: "train-seconds" the
    slowest client's training (clients train in parallel), "coding-seconds" the slowest client's
    encode + decode of its upload + decode of its downloads, plus "server-coding-seconds", the
    server's decode (with the averaging) and encode. Sparsifying is the method's work, not coding."""
    server = summary["server-decode-seconds"] + summary["server-encode-seconds"]
    return {"train-seconds": max(c["train-seconds"] for c in clients),
            "coding-seconds": max(c["encode-seconds"] + c.get("decode-seconds", 0.0) + c["download-decode-seconds"]
                                  for c in clients) + server,
            "server-coding-seconds": server}


def replay(initial: Params, downloads: Sequence[bytes]) -> Params:
    """The model the downloads imply, applied in order to the initial one (what any client that
    followed every round holds)."""
    model = dict(initial)
    for data in downloads:
        model = apply_update(read(data, model), model)
    return model


__all__ = ["ClientRound", "ClientState", "ServerState", "aggregate", "chosen_clients", "client_round",
           "coding_settings", "read", "replay", "round_seconds", "with_unit_scales"]
