"""The engine contract (gpucabac/engines/base.py), one suite over every engine.

Engines: "cpu" (numba), "shim" (the GPU engine's orchestration on the CUDA kernels' code compiled
for the CPU by g++, tests/shim.py) and "gpu" (the real CUDA engine; skipped without a GPU). Every
test compares an engine's bytes and values with `==` against what the format fixes: the golden
files, the CPU engine's output, and the errors the CPU engine raises. The same file runs on a GPU
machine unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_dtypes
import numpy as np
import pytest

import gpucabac
from gpucabac import container, slices
from gpucabac.engines import Engine, EncodeJob, SliceTable, TensorOutput, available_engines, get_engine
from gpucabac.errors import FormatError, GpuUnavailableError, InputError

from test_engine import to_dq_levels
from test_golden import CASES, HERE, make_golden

BF16 = np.dtype(ml_dtypes.bfloat16)
ENGINE_NAMES = ["cpu", "shim", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=ENGINE_NAMES)
def engine(request) -> Engine:
    if request.param == "cpu":
        return get_engine("cpu")
    if request.param == "shim":
        from shim import ShimKernels  # noqa: PLC0415
        from gpucabac.engines.gpu import GpuEngine  # noqa: PLC0415

        return GpuEngine(ShimKernels(request.getfixturevalue("shim")))
    return get_engine("gpu")


def host(engine: Engine, tensors: dict) -> dict:
    return {k: engine.to_host(v) for k, v in tensors.items()}


def same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), what


def golden_inputs(e: dict) -> dict:
    case = dict(seed=e["seed"], params=e["params"],
                tensors=[(t["name"], t["dtype"], t["shape"], t["kind"], t["scale_bits"]) for t in e["tensors"]])
    return make_golden.case_inputs(case)


# --- registry ------------------------------------------------------------------------------------

def test_registry():
    assert available_engines()[0] == "cpu"
    assert isinstance(get_engine("cpu"), Engine) and get_engine("cpu").name == "cpu"
    with pytest.raises(InputError, match="device must be one of 'cpu', 'gpu', 'auto'"):
        get_engine("cuda")
    with pytest.raises(InputError, match="or an engine"):
        get_engine(3)
    if "gpu" not in available_engines():
        with pytest.raises(GpuUnavailableError):
            get_engine("gpu")
        assert get_engine("auto").name == "cpu"


def test_engines_import_nothing_of_each_other():
    src = pathlib.Path(gpucabac.__file__).parent / "engines"
    cpu, gpu = (src / "cpu.py").read_text(), (src / "gpu.py").read_text()
    assert "from .gpu" not in cpu and "engines.gpu" not in cpu and "import gpu" not in cpu
    assert "from .cpu" not in gpu and "engines.cpu" not in gpu and "import cpu" not in gpu


# --- golden files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("file", sorted(CASES))
def test_golden_files(engine, file, tmp_path):
    e = CASES[file]
    inputs = golden_inputs(e)
    stored = (HERE / "data" / file).read_bytes()
    assert gpucabac.encode(inputs, **e["params"], device=engine) == stored
    path = tmp_path / "g.gcb"
    path.write_bytes(stored)
    for out in (gpucabac.decode(stored, device=engine), gpucabac.load(path, device=engine)):
        out = host(engine, out)
        assert list(out) == [t["name"] for t in e["tensors"]]
        for t in e["tensors"]:
            assert make_golden.sha256(np.ascontiguousarray(out[t["name"]]).tobytes()) == e["decoded_sha256"][t["name"]]


# --- edge shapes -----------------------------------------------------------------------------------

S = 64
EDGE_SIZES = [0, 1, S - 1, S, S + 1, 3 * S + 5]


@pytest.mark.parametrize("quantizer", ["urq", "dq", "dq256"])
def test_edge_shapes(engine, quantizer):
    rng = np.random.default_rng(len(quantizer))
    settings = gpucabac.CodingSettings(qp=-34, quantizer=quantizer, slice_size=S)
    tensors = {f"w{n}": (rng.standard_normal((1, n)) * 0.05).astype(np.float32) for n in EDGE_SIZES}
    tensors |= {f"v{n}": (rng.standard_normal(n) * 0.05).astype(np.float16) for n in EDGE_SIZES}
    tensors |= {"ints": rng.integers(-300, 300, S + 1).astype(np.int16), "empty2d": np.zeros((0, 5), np.float32),
                "scalar": np.float32(0.25), "cols": (rng.standard_normal((9, S + 3)) * 0.05).astype(BF16)}
    want = gpucabac.encode(tensors, settings)
    assert gpucabac.encode(tensors, settings, device=engine) == want
    expected = gpucabac.quantize(tensors, settings)
    got = host(engine, gpucabac.decode(want, device=engine))
    assert list(got) == list(expected)
    for name in tensors:
        same(got[name], expected[name], name)
    # and with the column scan
    auto = settings.replace(scan="auto")
    data = gpucabac.encode(tensors, auto)
    assert gpucabac.encode(tensors, auto, device=engine) == data
    got = host(engine, gpucabac.decode(data, device=engine))
    for name, x in gpucabac.quantize(tensors, auto).items():
        same(got[name], x, name)


def test_level_contract(engine):
    """encode(jobs) on valid levels gives the CPU engine's bytes, lengths and CRCs; decode of a
    table of several tensors gives the levels back, and per-slice error codes."""
    rng = np.random.default_rng(5)
    cpu = get_engine("cpu")
    jobs = []
    for n, size, dq, ngt in ((200, 7, 0, 11), (1, 1, 8, 0), (130, 64, 128, 20), (0, 5, 0, 11)):
        levels = np.clip(np.rint(rng.laplace(0, 2, n)), -40, 40).astype(np.int32)  # coded levels
        if dq:  # as reconstruction indices, the DQ state restarting at every slice
            levels = np.concatenate([to_dq_levels(levels[i : i + size], dq) for i in range(0, n, size)]).astype(np.int32)
        init = rng.integers(0, 16, 98).astype(np.uint8)
        jobs.append(EncodeJob(levels, size, dq, ngt, init))
    want = cpu.encode(jobs)
    got = engine.encode(jobs)
    for w, g in zip(want, got):
        assert g.payload.tobytes() == w.payload.tobytes()
        assert g.lengths.dtype == np.uint32 and np.array_equal(g.lengths, w.lengths)
        assert np.array_equal(g.crcs, w.crcs)
    coded = [(j, c) for j, c in zip(jobs, want) if j.levels.size]
    recs = [container.TensorRecord(f"t{i}", "float32", (j.levels.size,), gpucabac.dq_mode(j.dq), 1.0, j.num_gt_flags,
                                   min(j.slice_size, j.levels.size), _used_init(j), 0, c.lengths, c.crcs)
            for i, (j, c) in enumerate(coded)]
    table = SliceTable.from_records(recs, [c.payload for _, c in coded])
    arrays, errors = engine.decode(table, [TensorOutput("int32")] * len(recs))
    assert errors.dtype == np.int32 and errors.shape == (table.num_slices,) and not errors.any()
    for (j, _), a in zip(coded, arrays):
        assert np.array_equal(engine.to_host(a), j.levels)


def _used_init(job: EncodeJob) -> np.ndarray:
    from gpucabac.binarize import used_contexts  # noqa: PLC0415

    return np.asarray(job.init)[used_contexts(job.num_gt_flags, job.dq)].astype(np.uint8)


# --- corrupt and truncated slices -------------------------------------------------------------------

def _recrc(data: bytes) -> bytes:
    """The container with every slice CRC recomputed (so that only the decoder can object)."""
    buf = memoryview(data).cast("B")
    header = container.parse_container(buf)
    recs = []
    for r in header.records:
        start = header.payload_start + r.offset
        pay = np.frombuffer(buf[start : start + r.payload_length], np.uint8)
        recs.append(dataclasses.replace(r, slice_crcs=slices.slice_crcs(pay, slices.slice_offsets(r.slice_lengths), r.slice_lengths)))
    return container.write(recs, np.frombuffer(buf[header.payload_start:], np.uint8))


def _outcome(engine, data: bytes):
    try:
        return "ok", host(engine, gpucabac.decode(data, device=engine))
    except FormatError as e:
        return "error", str(e)


def test_corrupt_slices_fail_alike(engine):
    rng = np.random.default_rng(12)
    tensors = {"a": (rng.standard_normal((40, 50)) * 0.05).astype(np.float32),
               "b": (rng.standard_normal((30, 30)) * 0.05).astype(np.float16),
               "i": rng.integers(-5, 5, 77).astype(np.int8)}
    data = gpucabac.encode(tensors, gpucabac.CodingSettings(qp=-36, quantizer="dq", slice_size=100))
    header = container.parse_container(data)
    cpu = get_engine("cpu")
    kinds = set()
    for trial in range(30):
        bad = bytearray(data)
        pos = header.payload_start + int(rng.integers(len(data) - header.payload_start))
        bad[pos] ^= 1 << int(rng.integers(8))
        for variant in (bytes(bad), _recrc(bytes(bad))):
            want, got = _outcome(cpu, variant), _outcome(engine, variant)
            assert want[0] == got[0], (trial, want, got)
            if want[0] == "error":
                assert got[1] == want[1]
                kinds.add("checksum" if "checksum mismatch" in want[1] else "decoder")
            else:
                for name in want[1]:
                    same(got[1][name], want[1][name], name)
    assert {"checksum", "decoder"} <= kinds


def test_truncated_and_cut_slices_fail_alike(engine):
    rng = np.random.default_rng(13)
    tensors = {"a": (rng.standard_normal((20, 50)) * 0.05).astype(np.float32)}
    data = gpucabac.encode(tensors, gpucabac.CodingSettings(qp=-34, slice_size=128))
    header = container.parse_container(data)
    rec = header.records[0]
    payload = np.frombuffer(data, np.uint8)[header.payload_start:]
    # a slice one byte short (and the next one byte longer), CRCs fixed: only the decoder can see it
    lengths = rec.slice_lengths.copy()
    lengths[2] -= 1
    lengths[3] += 1
    shifted = _recrc(container.write([dataclasses.replace(rec, slice_lengths=lengths)], payload))
    cpu = get_engine("cpu")
    assert _outcome(cpu, shifted)[0] == "error"
    assert _outcome(engine, shifted) == _outcome(cpu, shifted)
    # the file cut short anywhere: the container reader refuses it the same way for every engine
    for cut in (len(data) - 1, header.payload_start + 3, 40, 10):
        with pytest.raises(FormatError) as e:
            gpucabac.decode(data[:cut], device=engine)
        with pytest.raises(FormatError) as want:
            gpucabac.decode(data[:cut])
        assert str(e.value) == str(want.value)


# --- every dtype= ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [None, "float32", "float16", "bfloat16", "float64", np.float16, BF16])
def test_every_output_dtype(engine, dtype):
    rng = np.random.default_rng(21)
    tensors = {"f32": (rng.standard_normal((10, 40)) * 0.05).astype(np.float32),
               "f16": (rng.standard_normal((10, 40)) * 0.05).astype(np.float16),
               "bf16": (rng.standard_normal((10, 40)) * 0.05).astype(BF16),
               "f64": rng.standard_normal((10, 40)) * 0.05 + 1 + 2.0**-8,
               "raw64": rng.standard_normal(9) * 0.05, "ids": np.arange(12, dtype=np.int64), "mask": np.ones(5, bool)}
    data = gpucabac.encode(tensors, gpucabac.CodingSettings(step=2.0**-29 * 1024, slice_size=64, small_step="lossless"))
    want = gpucabac.decode(data, dtype=dtype)
    got = host(engine, gpucabac.decode(data, dtype=dtype, device=engine))
    assert list(got) == list(want)
    for name in want:
        same(got[name], want[name], f"{name} dtype={dtype}")
    with pytest.raises(InputError, match="converts float tensors to"):
        gpucabac.decode(data, dtype="int8", device=engine)


def test_float64_to_bfloat16_rule_on_every_engine(engine):
    # the values of tests/test_dtypes.py, where a direct rounding and the rule differ
    step = 2.0**-29
    levels = np.array([[2**29 + 2**21 + 1, -(2**29 + 2**21 + 1), 2**29 + 2**21 + 3, 5]], np.int64)
    data = gpucabac.encode({"w": levels.astype(np.float64) * step}, step=step, slice_size=None)
    got = host(engine, gpucabac.decode(data, dtype="bfloat16", device=engine))["w"]
    assert got.astype(np.float64)[0, :3].tolist() == [1.0, -1.0, 1.0]


# --- the slice table over one buffer ---------------------------------------------------------------

def test_table_over_a_shared_buffer(engine):
    """SliceTable.over_payload: the records' slices where they lie in one read-only buffer, with
    gaps, out of order and not all of it covered, decode as the copied table does."""
    rng = np.random.default_rng(31)
    tensors = {"a": (rng.standard_normal((20, 30)) * 0.05).astype(np.float32),
               "b": (rng.standard_normal(500) * 0.05).astype(np.float16),
               "c": (rng.standard_normal((9, 70)) * 0.05).astype(BF16)}
    data = gpucabac.encode(tensors, gpucabac.CodingSettings(qp=-34, quantizer="dq", slice_size=64))
    header = container.parse_container(data)
    recs = header.records
    area = np.frombuffer(data, np.uint8)[header.payload_start :]
    pieces = [area[r.offset : r.offset + r.payload_length] for r in recs]
    outputs = [TensorOutput(r.dtype, r.dtype, r.step) for r in recs]
    want, want_err = get_engine("cpu").decode(SliceTable.from_records(recs, pieces), outputs)
    # the payloads in reverse order, 5 bytes of garbage before, between and after them
    order = [2, 0, 1]
    buf, starts, pos = [], [0, 0, 0], 0
    for t in order:
        buf.append(rng.integers(0, 256, 5, dtype=np.uint8))
        pos += 5
        starts[t] = pos
        buf.append(pieces[t])
        pos += pieces[t].size
    buf.append(rng.integers(0, 256, 5, dtype=np.uint8))
    payload = np.concatenate(buf)
    payload.flags.writeable = False
    table = SliceTable.over_payload(recs, payload, starts)
    assert table.payload is payload or np.shares_memory(table.payload, payload)
    for tab in (table, SliceTable.over_payload(recs, area, [r.offset for r in recs])):
        arrays, errors = engine.decode(tab, outputs)
        assert not errors.any() and np.array_equal(errors, want_err)
        for a, w, r in zip(arrays, want, recs):
            same(engine.to_host(a), w, r.name)
    # a writable buffer is handed to the engines read-only; records must lie inside it
    writable = payload.copy()
    assert not SliceTable.over_payload(recs, writable, starts).payload.flags.writeable
    assert writable.flags.writeable
    with pytest.raises(ValueError, match="outside the buffer"):
        SliceTable.over_payload(recs, payload[:-10], [s + 10 for s in starts])
    with pytest.raises(ValueError, match="flat, contiguous uint8"):
        SliceTable.over_payload(recs, payload.view(np.int8), starts)
