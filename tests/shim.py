"""The CUDA kernels' host/device code built for the CPU with g++ (tests/kernel_shim.cpp adds C
entry points), and `ShimKernels`: the GPU engine's kernel wrappers running those same per-thread
jobs on NumPy arrays, so that the GPU engine's orchestration runs in CI without a GPU."""

from __future__ import annotations

import ctypes
import hashlib
import pathlib
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest

from gpucabac.binarize import MAX_CONTEXTS
from gpucabac.engines import gpu as engine_gpu
from gpucabac.engines import kernel_source

SHIM = pathlib.Path(__file__).resolve().parent / "kernel_shim.cpp"
BF16 = np.dtype(ml_dtypes.bfloat16)

# ---------------------------------------------------------------------------------------------
# The g++ build of the kernels' host/device code


def build_shim(directory: pathlib.Path) -> ctypes.CDLL:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.fail("g++ is needed to compile the CUDA slice coder for the CPU (tests/kernel_shim.cpp)")
    kdir = kernel_source.kernel_dir()
    h = hashlib.sha256(SHIM.read_bytes())
    for name in kernel_source.KERNEL_FILES:
        h.update((kdir / name).read_bytes())
    lib = directory / f"gcshim-{h.hexdigest()[:16]}.so"
    cmd = [gxx, "-x", "c++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
           "-I", str(kdir), str(SHIM), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"g++ failed:\n{' '.join(cmd)}\n{r.stderr}"
    dll = ctypes.CDLL(str(lib))
    P, I64, I32, U32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_uint
    sigs = {
        "gc_shim_max_contexts": (I32, []),
        "gc_shim_ctx_pack": (U32, [I32, I32, I32, I32]),
        "gc_shim_ctx_update": (U32, [U32, I32]),
        "gc_shim_ctx_p": (I32, [U32]),
        "gc_shim_encode_slice": (I64, [P, I64, I32, I32, I32, P, P, I64]),
        "gc_shim_decode_slice": (I32, [P, I64, I64, I32, I32, I32, P, P]),
        "gc_shim_crc32": (U32, [P, I64]),
        "gc_shim_bound_table": (None, [P, I64, I64, I64, I32, I32, I32, P, P]),
        "gc_shim_encode_table": (None, [P, I64, I64, I64, I32, I32, I32, P, P, P, P, P]),
        "gc_shim_gather": (None, [P, P, P, P, I64, P]),
        "gc_shim_crc_table": (None, [P, P, P, I64, P]),
        "gc_shim_decode_table": (None, [I64] + [P] * 12),
        "gc_shim_f32_to_f16": (None, [P, I64, P]),
        "gc_shim_f64_to_f16": (None, [P, I64, P]),
        "gc_shim_f32_to_bf16": (None, [P, I64, P]),
        "gc_shim_f16_to_f32": (None, [P, I64, P]),
        "gc_shim_store": (None, [P, I64, ctypes.c_float, I32, I32, P]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = res, args
    return dll


def p(a: np.ndarray) -> int:
    """The address of a NumPy array's data, for the shim's pointer arguments."""
    return a.ctypes.data


class ShimKernels:
    """engine_gpu.Kernels on the CPU: the same argument checks, then the kernels' per-thread jobs
    (jobs.cuh) looped over the thread index by the g++ build. Arrays are NumPy arrays; to_device
    copies, so that the orchestration cannot rely on sharing host memory."""

    xp = np

    def __init__(self, lib):
        self.lib = lib

    def address(self, a):
        return p(a)

    def to_device(self, a):
        return np.array(a, copy=True)

    def to_host(self, a):
        return np.array(a, copy=True)

    def bfloat16_array(self, a):
        return a.view(BF16) if a.dtype == np.uint16 else a

    def bounds(self, levels, slice_size, dq, num_gt_flags, runs=False):
        engine_gpu.check_array(np, "levels", levels, np.int32, min_size=1)
        ns = -(-levels.size // slice_size)
        bound, bad = np.full(ns, -7, np.int64), np.full(ns, -7, np.int64)
        self.lib.gc_shim_bound_table(p(levels), levels.size, slice_size, ns, int(dq), num_gt_flags, int(bool(runs)),
                                     p(bound), p(bad))
        return bound, bad

    def encode(self, levels, slice_size, dq, num_gt_flags, init, scratch, scratch_offset, bound, runs=False):
        engine_gpu.check_array(np, "levels", levels, np.int32, min_size=1)
        ns = -(-levels.size // slice_size)
        engine_gpu.check_array(np, "init", init, np.uint8, size=MAX_CONTEXTS)
        engine_gpu.check_array(np, "scratch", scratch, np.uint8)
        engine_gpu.check_array(np, "scratch_offset", scratch_offset, np.int64, size=ns)
        engine_gpu.check_array(np, "bound", bound, np.int64, size=ns)
        assert int(scratch_offset[-1] + bound[-1]) <= scratch.size
        lengths = np.full(ns, -7, np.int64)
        self.lib.gc_shim_encode_table(p(levels), levels.size, slice_size, ns, int(dq), num_gt_flags, int(bool(runs)), p(init),
                                      p(scratch), p(scratch_offset), p(bound), p(lengths))
        return lengths

    def gather(self, scratch, src_offset, lengths, dst_offset, out):
        ns = lengths.size
        for name, a, dt in (("src_offset", src_offset, np.int64), ("lengths", lengths, np.int64), ("dst_offset", dst_offset, np.int64)):
            engine_gpu.check_array(np, name, a, dt, size=ns)
        if ns:
            assert int(dst_offset[-1] + lengths[-1]) <= out.size
        self.lib.gc_shim_gather(p(scratch), p(src_offset), p(lengths), p(dst_offset), ns, p(out))

    def crc(self, data, offsets, lengths):
        out = np.zeros(lengths.size, np.uint32)
        self.lib.gc_shim_crc_table(p(data), p(offsets), p(lengths), lengths.size, p(out))
        return out

    def decode(self, t):
        t.check(np)
        errors = np.full(t.num_slices, -7, np.int32)
        self.lib.gc_shim_decode_table(
            t.num_slices, p(t.payload), p(t.slice_offset), p(t.slice_length), p(t.slice_crc), p(t.slice_tensor),
            p(t.slice_first), p(t.slice_count), p(t.tensor_params), p(t.tensor_step), p(t.tensor_out),
            p(t.tensor_init), p(errors))
        return errors


