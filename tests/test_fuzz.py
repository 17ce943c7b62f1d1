"""Fuzz and regression corpus for untrusted input: every case raises gpucabac's own error
(FormatError / InputError / ModelFileError, all GpucabacError) with a clear message; never a crash,
a hang, a huge allocation, a bare MemoryError/OSError/ValueError/TypeError/UnicodeError, a
warning, or silently wrong output.

Cases of the issue that other test files already cover (not repeated here):
  - valid all-zero stream of a huge tensor: the limit itself is tested by
    tests/test_roundtrip.py::test_decode_refuses_outputs_above_the_limit_before_allocating (small
    data, decode only); the "before allocating" part, under RLIMIT_AS, and load() are tested here
  - raw bool record with bytes other than 0/1, bfloat16 level x step overflow:
    tests/test_container.py::test_crafted_values_raise_format_error (one payload, bfloat16);
    every byte 2..255 and the float16 overflow, with warnings as errors, are tested here
  - model writers refuse {"x.npy", "x"} in .npz, NUL names, "__metadata__" in .safetensors:
    tests/test_io.py::test_names_a_format_cannot_store_are_refused; that the error names the
    tensor, and .pt/.pth, are tested here
  - FIFO / directory / symlink loop given to gpucabac.info and gpucabac.load -> ModelFileError
    (in process): tests/test_container.py::test_only_regular_files_are_read; the same in a
    subprocess under a timeout, and the CLI `gpucabac info` / `gpucabac decode`, are tested here
  - read_model with a file name too long for the file system:
    tests/test_io.py::test_a_name_too_long_for_the_file_system_is_a_model_file_error
    (info/load with a 256-byte name are tested here)
  - gpucabac.encode({"\\ud800": x}) -> InputError:
    tests/test_roundtrip.py::test_names_that_cannot_be_stored_are_input_errors
  - decode(data, dtype="int8") on a float tensor -> InputError:
    tests/test_engines.py::test_every_output_dtype (every engine)
  - a forked child decoding after the parent encoded and decoded:
    tests/test_threads.py::test_a_fork_after_use_works
  - every truncation / every bit flip of one sample container without checksum fix-ups, random
    mutations, garbage slices with fixed-up slice CRCs on random containers:
    tests/test_container.py::test_every_truncation_raises, ::test_every_bit_flip_raises,
    ::test_fuzz_mutated_containers, ::test_fuzz_garbage_slices_with_valid_checksums

New here: the two allocation cases in a child process under RLIMIT_AS, the zero-element shape
with a huge dimension, coded modes on integer and bool dtypes, the padding nibble, bogus decode
dtypes, and a systematic mutation fuzz of small containers of every mode in which the table CRC
and the slice CRCs are recomputed after each change (so the field validation, not a checksum,
must catch it): decode then raises a GpucabacError or returns exactly the header's tensors, shapes
and dtypes, without a warning.

The layout is read and written by a small independent implementation of docs/format.md below (no
gpucabac.container), lenient so that it can locate the checksums of a mutated file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zlib

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import gpucabac
from gpucabac import FormatError, GpucabacError, InputError, ModelFileError
from gpucabac import io as gio

# --- docs/format.md, independently -------------------------------------------------------------

PRE = struct.Struct("<8sHHIQII")  # magic, version, flags, count, table length, table crc, reserved
MAGIC = b"\x89GCB\r\n\x1a\n"
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
               "uint16", "uint32", "uint64")  # §3, by code
MODE_NAMES = ("urq", "dq", "int", "raw", "dq16", "dq32", "dq64", "dq128", "dq256")  # §3, by code
RAW = 3
FLOAT_NAMES = DTYPE_NAMES[:4]
BF16 = np.dtype(ml_dtypes.bfloat16)


@dataclasses.dataclass
class Rec:
    name: bytes
    dcode: int
    mcode: int  # the whole mode byte (bit 7: column scan)
    ngt: int
    shape: list
    step: float
    slice_size: int
    ctx: bytes | None  # the packed nibbles (None for raw)
    nctx: int | None
    offset: int
    length: int
    lengths: list
    crcs: list
    crc_pos: int = 0  # where the slice CRCs lie in the table

    def pack(self) -> bytes:
        out = [struct.pack("<H", len(self.name)), self.name,
               struct.pack("<BBBB", self.dcode, self.mcode, len(self.shape), self.ngt),
               struct.pack(f"<{len(self.shape)}Q", *self.shape),
               struct.pack("<fII", self.step, self.slice_size, len(self.lengths))]
        if self.ctx is not None:
            out += [struct.pack("<B", self.nctx), self.ctx]
        out += [struct.pack("<QQ", self.offset, self.length), struct.pack(f"<{len(self.lengths)}I", *self.lengths),
                struct.pack(f"<{len(self.crcs)}I", *self.crcs)]
        return b"".join(out)


def parse_table(table: bytes, count: int, version: int) -> tuple[list[Rec], bool]:
    """The records that fit in `table` (at most `count`), and whether exactly `count` records
    filled it exactly. No field is validated."""
    pos = 0
    recs: list[Rec] = []

    def take(fmt):
        nonlocal pos
        size = struct.calcsize("<" + fmt)
        if pos + size > len(table):
            raise IndexError
        v = struct.unpack_from("<" + fmt, table, pos)
        pos += size
        return v

    try:
        for _ in range(count):
            (nlen,) = take("H")
            name = bytes(take(f"{nlen}s")[0])
            dcode, mcode, ndim, ngt = take("BBBB")
            shape = list(take(f"{ndim}Q"))
            step, slice_size, nslices = take("fII")
            if 4 * nslices > len(table):
                raise IndexError
            ctx = nctx = None
            if (mcode & 0x7F if version >= 2 else mcode) != RAW:
                (nctx,) = take("B")
                ctx = bytes(take(f"{(nctx + 1) // 2}s")[0])
            offset, length = take("QQ")
            lengths = list(take(f"{nslices}I"))
            crc_pos = pos
            crcs = list(take(f"{nslices}I"))
            recs.append(Rec(name, dcode, mcode, ngt, shape, step, slice_size, ctx, nctx, offset, length, lengths,
                            crcs, crc_pos))
    except IndexError:
        return recs, False
    return recs, len(recs) == count and pos == len(table)


def layout(data: bytes):
    """(preamble fields, records, payload) of a well-formed container (asserted)."""
    magic, version, flags, count, tlen, tcrc, reserved = PRE.unpack_from(data)
    recs, exact = parse_table(data[PRE.size : PRE.size + tlen], count, version)
    assert exact
    return dict(version=version, count=count, tlen=tlen), recs, data[PRE.size + tlen :]


def build(recs: list[Rec], payload: bytes, version: int = 1) -> bytes:
    table = b"".join(r.pack() for r in recs)
    return PRE.pack(MAGIC, version, 0, len(recs), len(table), zlib.crc32(table), 0) + table + payload


def fix_checksums(data: bytes) -> bytes:
    """The table CRC, and every slice CRC of the records the (possibly mutated) table still
    describes whose bytes lie inside the file, recomputed: only field validation can then catch a
    change."""
    if len(data) < PRE.size:
        return data
    b = bytearray(data)
    _, version, _, count, tlen, _, _ = PRE.unpack_from(b)
    if PRE.size + tlen > len(b):
        return data
    recs, _ = parse_table(bytes(b[PRE.size : PRE.size + tlen]), count, version)
    payload_start = PRE.size + tlen
    for r in recs:
        pos = payload_start + r.offset
        for s, n in enumerate(r.lengths):
            if pos + n <= len(b):
                struct.pack_into("<I", b, PRE.size + r.crc_pos + 4 * s, zlib.crc32(b[pos : pos + n]))
            pos += n
    struct.pack_into("<I", b, 24, zlib.crc32(b[PRE.size : PRE.size + tlen]))
    return bytes(b)


def header_tensors(data: bytes) -> dict:
    """name -> (shape, dtype name) as the header of a container says."""
    _, recs, _ = layout(data)
    return {r.name.decode(): (tuple(r.shape), DTYPE_NAMES[r.dcode]) for r in recs}


def dtype_of(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype == BF16 else a.dtype.name


# --- checking one decode ---------------------------------------------------------------------------

SLOW_S = 2.0


def checked_decode(data: bytes, what: str, dtype: str | None = None, **kw):
    """decode(data) under warnings-as-errors: the GpucabacError it raised, or its output after
    checking that it is exactly the header's tensors, shapes and dtypes (and that info agrees)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            out = gpucabac.decode(data, threads=1, dtype=dtype, **kw)
        except GpucabacError as e:
            err = e
        except Exception as e:
            pytest.fail(f"{what}: decode raised {type(e).__name__}: {e}")
        else:
            err = None
            try:
                meta = gpucabac.info(data)
            except Exception as e:
                pytest.fail(f"{what}: decode accepted a container info rejects ({type(e).__name__}: {e})")
    took = time.perf_counter() - t0
    assert took < SLOW_S, f"{what}: took {took:.2f} s"
    if err is not None:
        assert str(err), f"{what}: {type(err).__name__} without a message"
        return err
    header = header_tensors(data)
    assert {t.name: (t.shape, t.dtype) for t in meta.tensors} == header, what
    want = {k: (shape, dtype if dtype and dt in FLOAT_NAMES else dt) for k, (shape, dt) in header.items()}
    got = {k: (tuple(v.shape), dtype_of(v)) for k, v in out.items()}
    assert list(got) == list(want) and got == want, f"{what}: decoded {got}, the header says {want}"
    return out


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    """Decode once outside the timed checks: numba compiles (or loads its cache) on first use."""
    x = {"w": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), "i": np.arange(9, dtype=np.int16)}
    for dq in (False, True, 64):
        gpucabac.decode(gpucabac.encode(x, dq=dq, slice_size=16), threads=1)


# --- small valid containers of every kind ------------------------------------------------------------

def _small_containers() -> dict[str, bytes]:
    rng = np.random.default_rng(5)

    def normal(shape, scale=0.05, dtype=np.float32):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    return {
        "urq": gpucabac.encode({"w": normal((6, 10))}, qp=-32, slice_size=16),
        "dq": gpucabac.encode({"w": normal((5, 7))}, qp=-30, dq=True, slice_size=8, num_gt_flags=1),
        "int": gpucabac.encode({"i": rng.integers(-300, 300, 9).astype(np.int16), "m": rng.random((4, 3)) < 0.4},
                               slice_size=5, num_gt_flags=3),
        "raw": gpucabac.encode({"big": np.array([2**40, -5, 3], np.int64), "b": normal(5, 0.01)},
                               small_step="lossless"),
        "bf16": gpucabac.encode({"w": normal((4, 6), dtype=BF16), "h": normal((3, 3), 0.1, np.float16)},
                                qp=-34, slice_size=None),
        "multi": gpucabac.encode({"conv": normal((4, 3, 2, 2)), "i8": np.arange(-6, 6, dtype=np.int8).reshape(3, 4),
                                  "empty": np.zeros((0, 3), np.float32), "s": np.array(0.25, np.float32),
                                  "u": np.array([7, 0, 65535], np.uint16)},
                                 qp=-30, dq=64, slice_size=7, scan="columns", num_gt_flags=0),
        # format version 3: zero runs, one tensor ending in zeros and one in a non-zero level
        "runs": gpucabac.encode({"w": np.where(rng.random((6, 40)) < 0.1, normal((6, 40)), 0).astype(np.float32),
                                 "i": np.r_[np.zeros(30), [3, 0, -2]].astype(np.int32)},
                                qp=-32, dq=True, slice_size=16, zeros="runs"),
    }


@pytest.fixture(scope="module")
def small() -> dict[str, bytes]:
    out = _small_containers()
    for name, data in out.items():  # the corpus is valid, and the independent layout reads it back
        _, recs, payload = layout(data)
        assert build(recs, payload, version=PRE.unpack_from(data)[1]) == data, name
        assert fix_checksums(data) == data, name
        assert isinstance(checked_decode(data, name), dict), name
    modes = {MODE_NAMES[r.mcode & 0x3F] for d in out.values() for r in layout(d)[1]}
    assert {"urq", "dq", "int", "raw", "dq64"} <= modes
    assert any(r.mcode & 0x40 for r in layout(out["runs"])[1])  # zero runs (format version 3)
    return out


# --- the systematic mutation fuzz --------------------------------------------------------------------

def _header_values(b: int, rng: np.random.Generator) -> list[int]:
    vals = {b ^ 1, b ^ 2, b ^ 0x10, b ^ 0x40, b ^ 0x80, b ^ 0xFF, 0, 1, 0x7F, 0xFF, (b + 1) & 0xFF, (b - 1) & 0xFF,
            *rng.integers(0, 256, 4).tolist()}
    vals.discard(b)
    return sorted(vals)


def test_every_header_byte_change_with_checksums_fixed(small, tmp_path):
    """Every byte of the preamble and tensor table of every small container, set to a dozen or so
    other values, then every checksum recomputed. Every 5th such file is also given to load() and
    info() as a file, which read the header their own way: they must agree with decode."""
    rng = np.random.default_rng(1234)
    path = tmp_path / "m.gcb"
    total = by_checksum = identical = 0
    for kind, data in small.items():
        want = gpucabac.decode(data, threads=1)
        payload_start = PRE.size + layout(data)[0]["tlen"]
        for i in range(payload_start):
            for v in _header_values(data[i], rng):
                bad = bytearray(data)
                bad[i] = v
                bad = fix_checksums(bytes(bad))
                total += 1
                what = f"{kind}: byte {i} {data[i]:#04x} -> {v:#04x}"
                out = checked_decode(bad, what)
                if total % 5 == 0:
                    path.write_bytes(bad)
                    _agrees_from_file(path, out, what)
                if isinstance(out, GpucabacError):
                    by_checksum += "checksum" in str(out)
                    continue
                identical += bad == data
                if bad == data:  # the change was to a checksum, and fixing it undid the change
                    assert all(out[k].tobytes() == want[k].tobytes() for k in want), (kind, i, v)
    assert total > 10000
    # the fix-ups work: field validation, not a checksum, rejects nearly all of them
    assert by_checksum < 0.05 * total, (by_checksum, total)
    assert 0 < identical < 0.25 * total, (identical, total)  # (changes to a checksum byte)


def _agrees_from_file(path, out, what):
    """load(path) and info(path) accept the file exactly when decode did, with the same tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            got = gpucabac.load(path, threads=1)
            meta = gpucabac.info(path)
        except GpucabacError as e:
            assert isinstance(out, GpucabacError), f"{what}: decode accepted, load/info raised {e}"
            return
        except Exception as e:
            pytest.fail(f"{what}: load/info raised {type(e).__name__}: {e}")
    assert not isinstance(out, GpucabacError), f"{what}: decode raised {out}, load and info accepted"
    assert list(got) == list(out) and [t.name for t in meta.tensors] == list(out), what
    assert all(got[k].tobytes() == out[k].tobytes() and got[k].shape == out[k].shape for k in out), what


def test_every_truncation_of_every_kind(small):
    for kind, data in small.items():
        for n in range(len(data)):
            err = checked_decode(data[:n], f"{kind}[:{n}]")
            assert isinstance(err, FormatError), f"{kind}[:{n}] decoded"
            # a truncation with every checksum fixed is still not a valid file (the length is exact)
            err = checked_decode(fix_checksums(data[:n]), f"{kind}[:{n}] fixed")
            assert isinstance(err, FormatError), f"{kind}[:{n}] with fixed checksums decoded"


def test_payload_byte_flips_with_slice_checksums_fixed(small):
    rng = np.random.default_rng(77)
    rejected = accepted = 0
    for kind, data in small.items():
        payload_start = PRE.size + layout(data)[0]["tlen"]
        if payload_start == len(data):
            continue
        for _ in range(600):
            bad = bytearray(data)
            for j in rng.integers(payload_start, len(data), int(rng.integers(1, 4))):
                bad[int(j)] ^= int(rng.integers(1, 256))
            bad = fix_checksums(bytes(bad))
            out = checked_decode(bad, f"{kind}: payload flips")
            if isinstance(out, GpucabacError):
                assert isinstance(out, FormatError) and "checksum" not in str(out), str(out)
                rejected += 1
            else:
                accepted += 1
    assert rejected > accepted > 0, (rejected, accepted)


# --- allocation bounds, in a child process under RLIMIT_AS --------------------------------------------

ZERO_SLICE = 8192
ZERO_NUMEL = 1 << 28  # float32: 1 GiB of output


def _zero_stream(numel: int) -> bytes:
    """A valid container of one all-zero float32 tensor of `numel` values, built from one coded
    slice of zeros repeated (all such slices are the same bytes)."""
    four = gpucabac.encode({"z": np.zeros(4 * ZERO_SLICE, np.float32)}, slice_size=ZERO_SLICE, zeros="flags")
    _, (r,), payload = layout(four)
    assert len(set(r.crcs)) == 1 and payload == payload[: r.lengths[0]] * 4
    n = numel // ZERO_SLICE
    rec = dataclasses.replace(r, shape=[numel], lengths=[r.lengths[0]] * n, crcs=[r.crcs[0]] * n,
                              length=r.lengths[0] * n)
    return build([rec], payload[: r.lengths[0]] * n)


def _garbage_stream(dtype: str, mode: str, seed: int = 3) -> bytes:
    """1 MiB of random slice bytes (valid checksums) whose header claims the reader's maximum of
    1024 levels per byte (docs/format.md §5): 2**30 values."""
    t = np.arange(6, dtype=np.int8) if mode == "int" else np.linspace(-1, 1, 6, dtype=dtype)
    small_one = gpucabac.encode({"t": t.reshape(2, 3)}, slice_size=None, num_gt_flags=1)
    _, (r,), _ = layout(small_one)
    assert MODE_NAMES[r.mcode] == mode
    rng = np.random.default_rng(seed)
    n, length = 1024, 1024
    slices = [rng.integers(0, 256, length, dtype=np.uint8).tobytes() for _ in range(n)]
    rec = dataclasses.replace(r, dcode=DTYPE_NAMES.index(dtype), shape=[1024 * length * n], slice_size=1024 * length,
                              lengths=[length] * n, crcs=[zlib.crc32(s) for s in slices], length=length * n)
    return build([rec], b"".join(slices))


CHILD = textwrap.dedent("""
    import json, re, resource, sys
    import numpy as np, gpucabac

    def vm():
        return int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) << 10

    def report(case, fn):
        try:
            fn()
            out = [None, ""]
        except BaseException as e:
            out = [type(e).__name__, str(e)[:300]]
        print(json.dumps([case, out]), flush=True)

    # warm up (JIT, thread pool) before the limit, then allow ~768 MiB more address space
    gpucabac.decode(gpucabac.encode({"w": np.linspace(-1, 1, 4096, dtype=np.float32).reshape(64, 64)}, slice_size=64))
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = vm() + (768 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    report("sanity: 1 GiB np.empty", lambda: np.empty(1 << 30, np.uint8))
    cases = json.loads(sys.argv[1])
    for case, (call, path, kw) in cases.items():
        if call == "decode":
            data = open(path, "rb").read()
            report(case, lambda: gpucabac.decode(data, **kw))
        else:
            report(case, lambda: gpucabac.load(path, **kw))
""")

LIMIT = 256 << 20
CHILD_CASES = {
    "zeros decode": ("decode", "zeros", dict(max_output_bytes=LIMIT)),
    "zeros decode names": ("decode", "zeros", dict(names=["z"], max_output_bytes=LIMIT)),
    "zeros load": ("load", "zeros", dict(max_output_bytes=LIMIT)),
    "zeros decode as float16": ("decode", "zeros", dict(dtype="float16", max_output_bytes=LIMIT)),
    "garbage float16 urq": ("decode", "garbage-f16", {}),
    "garbage int8 int": ("decode", "garbage-i8", {}),
    "garbage float16 urq load": ("load", "garbage-f16", {}),
}


@pytest.fixture(scope="module")
def rlimit_results(tmp_path_factory):
    """Run every CHILD_CASES call in one child process under RLIMIT_AS: {case: [exception type
    name or None, message]}."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS and /proc/self/status are Linux's")
    d = tmp_path_factory.mktemp("rlimit")
    files = {"zeros": _zero_stream(ZERO_NUMEL), "garbage-f16": _garbage_stream("float16", "urq"),
             "garbage-i8": _garbage_stream("int8", "int")}
    for name, data in files.items():
        (d / f"{name}.gcb").write_bytes(data)
    cases = {case: (call, str(d / f"{f}.gcb"), kw) for case, (call, f, kw) in CHILD_CASES.items()}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True, timeout=300)
    results = dict(json.loads(line) for line in r.stdout.splitlines() if line.startswith("["))
    results["__stderr__"] = r.stderr[-2000:]
    results["__rc__"] = r.returncode
    return results


def _child(results, case):
    assert case in results, f"the child did not report {case!r} (exit {results['__rc__']}): {results['__stderr__']}"
    assert results["sanity: 1 GiB np.empty"][0] == "MemoryError", "the address-space limit does not bite"
    return results[case]


def test_the_huge_zero_stream_is_valid_and_small():
    data = _zero_stream(ZERO_NUMEL)
    assert len(data) < 1 << 20  # a few hundred KB for 1 GiB of output
    (t,) = gpucabac.info(data).tensors
    assert t.shape == (ZERO_NUMEL,) and t.dtype == "float32"
    few = _zero_stream(64 * ZERO_SLICE)  # the same construction, small enough to decode here
    out = checked_decode(few, "64 zero slices")
    assert out["z"].shape == (64 * ZERO_SLICE,) and not out["z"].any()


@pytest.mark.parametrize("case", [c for c in CHILD_CASES if c.startswith("zeros")])
def test_max_output_bytes_refuses_before_allocating(rlimit_results, case):
    kind, message = _child(rlimit_results, case)
    assert kind == "InputError" and "max_output_bytes" in message, (kind, message)


@pytest.mark.parametrize("case", [c for c in CHILD_CASES if c.startswith("garbage")])
def test_garbage_slices_at_the_levels_per_byte_bound_fail_without_a_huge_allocation(rlimit_results, case):
    """The CPU engine allocates a tensor's output only after its first batch of slices decoded."""
    kind, message = _child(rlimit_results, case)
    assert kind == "FormatError" and "slice" in message, (kind, message)


def test_the_garbage_stream_passes_the_header_checks():
    """The allocation test above is about the decoder: the header itself is acceptable."""
    for dtype, mode in (("float16", "urq"), ("int8", "int")):
        data = _garbage_stream(dtype, mode)
        assert len(data) < (1 << 20) + (16 << 10)
        (t,) = gpucabac.info(data).tensors
        assert t.numel == 1 << 30 and t.coded_bytes == 1 << 20 and t.dtype == dtype


# --- crafted headers -------------------------------------------------------------------------------

def _one(data: bytes, **fields) -> bytes:
    """The first record of `data` with some fields replaced (table CRC recomputed)."""
    pre, recs, payload = layout(data)
    recs[0] = dataclasses.replace(recs[0], **fields)
    return build(recs, payload, version=pre["version"])


def _header_rejected(data: bytes, match: str, tmp_path):
    for call in (gpucabac.info, lambda d: gpucabac.decode(d, threads=1)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(FormatError, match=match):
                call(data)
    path = tmp_path / "crafted.gcb"
    path.write_bytes(data)
    for call in (gpucabac.info, gpucabac.load):
        with pytest.raises(FormatError, match=match):
            call(path)


@pytest.mark.parametrize("shape", [(0, 2**63), (2**63, 0), (0, 2**64 - 1), (0, 3, 2**40 + 1), (2**41, 0, 0)], ids=str)
def test_zero_element_shape_with_a_huge_dimension(shape, tmp_path):
    empty = gpucabac.encode({"z": np.zeros((0, 3), np.float32)})
    assert layout(empty)[1][0].lengths == []
    _header_rejected(_one(empty, shape=list(shape)), rf"tensor 'z': dimension {max(shape)} .*exceeds", tmp_path)


@pytest.mark.parametrize("mode", ["urq", "dq", "dq16", "dq256"])
@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"])
def test_coded_float_modes_on_integer_and_bool_tensors(dtype, mode, tmp_path):
    x = np.arange(6).reshape(2, 3) % 2 if dtype == "bool" else np.arange(-2, 4).reshape(2, 3) % 100
    data = gpucabac.encode({"i": x.astype(dtype)}, slice_size=4)
    r = layout(data)[1][0]
    assert MODE_NAMES[r.mcode] == "int"
    nctx = 2 * r.ngt + (58 if mode != "urq" else 37)  # docs/format.md §4.2: the contexts the mode uses
    bad = _one(data, mcode=MODE_NAMES.index(mode), nctx=nctx, ctx=bytes((nctx + 1) // 2))
    version = 2 if MODE_NAMES.index(mode) >= 4 else 1
    bad = bad[:8] + struct.pack("<H", version) + bad[10:]
    _header_rejected(bad, rf"tensor 'i': coding mode {mode} for a {dtype} tensor", tmp_path)


@pytest.mark.parametrize("kind", ["urq", "int"])
def test_a_non_zero_padding_nibble(kind, small, tmp_path):
    data = small[kind]
    r = layout(data)[1][0]
    assert r.nctx % 2 == 1  # urq and int use an odd number of contexts: the last byte has a padding nibble
    for nib in range(1, 16):
        bad = _one(data, ctx=r.ctx[:-1] + bytes([r.ctx[-1] | nib << 4]))
        _header_rejected(bad, "padding nibble", tmp_path)


# --- crafted values -------------------------------------------------------------------------------

def _raw_bool(values: bytes) -> bytes:
    n = len(values)
    rec = Rec(b"mask", DTYPE_NAMES.index("bool"), RAW, 0, [n], 0.0, 0, None, None, 0, n, [n], [zlib.crc32(values)])
    return build([rec], values)


def test_raw_bool_bytes_other_than_0_and_1(tmp_path):
    ok = checked_decode(_raw_bool(bytes([0, 1, 1, 0])), "raw bool 0/1")
    assert ok["mask"].tolist() == [False, True, True, False]
    for v in range(2, 256):
        data = _raw_bool(bytes([0, 1, v, 1]))
        err = checked_decode(data, f"raw bool byte {v}")
        assert isinstance(err, FormatError) and "'mask'" in str(err) and "bool" in str(err), (v, err)
    path = tmp_path / "b.gcb"
    path.write_bytes(_raw_bool(bytes([2])))
    with pytest.raises(FormatError, match="bool"):
        gpucabac.load(path)


@pytest.mark.parametrize("dtype", [None, "float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("step", [3e4, 1e5, 3e38])
def test_float16_values_that_overflow_are_an_error(dtype, step):
    x = {"w": (np.arange(12).reshape(3, 4) * 0.01).astype(np.float16)}
    data = gpucabac.encode(x, step=0.01, slice_size=5)
    assert layout(data)[1][0].dcode == DTYPE_NAMES.index("float16")
    fine = checked_decode(_one(data, step=1000.0), "step 1000", dtype=dtype)  # 11 x 1000 fits float16
    assert np.isfinite(fine["w"].astype(np.float64)).all()
    err = checked_decode(_one(data, step=step), f"step {step}", dtype=dtype)
    assert isinstance(err, FormatError) and "'w'" in str(err) and "overflow" in str(err), err


# --- bad arguments ----------------------------------------------------------------------------------

def _float_container():
    return gpucabac.encode({"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)})


def _int_container():
    return gpucabac.encode({"i": np.arange(5, dtype=np.int16)})


@pytest.mark.parametrize("make, dtype", [
    (_float_container, "nonsense"),
    (_float_container, "complex64"),
    (_int_container, "nonsense"),  # checked even when no tensor is a float one
    (_float_container, 3),
    (_float_container, object()),
], ids=["float-nonsense", "float-complex64", "int-only-nonsense", "float-3", "float-object"])
def test_decode_with_a_bogus_dtype_is_an_input_error(make, dtype):
    data = make()
    with pytest.raises(InputError, match="dtype"):
        gpucabac.decode(data, dtype=dtype)


# --- model writers name the tensor they refuse ------------------------------------------------------

@pytest.mark.parametrize("ext, names, bad", [
    (".npz", ["x.npy", "x"], "x.npy"),
    (".npz", ["x", "x.npy"], "x.npy"),
    (".npz", ["ok", "a\0b"], "a\0b"),
    (".safetensors", ["ok", "a\0b"], "a\0b"),
    (".safetensors", ["ok", "__metadata__"], "__metadata__"),
    (".pt", ["ok", "a\0b"], "a\0b"),
    (".pth", ["ok", "a\0b"], "a\0b"),
])
def test_model_writers_name_the_tensor_they_cannot_store(tmp_path, ext, names, bad):
    if ext in (".pt", ".pth"):
        pytest.importorskip("torch", reason="the .pt/.pth format needs the gpucabac[torch] extra")
    tensors = {n: np.full(3, i, np.float32) for i, n in enumerate(names)}
    with pytest.raises((InputError, ModelFileError)) as e:
        gio.write_model(tmp_path / f"m{ext}", tensors)
    assert repr(bad) in str(e.value), str(e.value)
    assert not list(tmp_path.iterdir())


# --- files that are not regular files ------------------------------------------------------------------

API_ON_PATHS = textwrap.dedent("""
    import json, sys, gpucabac
    out = {}
    for path in sys.argv[1:]:
        for call in ("info", "load"):
            try:
                getattr(gpucabac, call)(path)
                out[f"{call} {path}"] = [None, ""]
            except BaseException as e:
                out[f"{call} {path}"] = [type(e).__name__, str(e)]
    print(json.dumps(out))
""")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_fails_at_once_in_the_api_and_the_cli(tmp_path):
    fifo = tmp_path / "pipe.gcb"
    os.mkfifo(fifo)
    out = tmp_path / "out.npz"
    commands = {"api": [sys.executable, "-c", API_ON_PATHS, str(fifo)],
                "cli info": [sys.executable, "-m", "gpucabac", "info", str(fifo)],
                "cli decode": [sys.executable, "-m", "gpucabac", "decode", str(fifo), "-o", str(out)]}
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, c in commands.items()}
    results = {}
    try:
        for k, p in procs.items():
            try:
                stdout, stderr = p.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{k} on a FIFO hangs")
            results[k] = (p.returncode, stdout, stderr)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    rc, stdout, stderr = results["api"]
    assert rc == 0, stderr
    for call, (kind, message) in json.loads(stdout).items():
        assert kind == "ModelFileError" and "not a regular file" in message, (call, kind, message)
    for k in ("cli info", "cli decode"):
        rc, stdout, stderr = results[k]
        assert rc == 1 and stderr.startswith("gpucabac: error: ") and "not a regular file" in stderr, (k, rc, stderr)
        assert "Traceback" not in stderr
    assert not out.exists()


def test_the_cli_on_a_directory_or_a_symlink_loop(tmp_path):
    from gpucabac import cli

    loop = tmp_path / "loop.gcb"
    loop.symlink_to(loop)
    folder = tmp_path / "d.gcb"
    folder.mkdir()
    # a loop: the library's ModelFileError, status 1; a folder: click's usage error, status 2
    for path, code, message in ((loop, 1, "symbolic links"), (folder, 2, "is a directory")):
        for args in (["info", path], ["decode", path, "-o", tmp_path / "o.npz"]):
            r = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
            assert r.exit_code == code and message in r.stderr, (args, r.exit_code, r.output)
            assert "Traceback" not in r.output
            if code == 1:
                assert r.stderr.startswith("gpucabac: error: "), r.stderr
    assert not (tmp_path / "o.npz").exists()


def test_info_and_load_with_a_256_byte_file_name(tmp_path):
    path = tmp_path / ("n" * 252 + ".gcb")
    assert len(path.name.encode()) == 256
    for call in (gpucabac.info, gpucabac.load):
        with pytest.raises(ModelFileError, match="too long"):
            call(path)
        with pytest.raises(ModelFileError):
            call(str(path))

