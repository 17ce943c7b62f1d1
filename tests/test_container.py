"""Bad input must fail cleanly (docs/format.md §5): truncated,
bit-flipped and crafted containers raise gpucabac.FormatError naming the problem, never another
exception, never a hang, never a huge allocation. Plus random access: loading one tensor reads
only the header and that tensor's bytes.

The crafted headers are built by a small writer in this file, independent of gpucabac's, that
recomputes the table checksum so the reader's field checks (not the CRC) must catch the problem.
"""

from __future__ import annotations

import builtins
import io
import os
import struct
import time
import tracemalloc
import zlib

import ml_dtypes
import numpy as np
import pytest

import gpucabac
from gpucabac import FormatError, container
from gpucabac.binarize import used_contexts
from gpucabac.tables import NUM_PRESETS

# --- an independent reader/writer of the layout (container.py, docs/format.md) -----------------

PRE = struct.Struct("<8sHHIQII")  # magic, version, flags, count, table length, table crc, reserved
MAGIC = b"\x89GCB\r\n\x1a\n"
DTYPES = container.DTYPES  # the codes are fixed by the format (and pinned by the golden files)
# docs/format.md's mode codes; 4.. (the larger DQ trellises) only in format version 2
MODES = ("urq", "dq", "int", "raw", "dq16", "dq32", "dq64", "dq128", "dq256")


def parse_layout(data: bytes):
    """(preamble fields, [record dicts], payload bytes), without validation."""
    magic, version, flags, count, tlen, tcrc, reserved = PRE.unpack_from(data)
    table = data[PRE.size : PRE.size + tlen]
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, table, pos)
        pos += struct.calcsize("<" + fmt)
        return v

    recs = []
    for _ in range(count):
        (nlen,) = take("H")
        name = table[pos : pos + nlen]
        pos += nlen
        dcode, mcode, ndim, ngt = take("BBBB")
        shape = list(take(f"{ndim}Q"))
        step, slice_size, nslices = take("fII")
        nctx, ctx = None, None
        if MODES[mcode & 0x7F] != "raw":  # bit 7: column scan (version 2)
            (nctx,) = take("B")
            raw = table[pos : pos + (nctx + 1) // 2]
            pos += (nctx + 1) // 2
            ctx = [(raw[i // 2] >> (4 * (i % 2))) & 15 for i in range(nctx)]
        offset, length = take("QQ")
        lengths = list(take(f"{nslices}I"))
        crcs = list(take(f"{nslices}I"))
        recs.append(dict(name=name, dcode=dcode, mcode=mcode, ndim=ndim, ngt=ngt, shape=shape, step=step,
                         slice_size=slice_size, nslices=nslices, nctx=nctx, ctx=ctx, offset=offset,
                         length=length, lengths=lengths, crcs=crcs))
    assert pos == len(table)
    pre = dict(magic=magic, version=version, flags=flags, count=count, tlen=tlen, tcrc=tcrc, reserved=reserved)
    return pre, recs, data[PRE.size + tlen :]


def pack_record(r: dict) -> bytes:
    out = [struct.pack("<H", len(r["name"])), r["name"],
           struct.pack("<BBBB", r["dcode"], r["mcode"], r.get("ndim_field", len(r["shape"])), r["ngt"]),
           struct.pack(f"<{len(r['shape'])}Q", *r["shape"]),
           struct.pack("<fII", r["step"], r["slice_size"], r.get("nslices_field", len(r["lengths"])))]
    if r["ctx"] is not None:
        ctx = list(r["ctx"]) + [r.get("pad_nibble", 0)] * (len(r["ctx"]) % 2)
        out += [struct.pack("<B", len(r["ctx"])), bytes(a | (b << 4) for a, b in zip(ctx[0::2], ctx[1::2]))]
    out += [struct.pack("<QQ", r["offset"], r["length"]),
            struct.pack(f"<{len(r['lengths'])}I", *r["lengths"]),
            struct.pack(f"<{len(r['crcs'])}I", *r["crcs"])]
    return b"".join(out)


def build(recs, payload: bytes, table: bytes | None = None, **pre) -> bytes:
    """A container from records (or a given table), the table CRC recomputed unless `tcrc` is
    given, other preamble fields overridable."""
    table = b"".join(pack_record(r) for r in recs) if table is None else table
    f = dict(magic=MAGIC, version=1, flags=0, count=len(recs), tlen=len(table), tcrc=zlib.crc32(table), reserved=0)
    f.update(pre)
    return PRE.pack(f["magic"], f["version"], f["flags"], f["count"], f["tlen"], f["tcrc"], f["reserved"]) + table + payload


def sample_tensors(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.standard_normal((4, 3, 2, 2)) * 0.05).astype(np.float32),
        "fc.weight": (rng.standard_normal((6, 10)) * 0.1).astype(ml_dtypes.bfloat16),
        "fc.bias": (rng.standard_normal(10) * 0.01).astype(np.float32),
        "steps": np.array([3, -7, 0, 120, 5], np.int16),
        "huge": np.array([2**40, -5], np.int64),  # beyond the codable levels: stored raw
    }


@pytest.fixture(scope="module")
def sample() -> bytes:
    return gpucabac.encode(sample_tensors(), qp=-32, slice_size=16)


@pytest.fixture(scope="module")
def sample_dq() -> bytes:
    return gpucabac.encode({"w": sample_tensors()["conv.weight"]}, qp=-30, dq=True, slice_size=None)


def test_independent_layout_reader_agrees(sample):
    pre, recs, payload = parse_layout(sample)
    assert pre["magic"] == MAGIC and pre["version"] == 1  # no version-2 mode in it: written as version 1
    assert pre["flags"] == pre["reserved"] == 0 and pre["tcrc"] == zlib.crc32(sample[32 : 32 + pre["tlen"]])
    assert build(recs, payload) == sample
    names = [r["name"].decode() for r in recs]
    assert names == list(sample_tensors())
    modes = {r["name"].decode(): MODES[r["mcode"]] for r in recs}
    assert modes == {"conv.weight": "urq", "fc.weight": "urq", "fc.bias": "urq", "steps": "int", "huge": "raw"}
    off = 0
    for r in recs:
        assert r["offset"] == off and sum(r["lengths"]) == r["length"]
        for n, crc in zip(r["lengths"], r["crcs"]):
            assert zlib.crc32(payload[off : off + n]) == crc
            off += n
    assert off == len(payload)


# --- truncation and bit flips -------------------------------------------------------------------

TRUNCATION = r"too short|runs past the end|truncated|trailing data"


def test_every_truncation_raises(sample, tmp_path):
    for n in range(len(sample)):
        with pytest.raises(FormatError, match=TRUNCATION):
            gpucabac.decode(sample[:n], threads=1)
    for n in (0, 10, 31, 32, 100, len(sample) // 2, len(sample) - 1):
        p = tmp_path / f"t{n}.gcb"
        p.write_bytes(sample[:n])
        with pytest.raises(FormatError, match=TRUNCATION):
            gpucabac.load(p)
        with pytest.raises(FormatError, match=TRUNCATION):
            gpucabac.info(str(p))


def test_every_bit_flip_raises(sample, sample_dq):
    for data in (sample, sample_dq):
        tlen = parse_layout(data)[0]["tlen"]
        for i in range(len(data)):
            for bit in range(8):
                bad = bytearray(data)
                bad[i] ^= 1 << bit
                with pytest.raises(FormatError) as e:
                    gpucabac.decode(bytes(bad), threads=1)
                msg = str(e.value)
                if i >= 32 + tlen:  # payload: caught by the slice checksums
                    assert "checksum mismatch" in msg and ("slice" in msg or "raw payload" in msg), msg
                elif i >= 32:  # tensor table: caught by the table checksum
                    assert "tensor table checksum mismatch" in msg, msg


def test_larger_trellis_is_version_2(sample):
    x = {"w": sample_tensors()["conv.weight"], "b": sample_tensors()["fc.bias"]}
    data = gpucabac.encode(x, qp=-30, dq=64, slice_size=16)
    pre, recs, payload = parse_layout(data)
    assert pre["version"] == 2 and [MODES[r["mcode"]] for r in recs] == ["dq64", "dq64"]
    assert container.MODES == MODES and gpucabac.info(data).version == 2
    back = gpucabac.decode(data)
    want = gpucabac.quantize(x, qp=-30, dq=64, slice_size=16)
    assert all(np.array_equal(back[n], want[n]) for n in x)
    # the same records under a version-1 preamble: mode 6 did not exist then
    with pytest.raises(FormatError, match="unknown coding mode 6 \\(format version 1\\)"):
        gpucabac.decode(build(recs, payload, version=1))


def test_column_scan_flag_rules(sample):
    x = {"w": sample_tensors()["conv.weight"], "b": sample_tensors()["fc.bias"], "i": np.arange(6, dtype=np.int16).reshape(2, 3)}
    data = gpucabac.encode(x, qp=-30, slice_size=16, scan="columns")
    pre, recs, payload = parse_layout(data)
    assert pre["version"] == 2 and [r["mcode"] for r in recs] == [0x80, 0, 2]  # urq | column bit; urq; int
    assert [t.scan for t in gpucabac.info(data).tensors] == ["columns", "rows", "rows"]
    # the bit is not a mode of version 1, and not allowed on 1-D or integer tensors
    with pytest.raises(FormatError, match="unknown coding mode 128 \\(format version 1\\)"):
        gpucabac.decode(build(recs, payload, version=1))
    for i in (1, 2):
        bad = [dict(r) for r in recs]
        bad[i]["mcode"] |= 0x80
        with pytest.raises(FormatError, match="column scan needs a coded float tensor"):
            gpucabac.decode(build(bad, payload, version=2))


def test_wrong_magic_version_reserved(sample):
    pre, recs, payload = parse_layout(sample)
    cases = [
        (dict(magic=b"\x89GCB\r\n\x1a\x00"), "not a gpucabac container"),
        (dict(magic=b"PK\x03\x04\x00\x00\x00\x00"), "magic"),
        (dict(version=0), "unsupported container version 0"),
        (dict(version=4), "unsupported container version 4"),
        (dict(version=3), "preamble says format version 3, its tensors are version 1"),
        (dict(version=2), "preamble says format version 2, its tensors are version 1"),
        (dict(version=0xFFFF), "version"),
        (dict(flags=1), "reserved"),
        (dict(flags=0x8000), "reserved"),
        (dict(reserved=1), "reserved"),
        (dict(tcrc=pre["tcrc"] ^ 1), "tensor table checksum mismatch"),
    ]
    for fields, match in cases:
        with pytest.raises(FormatError, match=match):
            gpucabac.decode(build(recs, payload, **fields))
        with pytest.raises(FormatError, match=match):
            gpucabac.info(build(recs, payload, **fields))
    with pytest.raises(FormatError, match="magic"):
        gpucabac.decode(b"\x00" * 64)
    with pytest.raises(FormatError, match="too short"):
        gpucabac.decode(b"")


# --- crafted headers with a valid table checksum ---------------------------------------------------


def _rec(recs, name):
    return next(r for r in recs if r["name"] == name.encode())


def _edit(data, fn):
    """Apply fn(pre, recs, payload) -> (recs, payload, pre overrides), rebuild with a valid CRC."""
    pre, recs, payload = parse_layout(data)
    out = fn(pre, recs, payload)
    recs, payload, over = out if len(out) == 3 else (*out, {})
    return build(recs, payload, **over)


def _set(tensor, **fields):
    def fn(pre, recs, payload):
        _rec(recs, tensor).update(fields)
        return recs, payload
    return fn


def _replace_payload(name, new_bytes_per_slice):
    """Give tensor `name` new slice bytes (CRCs recomputed) and shift the others' offsets."""
    def fn(pre, recs, payload):
        out, off = [], 0
        for r in recs:
            start = r["offset"]
            chunk = payload[start : start + r["length"]]
            if r["name"] == name.encode():
                slices = new_bytes_per_slice(r)
                r["lengths"] = [len(s) for s in slices]
                r["crcs"] = [zlib.crc32(s) for s in slices]
                chunk = b"".join(slices)
            r["offset"], r["length"] = off, len(chunk)
            out.append(chunk)
            off += len(chunk)
        return recs, b"".join(out)
    return fn


def _consistent_huge(pre, recs, payload):
    r = _rec(recs, "conv.weight")
    r.update(shape=[2**20, 2**20], slice_size=2**32 - 1)
    return _replace_payload("conv.weight", lambda r: [b"\x80\x00"] * 257)(pre, recs, payload)


def _consistent_many_slices(pre, recs, payload):
    # 2**32 - 1 elements in slices of 1: the slice table alone would be 32 GiB
    r = _rec(recs, "conv.weight")
    r.update(shape=[2**32 - 1], ndim=1, slice_size=1, nslices_field=2**32 - 1)
    return recs, payload


def _big_for_payload(pre, recs, payload):
    # one 120-byte-ish slice that claims 2**30 levels: more than any valid stream holds
    r = _rec(recs, "conv.weight")
    n = sum(r["lengths"])
    r.update(shape=[2**15, 2**15], slice_size=2**30)
    return _replace_payload("conv.weight", lambda r: [payload[r["offset"] : r["offset"] + n]])(pre, recs, payload)


def _count(n):
    return lambda pre, recs, payload: (recs, payload, dict(count=n))


CRAFTED = {
    "shape over 2**40 elements": (_set("conv.weight", shape=[2**21, 2**20]), "more than 1099511627776 elements"),
    "shape of 2**64-1 in one dim": (_set("fc.weight", shape=[2**64 - 1, 1]), "exceeds 1099511627776"),
    "huge shape, consistent slices": (_consistent_huge, "more than any valid stream holds"),
    "shape larger than payload": (_big_for_payload, "more than any valid stream holds"),
    "raw shape larger than payload": (_set("huge", shape=[2**30]), "raw payload of 16 bytes"),
    "raw shape smaller than payload": (_set("huge", shape=[1]), "raw payload"),
    "slice count 2**32-1": (_set("conv.weight", nslices_field=2**32 - 1), "truncated while reading slice lengths|slices, but"),
    "slice count of 2**32-1 slices of 1": (_consistent_many_slices, "truncated while reading slice lengths"),
    "slice count inconsistent": (_set("fc.weight", nslices_field=3), "3 slices, but"),
    "tensor count 2**32-1": (_count(2**32 - 1), "tensor count 4294967295 cannot fit"),
    "tensor count one more": (_count(6), "truncated|cannot fit"),
    "tensor count one less": (_count(4), "unused bytes"),
    "tensor count zero": (_count(0), "unused bytes"),
    "offset not back to back": (_set("fc.weight", offset=1), "payload offset 1, expected"),
    "offset 2**63": (_set("conv.weight", offset=2**63), "payload offset"),
    "length mismatch": (_set("fc.bias", length=1), "add up to"),
    "length 2**64-1": (_set("fc.bias", length=2**64 - 1), "add up to"),
    "slice length 2**32-1": (lambda pre, recs, payload: _slice_len_past_end(recs, payload), "runs past the end"),
    "slice shorter than 2 bytes": (lambda pre, recs, payload: _short_slice(recs, payload), "at least 2"),
    "table length 2**63": (lambda pre, recs, payload: (recs, payload, dict(tlen=2**63)), "runs past the end"),
    "table length short": (lambda pre, recs, payload: _short_table(recs, payload), "truncated|unused"),
    "ndim 9": (_set("fc.bias", ndim_field=9), "dimensions"),
    "ndim 255": (_set("fc.bias", ndim_field=255), "255 dimensions"),
    "unknown dtype": (_set("fc.bias", dcode=200), "unknown dtype code 200"),
    "unknown mode": (_set("fc.bias", mcode=9), "unknown coding mode 9"),
    "too many flags": (_set("fc.weight", ngt=21), "21 greater-than flags"),
    "step nan": (_set("fc.weight", step=float("nan")), "step"),
    "step zero": (_set("fc.weight", step=0.0), "step"),
    "step negative": (_set("fc.weight", step=-1.0), "step"),
    "step inf": (_set("fc.weight", step=float("inf")), "step"),
    "slice size 0": (_set("fc.weight", slice_size=0), "slice size 0"),
    "raw with a slice size": (_set("huge", slice_size=7), "raw tensor"),
    "raw with flags": (_set("huge", ngt=3), "raw tensor"),
    "int mode for floats": (_set("fc.weight", mcode=MODES.index("int")), "integer mode"),
    "empty name": (_set("fc.bias", name=b""), "empty name"),
    "name not utf-8": (_set("fc.bias", name=b"\xff\xfe"), "UTF-8"),
    "duplicate name": (_set("fc.bias", name=b"fc.weight"), "appears twice"),
    "trailing data": (lambda pre, recs, payload: (recs, payload + b"\x00"), "trailing data"),
    "missing payload byte": (lambda pre, recs, payload: (recs, payload[:-1]), "runs past the end|truncated"),
}
if NUM_PRESETS < 16:  # a 4-bit index can name a preset that does not exist
    def _bad_preset(pre, recs, payload):
        r = _rec(recs, "fc.weight")
        r["ctx"] = [15] * len(r["ctx"])
        return recs, payload
    CRAFTED["context preset index"] = (_bad_preset, "not a preset")


def _slice_len_past_end(recs, payload):
    r = _rec(recs, "steps")
    old = r["length"]
    r["lengths"][0] = 2**32 - 1
    r["length"] = sum(r["lengths"])
    for q in recs[recs.index(r) + 1 :]:  # keep the tensors back to back
        q["offset"] += r["length"] - old
    return recs, payload


def _short_slice(recs, payload):
    r = _rec(recs, "conv.weight")
    moved = r["lengths"][0] - 1
    r["lengths"][0] = 1
    r["lengths"][1] += moved
    return recs, payload


def _short_table(recs, payload):
    table = b"".join(pack_record(r) for r in recs)
    return recs, payload, dict(table=table[:-40])


def _check_clean_failure(data: bytes, match: str, tmp_path, header_level: bool = True):
    """FormatError (message matching) from decode, and from info/load when the header is bad;
    fast, and without a large allocation."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FormatError, match=match):
            gpucabac.decode(data)
        if header_level:
            with pytest.raises(FormatError, match=match):
                gpucabac.info(data)
        p = tmp_path / "crafted.gcb"
        p.write_bytes(data)
        with pytest.raises(FormatError, match=match):
            gpucabac.load(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 5.0
    assert peak < 32 << 20, f"peak allocation {peak} bytes"


# records the header reader accepts, whose values the decoder must refuse
DECODE_CRAFTED = {
    "raw bool bytes other than 0 and 1": (_set("huge", dcode=DTYPES.index("bool"), shape=[16]), "raw bool payload holds bytes"),
    "levels x step overflow the dtype": (_set("fc.weight", step=3e38), "decoded values overflow bfloat16"),
}


@pytest.mark.parametrize("case", sorted(DECODE_CRAFTED))
def test_crafted_values_raise_format_error(case, sample, tmp_path):
    fn, match = DECODE_CRAFTED[case]
    data = _edit(sample, fn)
    assert data != sample
    gpucabac.info(data)  # a valid header
    _check_clean_failure(data, match, tmp_path, header_level=False)


def test_only_regular_files_are_read(sample, tmp_path):
    fifo = tmp_path / "pipe.gcb"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.gcb"
    loop.symlink_to(loop)
    for path, match in ((fifo, "not a regular file"), (tmp_path, "not a regular file"), (loop, "symbolic links"),
                        (tmp_path / "missing.gcb", "No such file")):
        for call in (gpucabac.info, gpucabac.load):
            with pytest.raises(gpucabac.ModelFileError, match=match):
                call(path)


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_header_raises_format_error(case, sample, tmp_path):
    fn, match = CRAFTED[case]
    data = _edit(sample, fn)
    assert data != sample
    _check_clean_failure(data, match, tmp_path)


def test_crafted_context_count_too_small(sample, tmp_path):
    def fewer(pre, recs, payload):
        r = _rec(recs, "fc.weight")
        r["ctx"] = r["ctx"][:-1]
        return recs, payload
    _check_clean_failure(_edit(sample, fewer), "context initialisations", tmp_path, header_level=False)


def test_crafted_context_count_too_large(sample, tmp_path):
    def more(pre, recs, payload):
        r = _rec(recs, "fc.weight")
        r["ctx"] = r["ctx"] + [0, 0, 0]
        return recs, payload
    _check_clean_failure(_edit(sample, more), "context", tmp_path, header_level=False)


def test_int_levels_outside_the_dtype_raise(tmp_path):
    wide = gpucabac.encode({"i": np.array([[1, -2], [3, 1000]], np.int32)})
    narrow = _edit(wide, _set("i", dcode=DTYPES.index("int8")))
    try:
        out = gpucabac.decode(narrow)
    except FormatError as e:
        assert "i" in str(e)
        return
    raise AssertionError(f"decoded silently to {out['i'].tolist()}")


def test_shape_larger_than_the_coded_levels_fails_in_the_decoder(sample, tmp_path):
    """A consistent header whose shape claims more levels than its one slice codes: the table
    checks pass, the arithmetic decoder must notice (ran past the end / no terminate bin)."""
    one = gpucabac.encode({"w": sample_tensors()["conv.weight"]}, qp=-32, slice_size=None)
    data = _edit(one, _set("w", shape=[4, 3, 2, 4], slice_size=96))
    _check_clean_failure(data, r"tensor 'w', slice 0: .*(ran past|terminate bin|Exp-Golomb)", tmp_path,
                         header_level=False)
    data = _edit(one, _set("w", shape=[4, 3, 2, 1], slice_size=24))  # fewer: bytes left over
    _check_clean_failure(data, r"tensor 'w', slice 0: ", tmp_path, header_level=False)


# --- fuzzing ----------------------------------------------------------------------------------------


def _random_container(rng: np.random.Generator) -> bytes:
    tensors = {}
    for t in range(int(rng.integers(1, 4))):
        kind = rng.choice(["f32", "bf16", "f16", "bias", "int", "bool", "raw", "empty"])
        shape = tuple(int(d) for d in rng.integers(1, 9, int(rng.integers(2, 4))))
        x = rng.standard_normal(shape) * 0.05
        tensors[f"t{t}"] = {
            "f32": x.astype(np.float32), "bf16": x.astype(ml_dtypes.bfloat16), "f16": x.astype(np.float16),
            "bias": x.reshape(-1)[:7].astype(np.float32), "int": (x * 400).astype(np.int16),
            "bool": x > 0, "raw": np.array([2**35, 1, -1], np.int64), "empty": np.zeros((0, 3), np.float32),
        }[kind]
    return gpucabac.encode(tensors, qp=int(rng.integers(-40, -20)), dq=bool(rng.random() < 0.4),
                           slice_size=[1, 7, 16, None][int(rng.integers(4))],
                           num_gt_flags=int(rng.choice([0, 1, 11])))


def _mutate(rng: np.random.Generator, data: bytes, payload_start: int) -> tuple[bytes, bool]:
    """A random corruption; returns (bytes, True when it only changed payload bytes in place)."""
    b = bytearray(data)
    n = len(b)
    kind = int(rng.integers(7))
    in_payload = rng.random() < 0.5 and payload_start < n
    lo = payload_start if in_payload else 0
    hi = n if in_payload else payload_start
    i = int(rng.integers(lo, hi))
    if kind == 0:  # one bit
        b[i] ^= 1 << int(rng.integers(8))
    elif kind == 1:  # a few random bytes
        for j in rng.integers(lo, hi, int(rng.integers(1, 4))):
            b[int(j)] ^= int(rng.integers(1, 256))
    elif kind == 2:  # overwrite a run
        m = min(int(rng.integers(1, 9)), hi - i)
        b[i : i + m] = rng.integers(0, 256, m).astype(np.uint8).tobytes()
    elif kind == 3:  # insert
        b[i:i] = rng.integers(0, 256, int(rng.integers(1, 4))).astype(np.uint8).tobytes()
    elif kind == 4:  # delete
        del b[i : i + int(rng.integers(1, 4))]
    elif kind == 5:  # truncate
        del b[i:]
    else:  # append
        b += rng.integers(0, 256, int(rng.integers(1, 4))).astype(np.uint8).tobytes()
    in_place = kind in (0, 1, 2) and in_payload
    return bytes(b), in_place


def test_fuzz_mutated_containers():
    rng = np.random.default_rng(20240611)
    mutations = identical = 0
    slow = 0.0
    while mutations < 25_000:
        data = _random_container(rng)
        payload_start = 32 + parse_layout(data)[0]["tlen"]
        want = gpucabac.decode(data, threads=1)
        for _ in range(210):
            bad, in_place = _mutate(rng, data, payload_start)
            mutations += 1
            t0 = time.perf_counter()
            if bad == data:
                identical += 1
                out = gpucabac.decode(bad, threads=1)
                assert list(out) == list(want)
                for k in want:
                    assert out[k].tobytes() == want[k].tobytes()
                continue
            with pytest.raises(FormatError) as e:
                gpucabac.decode(bad, threads=1)
            slow = max(slow, time.perf_counter() - t0)
            if in_place and payload_start < len(data):
                assert "checksum" in str(e.value), str(e.value)
    assert mutations >= 25_000
    assert identical < mutations // 20
    assert slow < 2.0, f"a corrupted file took {slow:.2f} s to reject"


def test_fuzz_garbage_slices_with_valid_checksums():
    """Corrupt slice bytes and fix up every checksum: only the arithmetic decoder stands between
    the garbage and the caller. It must raise FormatError naming the slice, or decode something
    of the right shape and dtype (a corrupted arithmetic code can be another valid one)."""
    rng = np.random.default_rng(99)
    rejected = accepted = 0
    for _ in range(40):
        data = _random_container(rng)
        pre, recs, payload = parse_layout(data)
        coded = [r for r in recs if MODES[r["mcode"]] != "raw" and r["nslices"]]
        if not coded:
            continue
        want = gpucabac.decode(data, threads=1)
        for _ in range(60):
            r = coded[int(rng.integers(len(coded)))]
            s = int(rng.integers(r["nslices"]))
            start = r["offset"] + sum(r["lengths"][:s])
            chunk = bytearray(payload[start : start + r["lengths"][s]])
            op = rng.integers(3)
            if op == 0:
                chunk[int(rng.integers(len(chunk)))] ^= 1 << int(rng.integers(8))
            elif op == 1:
                chunk = bytearray(rng.integers(0, 256, len(chunk)).astype(np.uint8).tobytes())
            else:
                chunk[-1] = int(rng.integers(256))
            new_payload = payload[:start] + bytes(chunk) + payload[start + len(chunk) :]
            saved = r["crcs"][s]
            r["crcs"][s] = zlib.crc32(bytes(chunk))
            bad = build(recs, new_payload)
            r["crcs"][s] = saved
            t0 = time.perf_counter()
            try:
                out = gpucabac.decode(bad, threads=1)
            except FormatError as e:
                assert f"tensor {r['name'].decode()!r}, slice {s}:" in str(e), str(e)
                rejected += 1
            else:
                accepted += 1
                for k in want:
                    assert out[k].shape == want[k].shape and out[k].dtype == want[k].dtype
            assert time.perf_counter() - t0 < 2.0
    assert rejected > 500 and rejected > 5 * accepted, (rejected, accepted)


# --- random access -----------------------------------------------------------------------------------


class _RecordingFile(io.RawIOBase):
    """Wraps a real file and records which byte ranges were read."""

    def __init__(self, f, log):
        self.f, self.log = f, log

    def read(self, n=-1):
        pos = self.f.tell()
        data = self.f.read(n)
        self.log.append((pos, pos + len(data)))
        return data

    def readinto(self, b):
        pos = self.f.tell()
        n = self.f.readinto(b)
        self.log.append((pos, pos + (n or 0)))
        return n

    def seek(self, *a):
        return self.f.seek(*a)

    def tell(self):
        return self.f.tell()

    def fileno(self):
        return self.f.fileno()

    def readable(self):
        return True

    def seekable(self):
        return True

    def close(self):
        self.f.close()
        super().close()


def test_load_one_tensor_reads_only_header_and_its_bytes(sample, tmp_path, monkeypatch):
    path = tmp_path / "m.gcb"
    path.write_bytes(sample)
    pre, recs, _ = parse_layout(sample)
    payload_start = 32 + pre["tlen"]
    target = _rec(recs, "fc.weight")
    lo, hi = payload_start + target["offset"], payload_start + target["offset"] + target["length"]
    log: list[tuple[int, int]] = []
    real_open = builtins.open

    def recording_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        if str(file) == str(path):
            return _RecordingFile(f, log)
        return f

    monkeypatch.setattr(builtins, "open", recording_open)
    out = gpucabac.load(path, names=["fc.weight"])
    monkeypatch.undo()
    assert list(out) == ["fc.weight"]
    assert out["fc.weight"].tobytes() == gpucabac.decode(sample)["fc.weight"].tobytes()
    assert log, "load() did not read through the opened file object"
    read = sum(b - a for a, b in log)
    for a, b in log:
        assert b <= payload_start or (lo <= a and b <= hi), f"read [{a}, {b}) outside header and [{lo}, {hi})"
    assert read <= payload_start + (hi - lo)
    assert read < len(sample)


def test_load_one_tensor_ignores_another_tensors_corruption(sample, tmp_path):
    pre, recs, payload = parse_layout(sample)
    payload_start = 32 + pre["tlen"]
    bad = bytearray(sample)
    for name in ("conv.weight", "huge"):
        r = _rec(recs, name)
        bad[payload_start + r["offset"] + r["length"] // 2] ^= 0x5A
    path = tmp_path / "m.gcb"
    path.write_bytes(bytes(bad))
    good = gpucabac.decode(sample)
    for name in ("fc.weight", "fc.bias", "steps"):
        for out in (gpucabac.load(path, names=[name]), gpucabac.decode(bytes(bad), names=name)):
            assert list(out) == [name] and out[name].tobytes() == good[name].tobytes()
    for name in ("conv.weight", "huge"):
        with pytest.raises(FormatError, match="checksum"):
            gpucabac.load(path, names=[name])
    with pytest.raises(FormatError, match="checksum"):
        gpucabac.load(path)
    with pytest.raises(gpucabac.TensorNotFoundError, match="nope"):
        gpucabac.load(path, names=["nope"])
    with pytest.raises(gpucabac.TensorNotFoundError, match="nope"):
        gpucabac.decode(sample, names=["fc.weight", "nope"])


def test_context_count_matches_used_contexts(sample, sample_dq):
    for data in (sample, sample_dq):
        for r in parse_layout(data)[1]:
            if MODES[r["mcode"]] in ("urq", "dq", "int"):
                assert r["nctx"] == len(used_contexts(r["ngt"], MODES[r["mcode"]] == "dq"))
                assert max(r["ctx"]) < NUM_PRESETS


@pytest.mark.parametrize("dq", [False, True])
def test_the_levels_per_byte_bound_admits_the_sparsest_valid_streams(dq):
    """container.MAX_LEVELS_PER_BYTE rejects absurd shapes of sig-flag slices; the densest valid
    ones (long runs of zeros, the estimator saturated) must stay well inside it. Zero-run slices
    are exempt: a run of r zeros costs O(log r) bits, and such files are read."""
    zeros = {"z": np.zeros((2048, 1024), np.float32)}
    for slice_size in (None, 8192, 7):
        data = gpucabac.encode(zeros, dq=dq, slice_size=slice_size, zeros="flags")
        meta = gpucabac.info(data).tensors[0]
        assert meta.zeros == "flags"
        assert meta.numel / meta.coded_bytes < 0.85 * container.MAX_LEVELS_PER_BYTE
        assert np.array_equal(gpucabac.decode(data)["z"], zeros["z"])
    data = gpucabac.encode(zeros, dq=dq, slice_size=None, zeros="runs")
    meta = gpucabac.info(data).tensors[0]
    assert meta.zeros == "runs" and meta.numel / meta.coded_bytes > 100 * container.MAX_LEVELS_PER_BYTE
    assert np.array_equal(gpucabac.decode(data)["z"], zeros["z"])


def test_write_joins_a_list_of_payloads_once(sample):
    """container.write takes the records' payloads as one buffer or as a list of them (what
    encode passes, joined once into the result): the same bytes either way."""
    header = container.parse_container(sample)
    area = np.frombuffer(sample, np.uint8)[header.payload_start :]
    pieces = [area[r.offset : r.offset + r.payload_length] for r in header.records]
    assert container.write(header.records, pieces) == sample
    assert container.write(header.records, tuple(pieces)) == sample
    assert container.write(header.records, [bytes(p) for p in pieces]) == sample
    assert container.write(header.records, [memoryview(bytes(p)) for p in pieces]) == sample
    assert container.write(header.records, area) == sample
    assert container.write(header.records, area.tobytes()) == sample
    assert container.write([], []) == container.write([], b"")
