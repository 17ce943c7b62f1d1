"""Differential updates: what changed against a base that sender and receiver both hold, coded
with gpucabac, and applied by the receiver (docs/fl.md §1 has the byte layout).

An update carries, per tensor sent, either its difference from the base (float tensors: coded
with the settings given, lossy at a QP or lossless) or its new value (integer and bool tensors,
such as BatchNorm step counters: always exact). Tensors not sent cost nothing but their absence
and keep their base value; the receiver knows which were sent. The update names the base it
applies to by a SHA-256 digest of the base's names, dtypes, shapes and bytes, so a receiver that
holds another base gets an InputError, never silently wrong weights.

Bases, models and deltas are named NumPy arrays or any JAX pytree (a Flax NNX state): see
pytree.py. The receiver's sum is `base + delta` computed in float32 (float64 for float64
tensors) and rounded to the base's dtype, the same on every machine, so a server's model is
exactly what the decoded updates imply.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from .. import container
from ..codec import decode, encode, info
from ..dtypes import dtype_name, is_float
from ..errors import FormatError, InputError
from ..settings import CodingSettings
from .pytree import flatten, unflatten

MAGIC = b"GCBU"
VERSION = 1
DIGEST_BYTES = 32
KIND_DELTA = 0  # the tensor's difference from the base
KIND_VALUE = 1  # the tensor's new value, exact (integer and bool tensors)
_HEAD = struct.Struct("<4sBBH32sI")  # magic, version, reserved, reserved, base digest, tensor count
# at most this many tensors in one update (a corrupt count must not make the reader allocate)
MAX_TENSORS = 1 << 20


def base_digest(base: Any) -> bytes:
    """SHA-256 of a model (named arrays or a pytree): per tensor in name order, its name (UTF-8),
    a NUL, its dtype name, a NUL, its shape (int64 little endian), and its bytes (little endian,
    row-major)."""
    h = hashlib.sha256()
    named = flatten(base)
    for name in sorted(named):
        x = np.asarray(named[name])
        h.update(name.encode("utf-8", "surrogatepass") + b"\0" + dtype_name(x).encode() + b"\0")
        h.update(np.asarray(x.shape, "<i8").tobytes())
        h.update(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.digest()


@dataclasses.dataclass(frozen=True)
class Update:
    """A decoded update: the digest of the base it applies to, the differences of the float
    tensors sent, and the new values of the integer tensors sent."""

    base_digest: bytes
    deltas: dict[str, np.ndarray]
    values: dict[str, np.ndarray]

    @property
    def names(self) -> list[str]:
        return [*self.deltas, *self.values]


def _work_dtype(dtype: np.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def add_delta(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """base + delta by the receivers' rule: in float32 (float64 for float64 tensors), rounded to
    the base's dtype."""
    work = _work_dtype(base.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        return (base.astype(work) + np.asarray(delta).astype(work)).astype(base.dtype)


def raw_container(tensors: Mapping[str, np.ndarray]) -> bytes:
    """A gpucabac container of raw records: every tensor's bytes as they are, uncoded (dense
    FedAvg's float32 updates, the baseline every coded update is measured against)."""
    records, pieces, offset = [], [], 0
    for name, x in tensors.items():
        x = np.asarray(x)
        data = np.frombuffer(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<"), copy=False).tobytes(), np.uint8)
        records.append(container.TensorRecord(
            name, dtype_name(x), tuple(int(d) for d in x.shape), "raw", 0.0, 0, 0, np.zeros(0, np.uint8), offset,
            np.array([data.size], np.uint32), np.array([zlib.crc32(data)], np.uint32)))
        pieces.append(data)
        offset += data.size
    return container.write(records, np.concatenate(pieces) if pieces else b"")


def encode_deltas(deltas: Mapping[str, np.ndarray], base: Any, settings: CodingSettings | None = None, *,
                  values: Mapping[str, np.ndarray] | None = None, per_tensor: Mapping[str, CodingSettings] | None = None,
                  importance: Mapping[str, np.ndarray] | None = None, raw: bool = False, digest: bytes | None = None,
                  **keywords) -> bytes:
    """An update from differences: `deltas` maps names of float tensors of `base` to their
    differences (same shapes), `values` names of integer tensors to their new values. `settings`,
    `per_tensor`, `importance` and the keywords are gpucabac.encode's (default QP -32; 1-D
    tensors at the small step); `raw` stores every tensor uncoded instead (float32 differences,
    the dense baseline). Every name must be a tensor of the base. `digest`: base_digest(base),
    where the caller already holds it (hashing a 1 M-parameter model takes ~2 ms); trusted as given."""
    named = flatten(base)
    values = dict(values or {})
    deltas = dict(deltas)
    both = sorted(set(deltas) & set(values))
    if both:
        raise InputError(f"tensors {both[:5]} are given both as a difference and as a value")
    for name, d in deltas.items():
        b = _base_tensor(named, name)
        if not is_float(b):
            raise InputError(f"tensor {name!r} is {dtype_name(b)}: an integer tensor is sent as its new value "
                             "(values=...), not as a difference")
        d = np.asarray(d)
        if d.shape != b.shape:
            raise InputError(f"tensor {name!r}: the difference has shape {list(d.shape)}, the base {list(b.shape)}")
        if not is_float(d):
            raise InputError(f"tensor {name!r}: the difference has dtype {d.dtype}, not a float dtype")
        deltas[name] = d.astype(_work_dtype(b.dtype), copy=False)
    for name, v in values.items():
        b = _base_tensor(named, name)
        v = np.asarray(v)
        if v.shape != b.shape or v.dtype != b.dtype:
            raise InputError(f"tensor {name!r}: the value is {v.dtype}{list(v.shape)}, the base {b.dtype}{list(b.shape)}")
        if is_float(b):
            raise InputError(f"tensor {name!r} is {dtype_name(b)}: a float tensor is sent as a difference")
    tensors = {**deltas, **values}
    if per_tensor is not None:
        unknown = sorted(set(per_tensor) - set(tensors))
        if unknown:
            raise InputError(f"per_tensor names tensors not in the update: {unknown[:5]}")
    if raw:
        if settings is not None or per_tensor is not None or importance is not None or keywords:
            raise InputError("raw=True stores the tensors uncoded: it takes no coding settings")
        payload = raw_container(tensors) if tensors else b""
    else:
        payload = encode(tensors, settings, per_tensor=per_tensor, importance=importance, **keywords) if tensors else b""
    kinds = bytes(KIND_DELTA if n in deltas else KIND_VALUE for n in tensors)
    head = _HEAD.pack(MAGIC, VERSION, 0, 0, held_digest(named, digest), len(tensors)) + kinds
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def encode_update(new: Any, base: Any, settings: CodingSettings | None = None, *, names: Iterable[str] | None = None,
                  skip_unchanged: bool = True, **keywords) -> bytes:
    """The update that turns `base` into (approximately, at lossy settings) `new`: float tensors
    as differences, integer tensors as exact values. `names` sends only those tensors (a partial
    update; default all); with `skip_unchanged` tensors equal to the base are left out. Other
    keywords as for `encode_deltas`."""
    new_named, base_named = flatten(new), flatten(base)
    if set(new_named) != set(base_named):
        raise InputError(f"new and base have different tensors: {sorted(set(new_named) ^ set(base_named))[:5]}")
    wanted = list(new_named) if names is None else list(names)
    deltas, values = {}, {}
    for name in wanted:
        b, x = _base_tensor(base_named, name), np.asarray(new_named[name])
        if x.shape != b.shape or x.dtype != b.dtype:
            raise InputError(f"tensor {name!r} is {x.dtype}{list(x.shape)} in new, {b.dtype}{list(b.shape)} in base")
        if skip_unchanged and np.array_equal(x, b):
            continue
        if is_float(b):
            work = _work_dtype(b.dtype)
            deltas[name] = x.astype(work) - b.astype(work)
        else:
            values[name] = x
    return encode_deltas(deltas, base_named, settings, values=values, **keywords)


def _base_tensor(named: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in named:
        raise InputError(f"tensor {name!r} is not in the base")
    return np.asarray(named[name])


def read_header(data) -> tuple[bytes, bytes, memoryview]:
    """(base digest, per-tensor kinds, the gpucabac container) of an update; FormatError for a
    stream that is not one, is truncated or whose header checksum fails."""
    buf = memoryview(data).cast("B")
    if len(buf) < _HEAD.size + 4:
        raise FormatError(f"not a gpucabac update: {len(buf)} bytes, shorter than its header")
    magic, version, r1, r2, digest, count = _HEAD.unpack_from(buf)
    if magic != MAGIC:
        raise FormatError(f"not a gpucabac update (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise FormatError(f"update format version {version}, this reader knows {VERSION}")
    if r1 or r2:
        raise FormatError("update header: reserved fields are not zero")
    if count > MAX_TENSORS or _HEAD.size + count + 4 > len(buf):
        raise FormatError(f"update header: {count} tensors run past the end of the {len(buf)} bytes")
    end = _HEAD.size + count
    (crc,) = struct.unpack_from("<I", buf, end)
    if zlib.crc32(buf[:end]) != crc:
        raise FormatError("update header: checksum mismatch")
    kinds = bytes(buf[_HEAD.size:end])
    if any(k not in (KIND_DELTA, KIND_VALUE) for k in kinds):
        raise FormatError("update header: unknown tensor kind")
    payload = buf[end + 4:]
    if count == 0 and len(payload):
        raise FormatError("update: bytes after an empty update")
    return bytes(digest), kinds, payload


def held_digest(named: Mapping[str, np.ndarray], digest: bytes | None) -> bytes:
    """`digest` (checked to be one) where the caller holds it, else base_digest(named)."""
    if digest is None:
        return base_digest(named)
    if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
        raise InputError(f"digest must be the {DIGEST_BYTES} bytes of base_digest(base)")
    return digest


def read_update(data, base: Any, *, digest: bytes | None = None, **keywords) -> Update:
    """Decode an update for `base`: InputError when it was made for another base, FormatError
    for a corrupt or truncated one (the base is never modified). `digest` as for encode_deltas;
    other keywords go to gpucabac.decode (threads, device, max_output_bytes)."""
    want, kinds, payload = read_header(data)
    named = flatten(base)
    held = held_digest(named, digest)
    if want != held:
        raise InputError(f"the update applies to another base (digest {want.hex()[:16]}…), not the one held here "
                         f"({held.hex()[:16]}…)")
    if not kinds:
        return Update(want, {}, {})
    described = info(payload)
    if len(described.tensors) != len(kinds):
        raise FormatError(f"update: its header lists {len(kinds)} tensors, its container holds {len(described.tensors)}")
    for t, kind in zip(described.tensors, kinds):
        if t.name not in named:
            raise FormatError(f"update: tensor {t.name!r} is not in the base")
        b = named[t.name]
        if tuple(t.shape) != tuple(b.shape):
            raise FormatError(f"update: tensor {t.name!r} has shape {list(t.shape)}, the base {list(b.shape)}")
        want = dtype_name(_work_dtype(b.dtype)) if kind == KIND_DELTA else dtype_name(b)
        if (kind == KIND_DELTA and not is_float(b)) or t.dtype != want:
            raise FormatError(f"update: tensor {t.name!r} is coded as {t.dtype}, expected {want} for a "
                              f"{'difference' if kind == KIND_DELTA else 'value'} of a {dtype_name(b)} tensor")
    decoded = decode(payload, **keywords)
    deltas = {t.name: decoded[t.name] for t, k in zip(described.tensors, kinds) if k == KIND_DELTA}
    values = {t.name: decoded[t.name] for t, k in zip(described.tensors, kinds) if k == KIND_VALUE}
    return Update(want, deltas, values)


def apply_update(update: Update, base: Any) -> Any:
    """The receiver's new model: the base with every delta added (add_delta) and every value
    replaced, in the base's structure (a new tree; the base is not modified)."""
    named = flatten(base)
    out = {}
    for name, b in named.items():
        if name in update.deltas:
            out[name] = add_delta(b, update.deltas[name])
        elif name in update.values:
            out[name] = np.array(update.values[name], copy=True)
        else:
            out[name] = b
    return unflatten(out, base)


def decode_update(data, base: Any, **keywords) -> Any:
    """`apply_update(read_update(data, base), base)`: the new model, in the structure of `base`."""
    return apply_update(read_update(data, base, **keywords), base)


# --- snapshots: the whole public model, for a client that missed more than it is worth ------------

SNAPSHOT_MAGIC = b"GCBS"
SNAPSHOT_VERSION = 1
_SNAPSHOT_HEAD = struct.Struct("<4sB3sI32s")  # magic, version, reserved, model version, model digest


def encode_snapshot(model: Any, model_version: int) -> bytes:
    """The whole model as one message (docs/fl.md §1b): every tensor's value, uncoded, with the
    model's version (how many downloads it stands for) and digest. What a server sends a client
    that missed downloads larger than the model itself."""
    named = flatten(model)
    if isinstance(model_version, bool) or not isinstance(model_version, int) or not 0 <= model_version < 1 << 32:
        raise InputError(f"a snapshot's model version must be an integer in [0, 2^32), got {model_version!r}")
    head = _SNAPSHOT_HEAD.pack(SNAPSHOT_MAGIC, SNAPSHOT_VERSION, b"\0\0\0", model_version, base_digest(named))
    return head + struct.pack("<I", zlib.crc32(head)) + (raw_container(named) if named else b"")


def is_snapshot(data) -> bool:
    return bytes(memoryview(data).cast("B")[:4]) == SNAPSHOT_MAGIC


def read_snapshot(data, like: Any) -> tuple[Any, int]:
    """(the model, its version) of a snapshot, in the structure of `like`, the receiver's model,
    whose tensors (names, shapes, dtypes) it must hold exactly; FormatError for a stream that is
    not such a snapshot, is truncated, fails a checksum or whose values do not have the digest it
    names. `like` is never modified."""
    buf = memoryview(data).cast("B")
    end = _SNAPSHOT_HEAD.size
    if len(buf) < end + 4:
        raise FormatError(f"not a model snapshot: {len(buf)} bytes, shorter than its header")
    magic, version, reserved, model_version, digest = _SNAPSHOT_HEAD.unpack_from(buf)
    if magic != SNAPSHOT_MAGIC:
        raise FormatError(f"not a model snapshot (magic {bytes(magic)!r}, expected {SNAPSHOT_MAGIC!r})")
    if version != SNAPSHOT_VERSION:
        raise FormatError(f"snapshot format version {version}, this reader knows {SNAPSHOT_VERSION}")
    if reserved != b"\0\0\0":
        raise FormatError("snapshot header: reserved fields are not zero")
    (crc,) = struct.unpack_from("<I", buf, end)
    if zlib.crc32(buf[:end]) != crc:
        raise FormatError("snapshot header: checksum mismatch")
    named = flatten(like)
    payload = buf[end + 4:]
    described = info(payload).tensors if len(payload) else []
    if [t.name for t in described] != list(named):
        raise FormatError(f"snapshot: it holds tensors {[t.name for t in described][:5]}…, the model "
                          f"{list(named)[:5]}… (the same names in the same order are expected)")
    for t in described:
        b = named[t.name]
        if t.mode != "raw" or tuple(t.shape) != tuple(b.shape) or t.dtype != dtype_name(b):
            raise FormatError(f"snapshot: tensor {t.name!r} is {t.mode} {t.dtype}{list(t.shape)}, the model's "
                              f"{dtype_name(b)}{list(b.shape)} (raw)")
    values = decode(payload) if described else {}
    if base_digest(values) != digest:
        raise FormatError("snapshot: the values do not have the digest its header names")
    return unflatten(values, like), model_version


__all__ = ["KIND_DELTA", "KIND_VALUE", "MAGIC", "SNAPSHOT_MAGIC", "SNAPSHOT_VERSION", "VERSION", "Update", "add_delta",
           "apply_update", "base_digest", "decode_update", "encode_deltas", "encode_snapshot", "encode_update",
           "is_snapshot", "raw_container", "read_header", "read_snapshot", "read_update"]
