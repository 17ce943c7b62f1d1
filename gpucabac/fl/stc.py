"""Sparse ternary compression (STC): the sparse-update baseline of the seed paper's own group
(Sattler, Wiedemann, Müller, Samek, "Robust and Communication-Efficient Federated Learning from
Non-IID Data", IEEE TNNLS 2019), written from that paper, as an exact bitstream.

Per tensor (the paper's Algorithm 1, on the flattened tensor):

    k  = max(⌊p·n + ½⌋, 1)           (p the density; the paper's max(np, 1), with our rounding
                                       rule of sparsify.keep_count so that a decimal p keeps the
                                       count it says)
    kept = the k entries of largest |x| (ties: the lower flat index, as sparsify's top-k)
    μ  = mean |x| over the k kept entries (float32)
    T* = μ·sign(x) on the kept entries, 0 elsewhere

Error accumulation is the caller's (feedback.ErrorFeedback: residual = intended − T*), as in
the paper, on the clients and, for downloads, on the server.

Positions are coded as the paper does: the gaps between consecutive non-zeros (the number of
zeros before each, the paper's d − 1) are roughly geometric with parameter p, and a Golomb code
with M = 2^b (a Rice code) of

    b* = 1 + ⌊log2(log(φ − 1) / log(1 − p))⌋        (φ the golden ratio)

is optimal for them (Gallager and van Voorhis); p is the tensor's own count / size, b is clipped
to 0 … MAX_B and stored in the tensor's header, so the decoder computes nothing in floats. A gap
g is q = g >> b one-bits, a zero-bit, then g mod 2^b in b bits (most significant first); the
non-zero's sign follows it (0: +μ, 1: −μ). The paper's expected cost per non-zero is
b* + 1/(1 − (1 − p)^(2^b*)) bits for the position plus 1 for the sign (`expected_bits`).

The byte layout (little endian), a stream per update:

| offset | size | field |
|---|---|---|
| 0 | 4 | magic `GSTC` |
| 4 | 1 | version, 1 |
| 5 | 3 | reserved, 0 |
| 8 | 32 | base digest (update.base_digest: the model the update applies to) |
| 40 | 4 | n, the number of tensors (u32, at most 2^20) |
| 44 | … | n tensor records |
| end − 4 | 4 | CRC-32 of every byte before it |

A tensor record: name length L (u16), the name (L bytes of UTF-8), ndim (u8, at most 32), the
shape (ndim × u32), the count of non-zeros (u32), μ (float32), b (u8), the payload's length P
(u32), and the payload: count codes as above, padded with zero bits to a whole byte; P is
exactly that many bytes. A tensor's size is below 2^32.

The reader rejects with FormatError anything that is not exactly such a stream: bad magic,
version or reserved bytes, a record running past the end, bytes left over, a checksum mismatch,
a name twice or not in the base, a shape other than the base's, a non-float base tensor, μ not
positive and finite where there are non-zeros, b above MAX_B, a position past the tensor's end,
a payload longer or shorter than its codes, non-zero padding. An update for another base is an
InputError. The base is never modified.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..dtypes import is_float
from ..errors import FormatError, InputError
from .pytree import flatten
from .sparsify import _check_update, _fraction, _topk_flat, _wide, keep_count
from .update import Update, held_digest

MAGIC = b"GSTC"
VERSION = 1
PHI = (1 + math.sqrt(5)) / 2
MAX_B = 31  # a Rice parameter above this never pays: the tensors here are below 2^32 entries
MAX_TENSORS = 1 << 20  # a corrupt count must not make the reader loop for long
MAX_NDIM = 32
_HEAD = struct.Struct("<4sB3s32sI")  # magic, version, reserved, base digest, tensor count
_FIXED = struct.Struct("<IfBI")  # count, μ, b, payload bytes (after the name and shape)


# --- ternarisation (the paper's Algorithm 1) -----------------------------------------------------


def stc_count(density: float, n: int) -> int:
    """How many entries STC keeps of a tensor of n: max(keep_count(density, n), 1), 0 when n = 0."""
    return 0 if n == 0 else max(keep_count(density, n), 1)


def ternarize(update: Mapping[str, np.ndarray], density: float) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(the ternary update, μ per tensor): every tensor of `update` (float) keeps its
    stc_count(density, size) entries of largest |x| as μ·sign(x), float32, μ their mean
    magnitude rounded to float32. A kept 0 stays 0 (sign 0), so a tensor with fewer non-zeros
    than k has fewer non-zeros than k."""
    tensors = _check_update(update)
    d = _fraction(density, "density")
    out, mus = {}, {}
    for name, a in tensors.items():
        mag = np.abs(_wide(a)).ravel()
        k = stc_count(d, mag.size)
        mask = _topk_flat(mag, k)
        mu = np.float32(mag[mask].astype(np.float64).mean()) if k else np.float32(0)
        # where, not a product: an entry left out must be +0.0, as the decoder writes it, not -0.0
        value = np.where(np.signbit(_wide(a).ravel()), -mu, mu)
        out[name] = np.where(mask & (mag > 0), value, np.float32(0)).astype(np.float32).reshape(a.shape)
        mus[name] = float(mu)
    return out, mus


# --- the Golomb (Rice) position code ---------------------------------------------------------------


def golomb_parameter(p: float) -> int:
    """The paper's b* = 1 + ⌊log2(log(φ − 1) / log(1 − p))⌋ for a density p in (0, 1], clipped
    to 0 … MAX_B (a dense tensor, p = 1, has only zero gaps: b = 0)."""
    if not 0 < p <= 1:
        raise InputError(f"density p must be in (0, 1] for the Golomb parameter, got {p!r}")
    if p >= 1:
        return 0
    ratio = math.log(PHI - 1) / math.log1p(-p)
    return int(min(MAX_B, max(0, 1 + math.floor(math.log2(ratio)))))


def expected_bits(p: float) -> float:
    """The paper's expected bits per non-zero: b* + 1/(1 − (1 − p)^(2^b*)) for its position, +1
    for its sign."""
    b = golomb_parameter(p)
    return b + 1 / (1 - (1 - p) ** (2 ** b)) + 1


def rice_bits(gaps: np.ndarray, b: int, signs: np.ndarray | None = None) -> np.ndarray:
    """The code of `gaps` (non-negative integers) with Rice parameter b, as a uint8 array of bits:
    per gap q = gap >> b ones, a zero, the low b bits of the gap (most significant first), and,
    when `signs` (bools, True for negative) is given, the sign bit after each."""
    gaps = np.asarray(gaps, np.int64)
    q = gaps >> b
    sign_bit = 0 if signs is None else 1
    lengths = q + 1 + b + sign_bit
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    bits = np.zeros(int(lengths.sum()), np.uint8)
    if q.sum():  # the unary parts: q ones from each code's start
        within = np.arange(int(q.sum()), dtype=np.int64) - np.repeat(np.cumsum(q) - q, q)
        bits[np.repeat(starts, q) + within] = 1
    rest = starts + q + 1
    for j in range(b):
        bits[rest + j] = (gaps >> (b - 1 - j)) & 1
    if signs is not None:
        bits[rest + b] = np.asarray(signs, bool)
    return bits


def _gaps(flat_positions: np.ndarray) -> np.ndarray:
    return np.diff(flat_positions, prepend=-1) - 1


# --- the stream ----------------------------------------------------------------------------------


def encode_ternary(ternary: Mapping[str, np.ndarray], base: Any, *, digest: bytes | None = None) -> bytes:
    """The STC stream of a ternary update: every tensor of `ternary` (a tensor of `base`, of its
    shape, a float base tensor) holds only 0, +μ and −μ for one μ > 0 (finite, exact in float32).
    `digest`: base_digest(base), where the caller holds it (update.encode_deltas)."""
    named = flatten(base)
    if len(ternary) > MAX_TENSORS:
        raise InputError(f"an STC update holds at most {MAX_TENSORS} tensors, got {len(ternary)}")
    parts = [_HEAD.pack(MAGIC, VERSION, b"\0\0\0", held_digest(named, digest), len(ternary))]
    for name, t in ternary.items():
        if name not in named:
            raise InputError(f"tensor {name!r} is not in the base")
        b_t = np.asarray(named[name])
        if not is_float(b_t):
            raise InputError(f"tensor {name!r} is {b_t.dtype}: STC codes differences of float tensors only")
        t = np.asarray(t)
        if t.shape != b_t.shape:
            raise InputError(f"tensor {name!r}: the ternary update has shape {list(t.shape)}, the base {list(b_t.shape)}")
        if t.size >= 1 << 32 or t.ndim > MAX_NDIM:
            raise InputError(f"tensor {name!r}: {t.size} entries in {t.ndim} dimensions, more than an STC record holds")
        flat = _wide(t).ravel() if is_float(t) else None
        if flat is None:
            raise InputError(f"tensor {name!r}: the ternary update has dtype {t.dtype}, not a float dtype")
        positions = np.flatnonzero(flat)
        mu = np.float32(0)
        if positions.size:
            mags = np.abs(flat[positions])
            mu = np.float32(mags[0])
            if not (np.isfinite(mu) and mu > 0 and np.all(mags == mags[0]) and float(mu) == float(mags[0])):
                raise InputError(f"tensor {name!r} is not ternary: its non-zeros must all be ±μ for one finite "
                                 f"float32 μ (found magnitudes {np.unique(mags)[:3].tolist()}…)")
        b = golomb_parameter(positions.size / flat.size) if positions.size else 0
        bits = rice_bits(_gaps(positions), b, np.signbit(flat[positions]))
        payload = np.packbits(bits).tobytes()
        encoded = name.encode("utf-8")
        if len(encoded) >= 1 << 16:
            raise InputError(f"tensor name {name[:40]!r}…: longer than an STC record holds (65535 bytes)")
        parts.append(struct.pack("<H", len(encoded)) + encoded + struct.pack(f"<B{t.ndim}I", t.ndim, *t.shape)
                     + _FIXED.pack(positions.size, mu, b, len(payload)) + payload)
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


def encode_stc(update: Mapping[str, np.ndarray], base: Any, density: float) -> bytes:
    """ternarize(update, density), coded (encode_ternary)."""
    return encode_ternary(ternarize(update, density)[0], base)


def is_stc(data) -> bool:
    """Whether `data` starts as an STC stream does."""
    return bytes(memoryview(data).cast("B")[:4]) == MAGIC


def _decode_codes(payload: memoryview, count: int, b: int, n: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat positions, negative?) of `count` codes in `payload`; every violation a FormatError."""
    bits = np.unpackbits(np.frombuffer(payload, np.uint8))
    total = bits.size
    # the first zero at or after each bit (total when none): a unary part ends there
    zero_at = np.where(bits == 0, np.arange(total), total)
    next_zero = np.minimum.accumulate(zero_at[::-1])[::-1] if total else zero_at
    weights = (1 << np.arange(b - 1, -1, -1, dtype=np.int64))
    positions = np.empty(count, np.int64)
    negative = np.empty(count, bool)
    pos, at = -1, 0
    for i in range(count):
        z = int(next_zero[at]) if at < total else total
        if z + b + 1 >= total:  # the sign bit, the code's last, is not there
            raise FormatError(f"STC tensor {name!r}: its payload ends inside code {i} of {count} (truncated)")
        r = int(bits[z + 1:z + 1 + b] @ weights) if b else 0
        pos += (((z - at) << b) | r) + 1
        if pos >= n:
            raise FormatError(f"STC tensor {name!r}: code {i} puts a non-zero at {pos}, past its {n} entries")
        positions[i] = pos
        negative[i] = bits[z + 1 + b]
        at = z + b + 2
    if (total - at) >= 8 or bits[at:].any():
        raise FormatError(f"STC tensor {name!r}: {total - at} bits after its {count} codes (expected zero padding "
                          "to the byte)")
    return positions, negative


def read_stc(data, base: Any, *, digest: bytes | None = None) -> Update:
    """Decode an STC stream for `base` into an Update (float32 differences, no values):
    FormatError for a corrupt or truncated stream, InputError for another base. `digest` as for
    encode_ternary."""
    buf = memoryview(data).cast("B")
    size = len(buf)
    if size < _HEAD.size + 4:
        raise FormatError(f"not an STC update: {size} bytes, shorter than its header")
    magic, version, reserved, want, count = _HEAD.unpack_from(buf)
    if magic != MAGIC:
        raise FormatError(f"not an STC update (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise FormatError(f"STC update format version {version}, this reader knows {VERSION}")
    if reserved != b"\0\0\0":
        raise FormatError("STC update header: reserved bytes are not zero")
    if count > MAX_TENSORS:
        raise FormatError(f"STC update header: {count} tensors, more than {MAX_TENSORS}")
    end = size - 4

    def take(at: int, n: int, what: str) -> int:
        if at + n > end:
            raise FormatError(f"STC update: {what} runs past the end of the {size} bytes (truncated)")
        return at + n

    records, at = [], _HEAD.size
    for i in range(count):
        nxt = take(at, 2, f"the name length of tensor record {i}")
        (length,) = struct.unpack_from("<H", buf, at)
        at, nxt = nxt, take(nxt, length + 1, f"the name of tensor record {i}")
        try:
            name = bytes(buf[at:at + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"STC update: the name of tensor record {i} is not UTF-8") from None
        ndim = buf[at + length]
        if ndim > MAX_NDIM:
            raise FormatError(f"STC tensor {name!r}: ndim {ndim} above {MAX_NDIM}")
        at, nxt = nxt, take(nxt, 4 * ndim + _FIXED.size, f"the header of tensor {name!r}")
        shape = struct.unpack_from(f"<{ndim}I", buf, at)
        nnz, mu, b, nbytes = _FIXED.unpack_from(buf, at + 4 * ndim)
        at, nxt = nxt, take(nxt, nbytes, f"the payload of tensor {name!r} ({nbytes} bytes)")
        records.append((name, shape, nnz, mu, b, buf[at:nxt]))
        at = nxt
    if at != end:
        raise FormatError(f"STC update: {end - at} bytes between its last tensor and its checksum")
    (crc,) = struct.unpack_from("<I", buf, end)
    if zlib.crc32(buf[:end]) != crc:
        raise FormatError("STC update: checksum mismatch (corrupt)")
    named = flatten(base)
    held = held_digest(named, digest)
    if bytes(want) != held:
        raise InputError(f"the STC update applies to another base (digest {bytes(want).hex()[:16]}…), not the one "
                         f"held here ({held.hex()[:16]}…)")
    deltas: dict[str, np.ndarray] = {}
    for name, shape, nnz, mu, b, payload in records:
        if name in deltas:
            raise FormatError(f"STC update: tensor {name!r} twice")
        if name not in named:
            raise FormatError(f"STC update: tensor {name!r} is not in the base")
        b_t = np.asarray(named[name])
        if not is_float(b_t):
            raise FormatError(f"STC update: tensor {name!r} is {b_t.dtype} in the base, not a float tensor")
        if tuple(shape) != b_t.shape:
            raise FormatError(f"STC update: tensor {name!r} has shape {list(shape)}, the base {list(b_t.shape)}")
        n = b_t.size
        if nnz > n:
            raise FormatError(f"STC tensor {name!r}: {nnz} non-zeros in {n} entries")
        if b > MAX_B:
            raise FormatError(f"STC tensor {name!r}: Golomb parameter b = {b} above {MAX_B}")
        if nnz and not (math.isfinite(mu) and mu > 0):
            raise FormatError(f"STC tensor {name!r}: μ = {mu!r}, not a positive finite number")
        positions, negative = _decode_codes(payload, nnz, b, n, name)
        flat = np.zeros(n, np.float32)
        flat[positions] = np.where(negative, -np.float32(mu), np.float32(mu))
        deltas[name] = flat.reshape(b_t.shape)
    return Update(bytes(want), deltas, {})


__all__ = ["MAGIC", "MAX_B", "VERSION", "encode_stc", "encode_ternary", "expected_bits", "golomb_parameter",
           "is_stc", "read_stc", "rice_bits", "stc_count", "ternarize"]
