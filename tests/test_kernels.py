"""The GPU engine's code, checked on the CPU and (marked gpu) on a device (docs/design.md §2).

kernels/*.cuh are compiled with g++ as plain C++ (tests/kernel_shim.cpp adds C entry points) and
held to the numba reference: same bytes from the same levels, same levels (or the same error
code) from the same bytes, for URQ and DQ, every number of greater-than flags the tests of the
CPU engine use, random presets and every slice-size edge case. The orchestration in
gpucabac/engines/gpu.py (slice table, prefix sums, compaction, error reporting, dtypes) runs on the
CPU too, against `ShimKernels`: the same kernel bodies the CUDA kernels call, looped over the
thread index. nvcc compiles the assembled CUDA source when it is on PATH. What only a GPU can
check (the CUDA build, launch geometry, shared memory, DLPack) is in the tests marked gpu.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import pathlib
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import gpucabac
from gpucabac import codec, container, slices
from gpucabac.engines import cpu as engine_cpu, gpu as engine_gpu, kernel_source
from gpucabac.dtypes import cast_float
from gpucabac.engines import SliceTable, TensorOutput
from gpucabac.binarize import MAX_CONTEXTS, full_context_init, used_contexts
from gpucabac.errors import FormatError, GpuUnavailableError, InputError
from gpucabac.quantization import dequantize
from gpucabac.tables import MAX_ABS_LEVEL, NUM_PRESETS, PRESETS

from shim import ShimKernels, p as _p
from test_engine import _reachable_1d, random_coded_levels, to_dq_levels

ROOT = pathlib.Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
GT_FLAGS = [0, 1, 11, 20]

@pytest.fixture
def host_gpu(shim, monkeypatch) -> ShimKernels:
    """Makes device='gpu' run the GPU engine's orchestration on ShimKernels (no CuPy involved)."""
    k = ShimKernels(shim)
    monkeypatch.setattr(engine_gpu, "unavailable_reason", lambda: None)
    monkeypatch.setattr(engine_gpu, "device_name", lambda: "g++ shim")
    monkeypatch.setattr(engine_gpu, "kernels", lambda: k)
    return k


# ---------------------------------------------------------------------------------------------
# Helpers: the numba reference


def full_init(rng: np.random.Generator | None) -> np.ndarray:
    if rng is None:
        return np.zeros(MAX_CONTEXTS, np.int32)
    return rng.integers(0, NUM_PRESETS, MAX_CONTEXTS).astype(np.int32)


def cpu_encode_slice(levels: np.ndarray, dq: int, ngt: int, init: np.ndarray, runs: bool = False) -> bytes:
    levels = np.ascontiguousarray(levels, np.int32)
    bound, bad = slices.slice_bounds(levels, max(1, levels.size), dq, ngt, runs)
    assert (bad < 0).all()
    out = np.zeros(int(bound.sum()) if levels.size else 16, np.uint8)
    n = engine_cpu.encode_slice(levels, 0, levels.size, dq, ngt, init, out, 0, runs)
    assert n <= bound.sum() or not levels.size
    return out[:n].tobytes()


def cpu_decode_slice(data: bytes, count: int, dq: int, ngt: int, init: np.ndarray, runs: bool = False):
    buf = np.frombuffer(data, np.uint8) if data else np.zeros(0, np.uint8)
    out = np.zeros(count, np.int32)
    err = engine_cpu.decode_slice(buf, 0, len(data), count, dq, ngt, init, out, 0, runs)
    return int(err), out


def shim_encode_slice(lib, levels: np.ndarray, dq: int, ngt: int, init: np.ndarray, cap: int | None = None,
                      runs: bool = False):
    levels = np.ascontiguousarray(levels, np.int32)
    init8 = np.ascontiguousarray(init, np.uint8)
    if cap is None:
        cap = 16 + 60 * levels.size
    out = np.zeros(max(cap, 1), np.uint8)
    n = lib.gc_shim_encode_slice(_p(levels), levels.size, int(dq), ngt, int(runs), _p(init8), _p(out), cap)
    return None if n < 0 else out[:n].tobytes()


def shim_decode_slice(lib, data: bytes, count: int, dq: int, ngt: int, init: np.ndarray, runs: bool = False):
    buf = np.frombuffer(data, np.uint8).copy() if data else np.zeros(1, np.uint8)
    init8 = np.ascontiguousarray(init, np.uint8)
    out = np.zeros(max(count, 1), np.int32)
    err = lib.gc_shim_decode_slice(_p(buf), len(data), count, int(dq), ngt, int(runs), _p(init8), _p(out))
    return int(err), out[:count]


def random_levels(rng: np.random.Generator, n: int, dq: int, big: bool = True, slice_size: int | None = None,
                  sparse: float = 0.0) -> np.ndarray:
    """Valid levels, a share `sparse` of them zeroed; under DQ mapped through the state machine,
    which restarts at every slice."""
    k = random_coded_levels(rng, n, big=big)
    if sparse:
        k[rng.random(n) < sparse] = 0
    if not dq:
        return k.astype(np.int32)
    s = slice_size or max(n, 1)
    return np.concatenate([to_dq_levels(k[i : i + s], dq) for i in range(0, n, s)] or [np.zeros(0)]).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Sources: generated header, assembly, packaging


def test_tables_header_is_the_generated_text():
    # "Tables live once": kernels/tables.cuh is generated from gpucabac's Python tables.
    text = kernel_source.tables_header()
    assert (ROOT / "kernels" / "tables.cuh").read_text(encoding="utf-8") == text, (
        "kernels/tables.cuh is stale: run `python -m gpucabac.engines.kernel_source --write`")
    # the values in it are the tables' values
    for name, arr in (("GC_CURVE_VALUES", gpucabac.tables.CURVE), ("GC_PRESET_STATES_VALUES", gpucabac.tables.PRESET_STATES),
                      ("GC_RLPS_VALUES", gpucabac.tables.RLPS), ("GC_DQ_NEXT_VALUES", gpucabac.tables.DQ_NEXT_ALL)):
        line = text.split(f"#define {name} ", 1)[1].split("\n//", 1)[0].split("\n\n", 1)[0]
        vals = [int(v) for v in line.replace("\\", " ").replace(",", " ").split()]
        assert vals == arr.ravel().tolist(), name
    assert f"#define GC_MAX_CONTEXTS {MAX_CONTEXTS}\n" in text
    assert f"#define GC_DECODE_BAD_END {slices.DECODE_BAD_END}\n" in text


def test_generator_cli_check(capsys):
    assert kernel_source.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_kernel_sources_ship_in_the_package():
    kdir = kernel_source.kernel_dir()
    for name in kernel_source.KERNEL_FILES:
        assert (kdir / name).is_file(), name
        assert (kdir / name).read_bytes() == (ROOT / "kernels" / name).read_bytes(), name


def test_kernel_sources_found_in_an_uninstalled_checkout(monkeypatch):
    # gpucabac imported from a plain checkout (no pip install: a lent GPU machine has no
    # registry) has no gpucabac.kernels package; the checkout's kernels/ must serve instead.
    def not_installed(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(kernel_source.resources, "files", not_installed)
    assert kernel_source.kernel_dir() == ROOT / "kernels"
    assert "__global__" in kernel_source.assemble()


@pytest.mark.slow
def test_wheel_contains_the_kernel_sources(tmp_path):
    # A non-editable build: the top-level kernels/ must land inside the package (pyproject's
    # package-dir mapping), or an installed gpucabac could not compile its GPU engine.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gpucabac", src / "gpucabac", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", str(src), "-w", str(tmp_path / "whl")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import zipfile

    (wheel,) = (tmp_path / "whl").glob("gpucabac-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in kernel_source.KERNEL_FILES + ("__init__.py",):
        assert f"gpucabac/kernels/{name}" in names, name
    assert "gpucabac/engines/gpu.py" in names and "gpucabac/engines/kernel_source.py" in names


def test_assembled_source_is_self_contained():
    src = kernel_source.assemble()
    assert "#include" not in src.replace('// (#include "', "")
    for name in kernel_source.KERNEL_FILES[:-1]:
        guard = {"compat.cuh": "GPUCABAC_COMPAT_CUH", "tables.cuh": "GPUCABAC_TABLES_CUH",
                 "slice_coder.cuh": "GPUCABAC_SLICE_CODER_CUH", "dequant.cuh": "GPUCABAC_DEQUANT_CUH",
                 "jobs.cuh": "GPUCABAC_JOBS_CUH"}[name]
        assert src.count(f"#define {guard}\n") == 1, name
    for kernel in engine_gpu.KERNEL_NAMES:
        assert f'extern "C" __global__ void {kernel}(' in src
    assert "<" not in "".join(line for line in src.splitlines() if line.lstrip().startswith("#include"))


def test_nvcc_compiles_the_kernels(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA build is checked where it is (and on a GPU by the gpu tests)")
    src = tmp_path / "gpucabac_assembled.cu"
    src.write_text(kernel_source.assemble())
    for path in (src, kernel_source.kernel_dir() / "gpucabac.cu"):
        cmd = [nvcc, "-c", "-std=c++17", "-arch=sm_80", "-Werror", "all-warnings", str(path), "-o", str(tmp_path / "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"nvcc failed on {path.name}:\n{r.stdout}\n{r.stderr}"


# ---------------------------------------------------------------------------------------------
# Probability model: the packed 32-bit context word against numba's update, every reachable state


@pytest.mark.parametrize("preset", range(NUM_PRESETS))
def test_packed_context_update_every_reachable_state(shim, preset):
    sh0f, sh1, p_init, s0_init = (int(v) for v in PRESETS[preset])
    sh0 = sh0f + 4
    s0_vals = sorted(_reachable_1d(s0_init, sh0, 3))
    s1_vals = sorted(_reachable_1d(p_init - 16 * s0_init, sh1, 7))
    m = max(len(s0_vals), len(s1_vals))
    s0 = np.array([s0_vals[i % len(s0_vals)] for i in range(m)], np.int32)
    s1 = np.array([s1_vals[i % len(s1_vals)] for i in range(m)], np.int32)
    for b in (0, 1):
        e0, e1 = s0.copy(), s1.copy()
        for c in range(m):
            engine_cpu._update(c, b, e0, e1, np.full(m, sh0, np.int32), np.full(m, sh1, np.int32))
        for c in range(m):
            w = shim.gc_shim_ctx_pack(int(s0[c]), int(s1[c]), sh0, sh1)
            assert shim.gc_shim_ctx_p(w) == int(s1[c]) + 16 * int(s0[c])
            w2 = shim.gc_shim_ctx_update(w, b)
            assert shim.gc_shim_ctx_p(w2) == int(e1[c]) + 16 * int(e0[c]), (preset, c, b)
            assert w2 == shim.gc_shim_ctx_pack(int(e0[c]), int(e1[c]), sh0, sh1), (preset, c, b)


def test_crc32_is_zlib(shim):
    import zlib

    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 3, 255, 4096):
        data = rng.integers(0, 256, max(n, 1), dtype=np.uint8)[:n].copy()
        assert shim.gc_shim_crc32(_p(data) if n else 0, n) == zlib.crc32(data.tobytes())


# ---------------------------------------------------------------------------------------------
# One slice: same bytes, same levels, same error codes


@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("ngt", GT_FLAGS)
@pytest.mark.parametrize("dq", [0, 8, 128])  # trellis sizes, 0: URQ
def test_slice_coder_matches_reference(shim, ngt, dq, runs):
    rng = np.random.default_rng(1000 * ngt + dq + runs)
    sizes = [0, 1, 2, 3, 17, 100, 1000, 4000]
    for trial in range(24):
        n = sizes[trial % len(sizes)]
        levels = random_levels(rng, n, dq, big=trial % 3 != 0, sparse=(0.0, 0.5, 0.99)[trial % 3])
        init = full_init(None if trial % 5 == 0 else rng)
        want = cpu_encode_slice(levels, dq, ngt, init, runs)
        got = shim_encode_slice(shim, levels, dq, ngt, init, runs=runs)
        assert got == want, (trial, n)
        err, out = shim_decode_slice(shim, got, n, dq, ngt, init, runs)
        assert err == slices.DECODE_OK and np.array_equal(out, levels), (trial, n)


def test_slice_coder_edge_sequences(shim):
    # all-zero runs (long MPS runs, 0xFF carries), extreme magnitudes, alternating signs
    cases = [
        np.zeros(20000, np.int32),
        np.full(300, MAX_ABS_LEVEL, np.int32),
        np.array([-MAX_ABS_LEVEL, MAX_ABS_LEVEL] * 50, np.int32),
        np.array([(-1) ** i * (i % 40) for i in range(5000)], np.int32),
        np.array([1] * 3000 + [0] * 3000 + [-1] * 3000, np.int32),
    ]
    cases += [np.r_[np.zeros(100_000), [1]].astype(np.int32), np.r_[[-3], np.zeros(70_000)].astype(np.int32)]
    for levels in cases:
        for ngt in GT_FLAGS:
            for preset in range(NUM_PRESETS):
                for runs in (False, True):
                    init = np.full(MAX_CONTEXTS, preset, np.int32)
                    got = shim_encode_slice(shim, levels, False, ngt, init, runs=runs)
                    assert got == cpu_encode_slice(levels, False, ngt, init, runs), (ngt, preset, runs)
                    err, out = shim_decode_slice(shim, got, levels.size, False, ngt, init, runs)
                    assert err == 0 and np.array_equal(out, levels)


def test_encoder_reports_a_too_small_buffer(shim):
    levels = random_levels(np.random.default_rng(3), 500, False)
    init = full_init(None)
    want = cpu_encode_slice(levels, False, 11, init)
    assert shim_encode_slice(shim, levels, False, 11, init, cap=len(want)) == want
    assert shim_encode_slice(shim, levels, False, 11, init, cap=len(want) - 1) is None


def _corruptions(rng: np.random.Generator, data: bytes):
    yield "empty", b""
    yield "one byte", data[:1]
    yield "truncated by one", data[:-1]
    yield "half", data[: len(data) // 2]
    yield "one extra byte", data + b"\x00"
    yield "extra 0x80", data + b"\x80"
    yield "first byte 0xFF", b"\xff" + data[1:]
    yield "starts 0xFFFF", b"\xff\xff" + data[2:]
    yield "all 0xFF", b"\xff" * len(data)
    yield "all zero", b"\x00" * len(data)
    for i in range(12):
        b = bytearray(data)
        pos = int(rng.integers(len(b)))
        b[pos] ^= 1 << int(rng.integers(8))
        yield f"bit flip {i}", bytes(b)
    for i in range(6):
        yield f"random {i}", rng.integers(0, 256, len(data), dtype=np.uint8).tobytes()


@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("ngt", [0, 11])
@pytest.mark.parametrize("dq", [0, 8, 128])  # trellis sizes, 0: URQ
def test_corrupt_slices_give_the_reference_error_codes(shim, ngt, dq, runs):
    rng = np.random.default_rng(77 + ngt + 2 * dq + runs)
    seen = set()
    for trial in range(10):
        n = [1, 5, 64, 700][trial % 4]
        levels = random_levels(rng, n, dq, big=trial % 2 == 0, sparse=0.9 if runs else 0.0)
        init = full_init(rng)
        data = cpu_encode_slice(levels, dq, ngt, init, runs)
        for what, bad in _corruptions(rng, data):
            for count in (n, n + 1, max(0, n - 1)):
                want_err, want_out = cpu_decode_slice(bad, count, dq, ngt, init, runs)
                got_err, got_out = shim_decode_slice(shim, bad, count, dq, ngt, init, runs)
                assert got_err == want_err, (trial, what, count)
                if want_err == slices.DECODE_OK:
                    assert np.array_equal(got_out, want_out), (trial, what, count)
                seen.add(want_err)
    # the corpus reaches every error code of the decoder
    assert {slices.DECODE_OVERRUN, slices.DECODE_BAD_END} <= seen


@pytest.mark.parametrize("dq", [0, 8])
def test_a_run_past_the_slice_end_is_rejected_alike(shim, dq):
    """A slice of zero runs decoded with fewer levels than it holds: the run passes the end."""
    init = full_init(np.random.default_rng(5))
    for levels in (np.zeros(300, np.int32), np.r_[np.zeros(40), [2], np.zeros(9)].astype(np.int32)):
        data = cpu_encode_slice(levels, dq, 11, init, True)
        assert cpu_decode_slice(data, levels.size, dq, 11, init, True)[0] == slices.DECODE_OK
        for count in (levels.size - 1, 20):
            assert cpu_decode_slice(data, count, dq, 11, init, True)[0] == slices.DECODE_BAD_RUN
            assert shim_decode_slice(shim, data, count, dq, 11, init, True)[0] == slices.DECODE_BAD_RUN
    # a run prefix of 33 ones is longer than any slice allows
    init = np.full(MAX_CONTEXTS, 2, np.int32)  # P = 3039: 1s are likely
    bad = cpu_encode_slice(np.zeros(1, np.int32), 0, 11, init, True)[:2] + b"\xff" * 64
    assert cpu_decode_slice(bad, 10, 0, 11, init, True)[0] == slices.DECODE_BAD_RUN
    assert shim_decode_slice(shim, bad, 10, 0, 11, init, True)[0] == slices.DECODE_BAD_RUN


def test_bad_level_code_on_a_long_prefix(shim):
    # a stream of 0xFF after a valid start decodes one long Exp-Golomb prefix
    init = np.full(MAX_CONTEXTS, 2, np.int32)  # P = 3039: 1s are likely
    data = cpu_encode_slice(np.array([MAX_ABS_LEVEL], np.int32), False, 0, init)
    for tail in (b"\xff" * 64, b"\x7f" * 64):
        bad = data[:2] + tail
        want = cpu_decode_slice(bad, 3, False, 0, init)[0]
        assert shim_decode_slice(shim, bad, 3, False, 0, init)[0] == want
    codes = set()
    rng = np.random.default_rng(9)
    for _ in range(300):
        bad = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
        want = cpu_decode_slice(bad, 50, False, 0, init)[0]
        assert shim_decode_slice(shim, bad, 50, False, 0, init)[0] == want
        codes.add(want)
    assert slices.DECODE_BAD_LEVEL in codes


# ---------------------------------------------------------------------------------------------
# Tensor level: engine_gpu's encode (bound, scratch, prefix sum, gather, CRC) on the shim


SLICE_CASES = [(n, s) for s in (1, 7, 64) for n in sorted({1, s - 1, s, s + 1, 3 * s, 3 * s + 5}) if n > 0]


def _encode_both(rng, k, n, slice_size, dq, ngt, runs=False):
    """Random levels and context choice coded by the CPU engine and by engine_gpu on kernels k:
    (levels, ctx_init, CPU payload, CPU lengths, engine_gpu.encode_slices' result)."""
    levels = random_levels(rng, n, dq, slice_size=slice_size, sparse=0.8 if runs else 0.0)
    ctx_init = rng.integers(0, NUM_PRESETS, len(used_contexts(ngt, dq, runs))).astype(np.uint8)
    _, want_payload, want_lengths = codec.encode_levels(levels, slice_size, dq, ngt, ctx_init, runs=runs)
    got = engine_gpu.encode_slices(levels, slice_size, dq, ngt, full_context_init(ctx_init, ngt, dq, runs), k=k, runs=runs)
    return levels, ctx_init, want_payload, want_lengths, got


@pytest.mark.parametrize("runs", [False, True])
@pytest.mark.parametrize("n,slice_size", SLICE_CASES)
@pytest.mark.parametrize("dq", [0, 8, 128])  # trellis sizes, 0: URQ
def test_encode_slices_equals_cpu_engine(shim, n, slice_size, dq, runs):
    rng = np.random.default_rng(n * 131 + slice_size + dq + runs)
    k = ShimKernels(shim)
    for ngt in (0, 11):
        levels, ctx_init, want_payload, want_lengths, (payload, lengths, crcs, bad) = _encode_both(
            rng, k, n, slice_size, dq, ngt, runs)
        assert bad == -1
        assert lengths.dtype == np.uint32 and np.array_equal(lengths, want_lengths)
        assert payload.tobytes() == want_payload.tobytes()
        offsets = np.concatenate([[0], np.cumsum(want_lengths, dtype=np.int64)[:-1]])
        assert np.array_equal(crcs, slices.slice_crcs(want_payload, offsets, want_lengths))
        # the decode kernel's table over these slices gives the CPU's values (level 0.5-steps)
        rec = container.TensorRecord("t", "float32", (n,), gpucabac.dq_mode(dq), 0.5, ngt, slice_size, ctx_init, 0,
                                     lengths, crcs, runs=runs)
        table = SliceTable.from_records([rec], [payload])
        out = [TensorOutput("float32", "float32", 0.5)]
        (want,), want_err = engine_cpu.CpuEngine().decode(table, out)
        (got,), got_err = engine_gpu.GpuEngine(k).decode(table, out)
        assert not want_err.any() and not got_err.any()
        _same(got, want, f"decode n={n} S={slice_size}")
        assert np.array_equal(got, levels.astype(np.float32) * np.float32(0.5))
        # and the bounds are slices.slice_bounds
        lv = levels.astype(np.int32)
        assert [a.tolist() for a in k.bounds(lv, slice_size, dq, ngt, runs)] == [
            a.tolist() for a in slices.slice_bounds(lv, slice_size, dq, ngt, runs)]


def test_encode_slices_empty_and_invalid(shim):
    k = ShimKernels(shim)
    init = np.zeros(MAX_CONTEXTS, np.uint8)
    payload, lengths, crcs, bad = engine_gpu.encode_slices(np.zeros(0, np.int32), 8, False, 11, init, k=k)
    assert payload.size == lengths.size == crcs.size == 0 and bad == -1
    levels = np.array([0, 2, 4, 3, 0, 0, 0, 0, 5], np.int32)  # DQ: 3 is off the state's quantizer
    want = slices.slice_bounds(levels, 4, 8, 11)[1]
    got = k.bounds(levels, 4, 8, 11)[1]
    assert got.tolist() == want.tolist()
    first_bad = int(want[want >= 0][0])
    assert engine_gpu.encode_slices(levels, 4, True, 11, init, k=k)[3] == first_bad
    big = np.array([0, 1, MAX_ABS_LEVEL + 1, 0], np.int32)
    assert engine_gpu.encode_slices(big, 3, False, 11, init, k=k)[3] == 2


def test_typed_wrappers_reject_wrong_arguments(shim):
    k = ShimKernels(shim)
    with pytest.raises(TypeError, match="levels: expected dtype int32"):
        k.bounds(np.zeros(4, np.int64), 2, 0, 11)
    with pytest.raises(ValueError, match="contiguous 1-D"):
        k.bounds(np.zeros(8, np.int32)[::2], 2, 0, 11)
    with pytest.raises(ValueError, match="init: expected 98 elements"):
        k.encode(np.zeros(4, np.int32), 2, 0, 11, np.zeros(3, np.uint8), np.zeros(64, np.uint8),
                 np.zeros(2, np.int64), np.full(2, 9, np.int64))
    with pytest.raises(TypeError, match="expected a numpy array"):
        engine_gpu.check_array(np, "x", [1, 2], np.int32)


# ---------------------------------------------------------------------------------------------
# Container level: encode/decode with device="gpu" through engine_gpu on the shim


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = {
        "w32": (rng.standard_normal((37, 29)) * 0.05).astype(np.float32),
        "w16": (rng.standard_normal((16, 33)) * 0.05).astype(np.float16),
        "wbf": (rng.standard_normal((9, 40)) * 0.05).astype(BF16),
        "w64": rng.standard_normal((5, 61)) * 0.05,
        "bias": (rng.standard_normal(23) * 0.01).astype(np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "ids": rng.integers(-3, 1000, (7, 11)).astype(np.int64),
        "mask": rng.random((3, 50)) < 0.4,
        "u8": rng.integers(0, 256, 77).astype(np.uint8),
        "huge_int": np.array([2**40, -5, 7], np.int64),  # beyond 2^30: stored raw
        "heavy": np.concatenate([rng.laplace(0, 0.02, 300), [3.0, -7.5, 12.0]]).astype(np.float32).reshape(3, 101),
    }
    return t


def _same(a: np.ndarray, b: np.ndarray, what: str):
    assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    assert a.shape == b.shape, what
    assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), what


@pytest.mark.parametrize("kw", [
    dict(qp=-32), dict(qp=-36, dq=True), dict(qp=-30, slice_size=7, num_gt_flags=0),
    dict(qp=-38, dq=True, slice_size=64, num_gt_flags=20), dict(qp=-32, slice_size=None, small_step="lossless"),
    dict(qp=-34, dq=256, slice_size=100), dict(qp=-34, dq=True, slice_size=100, scan="columns"),
    dict(step=0.013, slice_size=1, num_gt_flags=1),
])
def test_container_on_gpu_path_equals_cpu(host_gpu, kw, caplog):
    tensors = _model(np.random.default_rng(len(str(kw))))
    data = gpucabac.encode(tensors, **kw)
    with caplog.at_level(logging.INFO, logger="gpucabac"):
        assert gpucabac.encode(tensors, **kw, device="gpu") == data
        assert gpucabac.encode(tensors, **kw, device="auto") == data
    assert "running on the GPU" in caplog.text
    want = gpucabac.decode(data)
    for dtype in (None, "float32", "float16", "bfloat16", np.float64):
        want = gpucabac.decode(data, dtype=dtype)
        got = gpucabac.decode(data, dtype=dtype, device="gpu")
        assert list(got) == list(want)
        for name in want:
            _same(got[name], want[name], f"{name} dtype={dtype}")
    sub = ["w16", "ids"]
    got = gpucabac.decode(data, sub, device="auto")
    assert list(got) == sub and all(np.array_equal(got[n], want[n]) for n in sub)


def test_load_on_gpu_path(host_gpu, tmp_path):
    tensors = _model(np.random.default_rng(4))
    path = tmp_path / "m.gcb"
    path.write_bytes(gpucabac.encode(tensors, qp=-34, dq=True, slice_size=50))
    want = gpucabac.load(path, ["w32", "mask", "wbf"])
    got = gpucabac.load(path, ["w32", "mask", "wbf"], device="gpu")
    for name in want:
        _same(got[name], want[name], name)


# Corrupt and truncated containers on every engine: tests/test_engines.py.


def test_raw_and_integer_tensors_fail_alike_on_both_paths(host_gpu):
    """A corrupt raw payload, and an integer tensor whose levels do not fit its dtype (a container
    that says uint8 for int32 levels), give the same FormatError on the CPU and the GPU path."""
    tensors = {"ints": np.array([0, 7, 300, -2], np.int32), "huge": np.array([2**40, -5, 7], np.int64)}
    data = gpucabac.encode(tensors)
    header = container.parse_container(data)
    payload = np.frombuffer(data, np.uint8)[header.payload_start:]
    raw = next(r for r in header.records if r.name == "huge")
    assert raw.mode == "raw"
    bad = bytearray(data)
    bad[header.payload_start + raw.offset + 3] ^= 0x10
    narrowed = container.write([dataclasses.replace(r, dtype="uint8") if r.name == "ints" else r for r in header.records],
                               payload)
    for variant, message in ((bytes(bad), "'huge': checksum mismatch in its raw payload"),
                             (narrowed, "'ints': decoded values -2..300 do not fit its dtype uint8")):
        with pytest.raises(FormatError) as cpu:
            gpucabac.decode(variant)
        assert message in str(cpu.value)
        with pytest.raises(FormatError) as gpu:
            gpucabac.decode(variant, device="gpu")
        assert str(gpu.value) == str(cpu.value)


def test_device_argument_is_checked(monkeypatch):
    data = gpucabac.encode({"w": np.ones((4, 4), np.float32)})
    with pytest.raises(InputError, match="device must be one of"):
        gpucabac.decode(data, device="cuda")
    monkeypatch.setattr(engine_gpu, "unavailable_reason", lambda: "CuPy is not importable (test)")
    with pytest.raises(GpuUnavailableError, match="CuPy is not importable"):
        gpucabac.decode(data, device="gpu")
    with pytest.raises(GpuUnavailableError):
        gpucabac.encode({"w": np.ones((4, 4), np.float32)}, device="gpu")


def test_auto_without_gpu_runs_on_cpu_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(engine_gpu, "unavailable_reason", lambda: "no CUDA device (test)")
    data = gpucabac.encode({"w": np.ones((4, 4), np.float32)})
    with caplog.at_level(logging.INFO, logger="gpucabac"):
        out = gpucabac.decode(data, device="auto")
    assert isinstance(out["w"], np.ndarray)
    assert "running on the CPU" in caplog.text and "no CUDA device (test)" in caplog.text


def test_real_unavailable_reason():
    from conftest import gpu_unavailable_reason

    reason = engine_gpu.unavailable_reason()
    assert (reason is None) == (gpu_unavailable_reason() is None)
    if importlib.util.find_spec("cupy") is None:
        assert "needs CuPy" in reason
        with pytest.raises(GpuUnavailableError, match="needs CuPy"):
            engine_gpu.kernels.__wrapped__()


def test_cli_decode_device(host_gpu, tmp_path):
    from click.testing import CliRunner

    from gpucabac import cli

    rng = np.random.default_rng(2)
    tensors = {"a": (rng.standard_normal((20, 30)) * 0.05).astype(BF16), "n": rng.integers(0, 9, (4, 4)).astype(np.int32)}
    src = tmp_path / "m.gcb"
    src.write_bytes(gpucabac.encode(tensors, qp=-34))
    outs = {}
    for device in ("cpu", "gpu"):
        out = tmp_path / f"{device}.npz"
        r = CliRunner().invoke(cli.main, ["decode", str(src), "-o", str(out), "--device", device])
        assert r.exit_code == 0, r.output
        outs[device] = gpucabac.io.read_model(out)
    assert "on the CPU" in r.output or "on the GPU" in r.output
    for name in tensors:
        _same(outs["gpu"][name], outs["cpu"][name], name)


# ---------------------------------------------------------------------------------------------
# Dequantization: the kernels' integer roundings against NumPy / ml_dtypes


def _float_samples(rng: np.random.Generator) -> np.ndarray:
    """float32 bit patterns over every exponent, with ties and near-ties of the f16/bf16 grids."""
    exps = np.repeat(np.arange(256, dtype=np.uint32), 512)
    mant = rng.integers(0, 1 << 23, exps.size, dtype=np.uint32)
    # every 4th: low bits exactly at a half-way point of float16 (13 dropped bits) or bfloat16 (16)
    mant[0::4] = (mant[0::4] & ~np.uint32(0x1FFF)) | np.uint32(0x1000)
    mant[1::4] = (mant[1::4] & ~np.uint32(0xFFFF)) | np.uint32(0x8000)
    mant[2::8] = (mant[2::8] & ~np.uint32(0x1FFF)) | np.uint32(0x1001)
    sign = rng.integers(0, 2, exps.size, dtype=np.uint32) << np.uint32(31)
    bits = sign | (exps << np.uint32(23)) | mant
    bits = bits[exps != 255]  # NaN/inf patterns separately
    extra = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x33000000,
                      0x33000001, 0x32FFFFFF, 0x387FC000, 0x387FE000, 0x38800000, 0x7F7FFFFF, 1], np.uint32)
    return np.concatenate([bits, extra]).view(np.float32)


def test_f32_to_f16_and_bf16_match_numpy(shim):
    x = _float_samples(np.random.default_rng(0))
    h = np.zeros(x.size, np.uint16)
    shim.gc_shim_f32_to_f16(_p(x), x.size, _p(h))
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(h, want), np.flatnonzero(h != want)[:10]
    b = np.zeros(x.size, np.uint16)
    shim.gc_shim_f32_to_bf16(_p(x), x.size, _p(b))
    assert np.array_equal(b, x.astype(BF16).view(np.uint16))


def test_f64_to_f16_matches_numpy(shim):
    rng = np.random.default_rng(1)
    x32 = _float_samples(rng).astype(np.float64)
    x32f = x32[np.isfinite(x32)]
    nudge = rng.choice([1.0, -1.0], x32f.size) * np.abs(x32f) * 2.0**-40  # off the float32 ties
    x = np.concatenate([x32, x32f + nudge])
    h = np.zeros(x.size, np.uint16)
    shim.gc_shim_f64_to_f16(_p(x), x.size, _p(h))
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    assert np.array_equal(h, want), np.flatnonzero(h != want)[:10]


def test_f16_to_f32_exhaustive(shim):
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h = h[~(((h & 0x7C00) == 0x7C00) & ((h & 0x3FF) != 0))]  # all but NaNs
    f = np.zeros(h.size, np.float32)
    shim.gc_shim_f16_to_f32(_p(h), h.size, _p(f))
    assert np.array_equal(f.view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("work", ["float32", "float16", "bfloat16", "float64"])
def test_store_matches_codec_reconstruction(shim, work):
    rng = np.random.default_rng(len(work))
    levels = np.concatenate([rng.integers(-3000, 3000, 4000), rng.integers(-MAX_ABS_LEVEL, MAX_ABS_LEVEL, 1000),
                             [0, 1, -1, MAX_ABS_LEVEL, -MAX_ABS_LEVEL]]).astype(np.int32)
    work_dt = BF16 if work == "bfloat16" else np.dtype(work)
    for step in (2.0**-6, 0.013, 1e-3 / 3, 3.7, 7.1e-8, 1e-30, 1e20, 6.1e-5):
        step = float(np.float32(step))
        with np.errstate(all="ignore"):
            rec = dequantize(levels, step, levels.shape, work_dt)
        for out in ("float32", "float16", "bfloat16", "float64"):
            out_dt = BF16 if out == "bfloat16" else np.dtype(out)
            with np.errstate(all="ignore"):
                want = cast_float(rec, out)  # the decoders' rule, whatever ml_dtypes' astype does
            got = np.zeros(levels.size, out_dt)
            shim.gc_shim_store(_p(levels), levels.size, step, engine_gpu.DTYPE_CODES[work],
                               engine_gpu.DTYPE_CODES[out], _p(got))
            assert got.tobytes() == want.tobytes(), (work, out, step)
    got = np.zeros(levels.size, np.int32)
    shim.gc_shim_store(_p(levels), levels.size, 1.0, 0, engine_gpu.DTYPE_CODES["int32"], _p(got))
    assert np.array_equal(got, levels)


# ---------------------------------------------------------------------------------------------
# Experiment smoke run


def test_gpu_check_tiny_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "experiments" / "gpu_check.py"), "--tiny", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["engine"] == "cpu" and res["bit_exact"]["all_equal"] is True
    assert res["throughput"] and all(row["validated"] for row in res["throughput"])
    assert (tmp_path / "gpu_check.md").read_text().startswith("# ")


# ---------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dq", [0, 8, 128])  # trellis sizes, 0: URQ
def test_gpu_kernels_equal_cpu_engine(dq):
    k = engine_gpu.kernels()
    rng = np.random.default_rng(31 + dq)
    for n, s in [(1, 1), (63, 64), (64, 64), (65, 64), (5000, 256), (100_000, 8192), (3, 7)]:
        for ngt in GT_FLAGS:
            _, _, want_payload, want_lengths, (payload, lengths, crcs, bad) = _encode_both(rng, k, n, s, dq, ngt)
            assert bad == -1
            assert k.to_host(payload).tobytes() == want_payload.tobytes()
            assert np.array_equal(k.to_host(lengths), want_lengths)


@pytest.mark.gpu
def test_gpu_container_roundtrip_and_errors():
    tensors = _model(np.random.default_rng(8))
    for kw in (dict(qp=-32), dict(qp=-36, dq=True, slice_size=64), dict(qp=-30, slice_size=1, num_gt_flags=0),
               dict(qp=-34, dq=64, slice_size=500)):
        data = gpucabac.encode(tensors, **kw)
        assert gpucabac.encode(tensors, **kw, device="gpu") == data
        for dtype in (None, "float16", "bfloat16"):
            want = gpucabac.decode(data, dtype=dtype)
            got = gpucabac.decode(data, dtype=dtype, device="gpu")
            for name in want:
                _same(engine_gpu.to_numpy(got[name], want[name].dtype.name), want[name], name)
    bad = bytearray(data)
    bad[-3] ^= 0x10
    with pytest.raises(FormatError, match="checksum mismatch"):
        gpucabac.decode(bytes(bad), device="gpu")


@pytest.mark.gpu
def test_gpu_dlpack_handoff_without_copy():
    import cupy

    w = (np.random.default_rng(0).standard_normal((64, 128)) * 0.05).astype(np.float32)
    out = gpucabac.decode(gpucabac.encode({"w": w}), device="gpu")["w"]
    assert isinstance(out, cupy.ndarray)
    again = cupy.from_dlpack(out)
    assert again.data.ptr == out.data.ptr
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        t = torch.from_dlpack(out)
        assert t.data_ptr() == out.data.ptr and t.is_cuda
        assert np.array_equal(t.cpu().numpy(), cupy.asnumpy(out))
