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

A second entry point codes federated updates as NNCodec's FL wrapper would (nncodec.fl.encode,
methods_spec §6.1), one message (one client's upload, or one server download) after another::

    python _nncodec_worker.py --messages MANIFEST.json RESULT.json

MANIFEST.json: {"settings": {...}, "messages": [{"file": NPZ, "device": str, "names": [...],
  "shapes": [...]}, ...]} in the order the messages were sent; each NPZ holds per tensor i its
  non-zeros as ``idx_i`` (int64 flat indices) and ``val_i`` (float32).  See ``main_messages``.
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
    return _write_result(result_path, s, all_ok, tensors=results)


# --- federated updates, as nncodec.fl.encode codes them -------------------------------------------

FL_DEFAULTS = {
    # nncodec.fl.nncargs (methods_spec §6.1) as nnc.compress applies them to a differential update
    "qp": -26,               # diff_qp: the QP of tensors with ndim >= 2 ("weight" type)
    "nonweight_qp": -75,     # tensors with ndim <= 1 (biases, BatchNorm, scales: "unspecified" type)
    "qp_density": 2,
    "dq": False,             # use_dq
    "lambda_scale": 0.0,
    "cabac_unary_length_minus1": 10,
    "param_opt": 1,
    "tca": True,             # temporal context adaptation against the device's previous levels
    "general_profile_idc": 1,
    "parent_node_id_present_flag": 1,  # compress_differences: one HDSP-off bypass bin per 2-D tensor
    "write_qp": True,
    "check_decode": True,
}


def _encode_fl(q: np.ndarray, qp: int, base: np.ndarray | None, s: dict) -> bytes:
    """One NDU's CABAC payload as nnc_core/coder/baseline.py encode() writes it for a differential
    update: the QP offset, then the levels (encodeLayer2, TCA, when a base of the same tensor from
    this device exists); row skipping off (chan_skip_list unused)."""
    enc = deepCABAC.Encoder()
    if s["write_qp"]:
        enc.iae_v(6 + s["qp_density"], qp - 0)  # mps_quantization_parameter = 0
    enc.initCtxModels(s["cabac_unary_length_minus1"] + 1, int(s["param_opt"]))
    chan_skip_list = np.zeros(q.shape[0], dtype=np.int32)
    args = (int(bool(s["dq"])), 0, s["general_profile_idc"], s["parent_node_id_present_flag"], 0, chan_skip_list,
            *_hdsp_off(), 0, 0)
    if base is None:
        enc.encodeLayer(q, *args)
    else:
        enc.encodeLayer2(q, base, *args)
    return enc.finish().tobytes()


def _decode_fl(data: bytes, shape, base: np.ndarray | None, s: dict) -> tuple[np.ndarray, int]:
    dec = deepCABAC.Decoder()
    dec.setStream(np.frombuffer(data, dtype=np.uint8).copy())
    qp = int(dec.iae_v(6 + s["qp_density"])) if s["write_qp"] else None
    dec.initCtxModels(s["cabac_unary_length_minus1"] + 1)
    out = np.zeros(shape, dtype=np.int32)
    args = (int(bool(s["dq"])), 0, s["general_profile_idc"], s["parent_node_id_present_flag"], *_hdsp_off(), 0, 0)
    if base is None:
        dec.decodeLayer(out, *args)
    else:
        dec.decodeLayer2(out, base, *args)
    dec.finish()
    return out, qp


def main_messages(manifest_path: str, result_path: str) -> int:
    """Code every message of the manifest in order, as nncodec.fl.encode (without its sparsifier:
    the tensors arrive sparse) would: per tensor one NDU, quantized with quantLayer at `qp`
    (ndim >= 2) or `nonweight_qp` (ndim <= 1); an NDU whose levels are all zero
    is skipped (0 bytes: parent signalling is on, the receiver fills in zeros, §3.8); under `tca`
    the levels of the device's last coded NDU of that tensor are the TCA base (§1.3, §3.8).
    Bytes are the NDUs' CABAC payloads (QP offset bins included; NNR unit, MPS and NDU headers
    not). With `check_decode` every payload is decoded (against the same base) and compared."""
    with open(manifest_path) as f:
        manifest = json.load(f)
    s = {**FL_DEFAULTS, **manifest.get("settings", {})}
    bases: dict[tuple[str, str], np.ndarray] = {}
    out_messages, all_ok = [], True
    for m in manifest["messages"]:
        rows, ok_msg = [], True
        t_msg = time.perf_counter()
        with np.load(m["file"]) as z:
            for i, (name, shape) in enumerate(zip(m["names"], m["shapes"])):
                shape = tuple(shape)
                w = np.zeros(int(np.prod(shape, dtype=np.int64)), np.float32)
                w[z[f"idx_{i}"]] = z[f"val_{i}"]
                w = w.reshape(shape or (1,))  # 0-dim: one element, as NNCodec makes scalars 1-element arrays
                qp_in = s["qp"] if len(shape) >= 2 else s["nonweight_qp"]
                q, qp = quantize(w, {**s, "qp": qp_in})
                deq = dequantize(q, qp, s)
                row = {"name": name, "numel": int(w.size), "qp": qp, "step": step_from_qp(qp, s["qp_density"]),
                       "nonzero": int(np.count_nonzero(q)), "sq-err": float(np.sum((deq.astype(np.float64) - w) ** 2)),
                       "sq-ref": float(np.sum(w.astype(np.float64) ** 2)),
                       "levels_sha256": hashlib.sha256(q.tobytes()).hexdigest()}
                if not q.any():  # a skipped NDU
                    row |= {"bytes": 0, "skipped": True, "tca": False}
                    rows.append(row)
                    continue
                key = (str(m["device"]), name)
                base = bases.get(key) if s["tca"] else None
                if base is not None and base.shape != q.shape:
                    raise ValueError(f"{name}: TCA base of shape {base.shape}, levels {q.shape}")
                data = _encode_fl(q, qp, base, s)
                if s["check_decode"]:
                    back, qp_back = _decode_fl(data, q.shape, base, s)
                    ok = bool(np.array_equal(back, q)) and (qp_back is None or qp_back == qp)
                    if not ok:
                        print(f"[nncodec_worker] ROUNDTRIP FAILURE on {name} (device {m['device']})", file=sys.stderr)
                    ok_msg &= ok
                    row["roundtrip_ok"] = ok
                bases[key] = q.copy()  # the next update's TCA base: this NDU's levels
                row |= {"bytes": len(data), "skipped": False, "tca": base is not None}
                rows.append(row)
        all_ok &= ok_msg
        out_messages.append({"device": m["device"], "bytes": sum(r["bytes"] for r in rows), "tensors": rows,
                             "roundtrip_ok": ok_msg, "seconds": time.perf_counter() - t_msg})
    return _write_result(result_path, s, all_ok, messages=out_messages)


def _write_result(result_path, settings, all_ok, **results) -> int:
    """The result JSON (settings, versions, `results`); exit status 3 when a round trip failed."""
    try:
        from importlib.metadata import version
        ver = version("nncodec")
    except Exception:  # pragma: no cover
        ver = "unknown"
    with open(result_path, "w") as f:
        json.dump({"settings": settings, "nncodec_version": ver, "numpy_version": np.__version__, **results,
                   "all_roundtrip_ok": all_ok}, f, indent=1)
    if not all_ok:
        print("[nncodec_worker] ERROR: at least one round trip failed", file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--messages":
        sys.exit(main_messages(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv))
