"""Harness around NNCodec 2.1.3's C++ core (``nncodec.extensions.deepCABAC``).

Runs INSIDE the private venv built by ``experiments/nncodec_env.py`` (numpy<2);
it must not import gpucabac.  Usage::

    python _nncodec_worker.py REQUEST.npz SETTINGS.json RESULT.json

REQUEST.npz holds arrays ``t0, t1, ...``: float32 weights (mode "quant") or
int32 levels (mode "levels"), in the order of ``settings["names"]``.  Levels
may be flat; they are reshaped to ``settings["shapes"][i]``.

SETTINGS.json keys (defaults in ``DEFAULTS``):
  names, shapes         tensor names / shapes (shapes needed for mode "levels")
  mode                  "quant": quantize with NNCodec's quantLayer, then code;
                        "levels": code the given int32 levels (reconstruction indices r)
  qp, qp_density        NNC QP and density (step = (k + qp mod k) 2^(qp>>d - d), k = 2^d)
  dq                    dependent quantization (trellis) on/off
  lambda_scale          quantizer's rate term (NNCodec default 0 = none)
  cabac_unary_length_minus1
                        10 as NNCodec 2 writes it; the quantizer gets it as is,
                        the coder gets it +1 (N = 11 greater-than flags)
  param_opt             ECO context-initialisation selection (NNCodec default 1)
  general_profile_idc   1 as nnc.compress sets it (writes a row_skip_enabled bypass bin
                        for 2-D tensors; row skipping itself stays off)
  write_qp              code the tensor's QP offset (6 + qp_density bypass bins, base QP 0)
                        ahead of the levels, as an NNC FLOAT NDU does
  repeats               timing repeats; best (minimum) time per tensor is kept
  output_npz            where to write ``levels_i`` (int32, tensor shape) and, in
                        mode "quant", ``dequant_i`` (float32, NNCodec's dequantLayer);
                        null to skip
  return_dequant        write dequant_i as well (mode "quant")

RESULT.json: {"settings": ..., "nncodec_version": ..., "tensors": [{name, numel,
  shape, qp, step, bytes, levels_sha256, t_quant, t_enc, t_dec, roundtrip_ok}, ...],
  "all_roundtrip_ok": bool}
Each tensor is coded as its own CABAC codeword (its own Encoder, terminate + flush),
as NNCodec codes one NDU per tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402
from nncodec.extensions import deepCABAC  # noqa: E402

DEFAULTS = {
    "mode": "quant",
    "qp": -32,
    "qp_density": 2,
    "dq": False,
    "lambda_scale": 0.0,
    "cabac_unary_length_minus1": 10,
    "param_opt": 1,
    "general_profile_idc": 1,
    "write_qp": True,
    "repeats": 3,
    "output_npz": None,
    "return_dequant": True,
}


def step_from_qp(qp: int, qp_density: int) -> float:
    """The C++ core's step: mul * 2^(shift - d) computed in double, stored as float32."""
    k = 1 << qp_density
    mul = k + (qp & (k - 1))
    shift = qp >> qp_density
    return float(np.float32(mul * 2.0 ** (shift - qp_density)))


def _hdsp_off():
    # nnc_core.hdsp.hdsp_tool.HDSP_OPTS_OFF()
    return [deepCABAC.HdspMode.AlwaysOff, np.array((0, 0), dtype=np.int8)]


def quantize(w: np.ndarray, s: dict) -> tuple[np.ndarray, int]:
    """As nnc_core/approximator/baseline.py: initCtxModels(minus1, 0); quantLayer(...)."""
    enc = deepCABAC.Encoder()
    q = np.zeros(w.shape, dtype=np.int32)
    enc.initCtxModels(s["cabac_unary_length_minus1"], 0)
    qp = enc.quantLayer(
        np.ascontiguousarray(w, dtype=np.float32).copy(),
        q,
        int(bool(s["dq"])),
        s["qp_density"],
        s["qp"],
        float(s["lambda_scale"]),
        s["cabac_unary_length_minus1"],
        0,  # scan_order
        s["general_profile_idc"],
    )
    return q, int(qp)


def dequantize(q: np.ndarray, qp: int, s: dict) -> np.ndarray:
    out = np.zeros(q.shape, dtype=np.float32)
    deepCABAC.Decoder().dequantLayer(out, q, s["qp_density"], qp, 0)
    return out


def encode(q: np.ndarray, qp: int, s: dict) -> bytes:
    """As nnc_core/coder/baseline.py encode() for one FLOAT NDU holding one tensor."""
    enc = deepCABAC.Encoder()
    if s["write_qp"]:
        enc.iae_v(6 + s["qp_density"], qp - 0)  # mps_quantization_parameter = 0
    enc.initCtxModels(s["cabac_unary_length_minus1"] + 1, int(s["param_opt"]))
    chan_skip_list = np.zeros(q.shape[0] if q.ndim else 1, dtype=np.int32)
    enc.encodeLayer(
        q,
        int(bool(s["dq"])),
        0,  # scan_order
        s["general_profile_idc"],
        0,  # parent_node_id_present_flag
        0,  # rowSkipFlag
        chan_skip_list,
        *_hdsp_off(),
        0,  # codebook_size
        0,  # codebook_zero_offset
    )
    return enc.finish().tobytes()


def decode(data: bytes, shape, s: dict) -> tuple[np.ndarray, int]:
    dec = deepCABAC.Decoder()
    buf = np.frombuffer(data, dtype=np.uint8).copy()
    dec.setStream(buf)
    qp = int(dec.iae_v(6 + s["qp_density"])) if s["write_qp"] else s["qp"]
    dec.initCtxModels(s["cabac_unary_length_minus1"] + 1)
    out = np.zeros(shape, dtype=np.int32)
    dec.decodeLayer(out, int(bool(s["dq"])), 0, s["general_profile_idc"], 0, *_hdsp_off(), 0, 0)
    dec.finish()
    return out, qp


def _best(fn, repeats: int):
    best, res = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def main(argv: list[str]) -> int:
    req_path, settings_path, result_path = argv[1:4]
    with open(settings_path) as f:
        s = {**DEFAULTS, **json.load(f)}
    names = s["names"]
    shapes = s.get("shapes") or [None] * len(names)
    reps = int(s["repeats"])
    out_arrays: dict[str, np.ndarray] = {}
    results = []
    all_ok = True
    with np.load(req_path) as req:
        for i, name in enumerate(names):
            a = req[f"t{i}"]
            r = {"name": name}
            if s["mode"] == "quant":
                w = np.ascontiguousarray(a, dtype=np.float32)
                t_q, (q, qp) = _best(lambda: quantize(w, s), reps)
                r["t_quant"] = t_q
                if qp != s["qp"]:
                    print(f"[nncodec_worker] {name}: QP clipped {s['qp']} -> {qp}", file=sys.stderr)
            elif s["mode"] == "levels":
                shape = tuple(shapes[i]) if shapes[i] is not None else a.shape
                q = np.ascontiguousarray(a, dtype=np.int32).reshape(shape)
                qp, r["t_quant"] = int(s["qp"]), None
            else:
                raise ValueError(f"unknown mode {s['mode']!r}")
            if q.ndim < 2:
                raise ValueError(f"{name}: harness codes tensors with ndim >= 2 only (got {q.shape})")
            t_e, data = _best(lambda: encode(q, qp, s), reps)
            t_d, (back, qp_back) = _best(lambda: decode(data, q.shape, s), reps)
            ok = bool(np.array_equal(back, q)) and qp_back == qp
            if not ok:
                all_ok = False
                print(f"[nncodec_worker] ROUNDTRIP FAILURE on {name}: "
                      f"{int(np.count_nonzero(back != q))} levels differ, qp {qp} -> {qp_back}",
                      file=sys.stderr, flush=True)
            r.update(
                numel=int(q.size), shape=list(q.shape), qp=qp, step=step_from_qp(qp, s["qp_density"]),
                bytes=len(data), levels_sha256=hashlib.sha256(q.tobytes()).hexdigest(),
                t_enc=t_e, t_dec=t_d, roundtrip_ok=ok,
            )
            results.append(r)
            if s["output_npz"]:
                out_arrays[f"levels_{i}"] = q
                if s["mode"] == "quant" and s["return_dequant"]:
                    out_arrays[f"dequant_{i}"] = dequantize(q, qp, s)
    if s["output_npz"]:
        np.savez(s["output_npz"], **out_arrays)
    try:
        from importlib.metadata import version
        ver = version("nncodec")
    except Exception:  # pragma: no cover
        ver = "unknown"
    with open(result_path, "w") as f:
        json.dump({"settings": s, "nncodec_version": ver, "numpy_version": np.__version__,
                   "tensors": results, "all_roundtrip_ok": all_ok}, f, indent=1)
    if not all_ok:
        print("[nncodec_worker] ERROR: at least one round trip failed", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
