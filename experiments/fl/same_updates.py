"""NNCodec 2.1.3 on the very same updates a gpucabac method sends (issue 14, item 4): bytes per
round on identical tensors, beside gpucabac's own. It never changes a run: it records what the
run coded and codes it again afterwards.

1. `Recorder`, around a method's in-process run, keeps every coded update the run makes —
   the tensors handed to `encode_deltas` (the sparse differences, with error feedback folded in,
   and under "scaled" the scales' differences from 1), from `client_round` (an upload) or
   `aggregate` (a download). For the duration of its `with` it replaces
   `gpucabac.fl.protocol.encode_deltas` by a wrapper that calls it unchanged and keeps its
   arguments, telling uploads from downloads by the caller's name (gpucabac.fl is untouched; a
   caller it does not know is an error). When the round's history entry arrives (`on_round`), it writes
   their non-zeros to one .npz per message in a temp dir, checking that the messages are the
   round's (one upload per chosen client, each of the bytes that client sent; the download of
   the bytes the server made). Downloads sent as float32 (the unidirectional setting) are not
   coded and not recorded. Keeping the tensors costs no time inside the coding timers (a shallow
   dict copy); writing them is outside them, in the round's wall time (`seconds`) only.
2. `ours`: gpucabac again on each message with a zero base of the same shapes (a base changes
   the 32-byte digest, not the length): at the settings the method used (the bytes must equal
   those sent: the check that the record is what was coded) and at NNCodec's QP (URQ, the
   method's slice size), with its SNR and its levels of tensors of two or more dimensions.
3. `nncodec`: one call of `experiments/_nncodec_worker.py --messages` in NNCodec's venv codes
   every message in the order sent, as `nncodec.fl.encode` would at its defaults
   (methods_spec §6.1: diff_qp −26, nonweight_qp −75 for tensors of at most one dimension,
   qp_density 2, no DQ, param-opt on, TCA on against the same device's previous levels, parent
   signalling on, row skipping off, all-zero NDUs skipped), decodes each payload back and
   compares. Not applied: its sparsifier (§3.10). The tensors arrive sparse: its unstructured
   pass keeps them as they are (their zeros are above the 0.6 target, and its τ = Δ/2 first
   pass zeroes only what its quantizer zeroes), while its structured pass (filters whose mean
   |w| is below 0.9 of the average) would drop non-zeros our update sends, so it would no longer
   code the same update. Bytes are the NDUs' CABAC payloads with their QP bins; the NNR unit,
   MPS and NDU headers are not counted (as in compare_nncodec.py). Tensors keep our layout
   (Flax: a kernel's output channels last; NNCodec's rows are the first axis).

Without NNCodec's venv, or with GPUCABAC_NO_NNCODEC=1, step 3 is skipped (`nncodec_python` says
why; run.py prints it, and the JSON keeps it); steps 1–2 run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # experiments/, for nncodec_env
from nncodec_env import VENV_DIR, WORKER, nncodec_python_if_present  # noqa: E402

# nncodec.fl.nncargs as nnc.compress applies them to a differential update (methods_spec §6.1);
# the worker's FL_DEFAULTS, passed explicitly so that the JSON names what ran
NNCODEC_FL = {"qp": -26, "nonweight_qp": -75, "qp_density": 2, "dq": False, "lambda_scale": 0.0,
              "cabac_unary_length_minus1": 10, "param_opt": 1, "tca": True, "general_profile_idc": 1,
              "parent_node_id_present_flag": 1, "write_qp": True, "check_decode": True}
NNCODEC_NOTE = ("NNCodec 2.1.3 C++ core as nncodec.fl.encode at its defaults (diff_qp -26, nonweight_qp -75, "
                "qp_density 2, no DQ, param-opt, TCA, parent signalling, no row skipping, all-zero NDUs skipped); "
                "not its sparsifier (the updates arrive sparse); CABAC payloads + QP bins, NNR/NDU headers not counted")
DIRECTIONS = {"client_round": "up", "aggregate": "down"}


@dataclasses.dataclass
class Message:
    """One recorded update: who sent it and where its tensors' non-zeros are on disk."""

    round: int
    direction: str  # "up" (a client's upload) or "down" (the server's download)
    device: str  # "client-<partition>" or "server": the TCA base's owner
    file: str
    names: list[str]
    shapes: list[list[int]]
    sent_bytes: int
    settings: Any  # the CodingSettings the run coded it with

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        with np.load(self.file) as z:
            for i, (name, shape) in enumerate(zip(self.names, self.shapes)):
                t = np.zeros(int(np.prod(shape, dtype=np.int64)), np.float32)
                t[z[f"idx_{i}"]] = z[f"val_{i}"]
                out[name] = t.reshape(shape)
        return out


class Recorder:
    """Within `with Recorder(directory):` every coded `encode_deltas` call of gpucabac.fl.protocol
    is kept (the call itself unchanged); pass `on_round` to the run so that each round's messages
    are checked against its history entry and written to `directory`."""

    def __init__(self, directory: pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.messages: list[Message] = []
        self._pending: list[tuple[str, dict[str, np.ndarray], int, Any]] = []
        self._original: Callable | None = None

    def __enter__(self) -> Recorder:
        from gpucabac.fl import protocol

        self._original = protocol.encode_deltas
        protocol.encode_deltas = self._encode
        return self

    def __exit__(self, *exc) -> None:
        from gpucabac.fl import protocol

        protocol.encode_deltas = self._original

    def _encode(self, deltas, base, settings=None, **keywords):
        data = self._original(deltas, base, settings, **keywords)
        if not keywords.get("raw"):
            caller = sys._getframe(1).f_code.co_name
            if caller not in DIRECTIONS:
                raise RuntimeError(f"encode_deltas called from {caller!r}, neither a client's upload nor a download")
            self._pending.append((DIRECTIONS[caller], dict(deltas), len(data), settings))
        return data

    def on_round(self, entry: dict[str, Any]) -> None:
        if entry["round"] == 0:
            return
        pending, self._pending = self._pending, []
        ups = [p for p in pending if p[0] == "up"]
        downs = [p for p in pending if p[0] == "down"]
        clients = entry["clients"]
        sent = [int(c["upload-bytes"]) for c in entry["clients-detail"]]
        if len(ups) != len(clients) or [p[2] for p in ups] != sent:
            raise RuntimeError(f"round {entry['round']}: recorded uploads of {[p[2] for p in ups]} bytes, "
                               f"the clients {clients} sent {sent}")
        if len(downs) > 1 or (downs and downs[0][2] != int(entry["next-download-bytes"])):
            raise RuntimeError(f"round {entry['round']}: recorded downloads {[p[2] for p in downs]}, "
                               f"the server made {entry['next-download-bytes']} bytes")
        devices = [f"client-{c}" for c in clients] + ["server"] * len(downs)
        for (direction, tensors, nbytes, settings), device in zip(ups + downs, devices):
            self.messages.append(self._write(entry["round"], direction, device, tensors, nbytes, settings))

    def _write(self, rnd, direction, device, tensors, nbytes, settings) -> Message:
        path = self.directory / f"r{rnd:04d}_{len(self.messages):05d}_{direction}_{device}.npz"
        arrays, names, shapes = {}, [], []
        for i, (name, t) in enumerate(tensors.items()):
            flat = np.asarray(t, np.float32).ravel()
            idx = np.flatnonzero(flat)
            arrays[f"idx_{i}"], arrays[f"val_{i}"] = idx, flat[idx]
            names.append(name)
            shapes.append(list(np.shape(t)))
        np.savez(path, **arrays)
        return Message(rnd, direction, device, str(path), names, shapes, nbytes, settings)


# --- gpucabac on the recorded messages ------------------------------------------------------------


def _snr_db(ref: dict[str, np.ndarray], dec: dict[str, np.ndarray]) -> float | None:
    num = sum(float(np.sum(ref[n].astype(np.float64) ** 2)) for n in ref)
    err = sum(float(np.sum((dec.get(n, 0) - ref[n].astype(np.float64)) ** 2)) for n in ref)
    return None if num == 0 else (float("inf") if err == 0 else 10 * np.log10(num / err))


def ours(messages: list[Message], qp: int) -> list[dict[str, Any]]:
    """Per message: gpucabac's bytes at the method's settings (equal to those sent, else an error)
    and at NNCodec's QP `qp` (URQ, the method's slice size): the whole update, its CABAC payload
    alone, the SNR, and the sha256 of its int32 levels per tensor of two or more dimensions."""
    import gpucabac
    from gpucabac.fl.update import encode_deltas, read_header, read_update

    out = []
    for m in messages:
        tensors = m.tensors()
        base = {n: np.zeros(t.shape, np.float32) for n, t in tensors.items()}
        again = encode_deltas(tensors, base, m.settings)
        if len(again) != m.sent_bytes:
            raise RuntimeError(f"round {m.round} {m.direction} {m.device}: the recorded tensors code to {len(again)} "
                               f"bytes, the run sent {m.sent_bytes}")
        settings = m.settings.replace(qp=qp, quantizer="urq")
        data = encode_deltas(tensors, base, settings)
        payload = read_header(data)[2]
        described = gpucabac.info(payload) if len(payload) else None
        decoded = read_update(data, base).deltas
        step = float(gpucabac.step_from_qp(qp, settings.qp_density))
        levels = {n: hashlib.sha256(np.asarray(gpucabac.quantize_levels(t, step, dq=False, slice_size=None))
                                    .astype(np.int32).reshape(t.shape).tobytes()).hexdigest()
                  for n, t in tensors.items() if t.ndim >= 2}
        out.append({"bytes": len(data), "payload-bytes": 0 if described is None else
                    sum(int(t.coded_bytes) for t in described.tensors),
                    "snr-db": _snr_db(tensors, decoded), "levels": levels})
    return out


# --- NNCodec on the recorded messages -----------------------------------------------------------------


def nncodec_python() -> tuple[pathlib.Path | None, str | None]:
    """NNCodec's venv python, or None and why not (never builds it)."""
    if os.environ.get("GPUCABAC_NO_NNCODEC", "") not in ("", "0"):
        return None, "GPUCABAC_NO_NNCODEC is set"
    py = nncodec_python_if_present()
    return (py, None) if py else (None, f"no NNCodec venv at {VENV_DIR} (python experiments/nncodec_env.py builds it)")


def nncodec(messages: list[Message], python: pathlib.Path, directory: pathlib.Path,
            settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """NNCodec's bytes for every message, in the order sent (its TCA bases carry over per device);
    the worker's result JSON. RuntimeError when the worker fails or a payload does not decode."""
    directory = pathlib.Path(directory)
    manifest = {"settings": {**NNCODEC_FL, **(settings or {})},
                "messages": [{"file": m.file, "device": m.device, "names": m.names, "shapes": m.shapes}
                             for m in messages]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    r = subprocess.run([str(python), str(WORKER), "--messages", str(directory / "manifest.json"),
                        str(directory / "nncodec.json")], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"NNCodec worker failed (rc={r.returncode}):\n{r.stderr[-4000:]}")
    return json.loads((directory / "nncodec.json").read_text())


# --- the record in the run's JSON ----------------------------------------------------------------------


def compare(messages: list[Message], python: pathlib.Path | None, why_not: str | None,
            directory: pathlib.Path) -> dict[str, Any]:
    """Everything above for one method's messages: per round and direction the bytes as sent,
    gpucabac's at NNCodec's QP, NNCodec's (python None: skipped, `why_not` saying why); the JSON
    record `markdown_section` tabulates."""
    qp = NNCODEC_FL["qp"]
    mine = ours(messages, qp)
    theirs = None
    if python is not None:
        theirs = nncodec(messages, python, directory)
        if not theirs["all_roundtrip_ok"]:
            raise RuntimeError("NNCodec: a payload did not decode to its levels")
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for i, (m, o) in enumerate(zip(messages, mine)):
        row = rows.setdefault((m.round, m.direction), {
            "round": m.round, "direction": m.direction, "messages": 0, "sent-bytes": 0, "ours-bytes": 0,
            "ours-payload-bytes": 0, "ours-snr-db": [], "nncodec-bytes": None if theirs is None else 0,
            "nncodec-snr-db": [] if theirs else None, "nncodec-skipped-ndus": None if theirs is None else 0,
            "nncodec-tca-ndus": None if theirs is None else 0, "levels-differ": None if theirs is None else 0})
        row["messages"] += 1
        row["sent-bytes"] += m.sent_bytes
        row["ours-bytes"] += o["bytes"]
        row["ours-payload-bytes"] += o["payload-bytes"]
        row["ours-snr-db"].append(o["snr-db"])
        if theirs is not None:
            t = theirs["messages"][i]
            row["nncodec-bytes"] += t["bytes"]
            row["nncodec-skipped-ndus"] += sum(x["skipped"] for x in t["tensors"])
            row["nncodec-tca-ndus"] += sum(x["tca"] for x in t["tensors"])
            row["levels-differ"] += sum(x["levels_sha256"] != o["levels"][x["name"]] for x in t["tensors"]
                                        if x["name"] in o["levels"])
            num, err = sum(x["sq-ref"] for x in t["tensors"]), sum(x["sq-err"] for x in t["tensors"])
            row["nncodec-snr-db"].append(None if num == 0 else float("inf") if err == 0 else 10 * np.log10(num / err))
    for row in rows.values():  # the mean SNR over the round's messages, in dB
        for key in ("ours-snr-db", "nncodec-snr-db"):
            vals = [v for v in row[key] or [] if v is not None and np.isfinite(v)]
            row[key] = None if row[key] is None or not vals else float(np.mean(vals))
    return {"what": "bytes of the very updates this method sent, coded again by gpucabac and by NNCodec "
                    "(the training is this method's; nothing here changed it)",
            "nncodec": NNCODEC_NOTE if theirs is not None else None,
            "nncodec-settings": None if theirs is None else theirs["settings"],
            "nncodec-version": None if theirs is None else theirs["nncodec_version"],
            "nncodec-skipped": why_not if theirs is None else None, "qp": qp,
            "rounds": [rows[k] for k in sorted(rows, key=lambda k: (k[0], k[1] != "up"))]}


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:,.0f}"


def markdown_section(results: dict[str, Any], md_table: Callable) -> list[str]:
    """The Markdown lines of every method's same-updates record (none: no lines)."""
    recorded = {n: m["same-updates"] for n, m in results["methods"].items() if "same-updates" in m}
    if not recorded:
        return []
    any_rec = next(iter(recorded.values()))
    lines = ["## NNCodec 2.1.3 on the same updates", "",
             "Bytes of the very update tensors a method sent (uploads; downloads when they were coded), coded "
             "again: as sent (gpucabac at the method's QP), gpucabac at NNCodec's FL QP "
             f"({any_rec['qp']}, URQ) and NNCodec at its FL defaults. They do not change the training, which "
             "is the method's. NNCodec: " + (any_rec["nncodec"] or f"skipped ({any_rec['nncodec-skipped']})") + ". "
             "\"payload\": gpucabac's CABAC payloads alone, without its update header and tensor records (the part "
             "comparable to NNCodec's count); \"update\": the whole update as sent. "
             "SNR: mean over the round's messages of 10 log10(Σx² / Σ(x − x̂)²) of the tensors sent; "
             "\"levels ≠\": tensors of ≥ 2 dimensions whose NNCodec levels differ from gpucabac's at the same QP.",
             ""]
    rows = []

    def ratio(a, b):
        return "—" if a is None or not b else f"{a / b:.3f}"

    for name, rec in recorded.items():
        total: dict[str, dict[str, Any]] = {}
        for r in rec["rounds"]:
            nn = r["nncodec-bytes"]
            rows.append([name, str(r["round"]), r["direction"], str(r["messages"]), _fmt(r["sent-bytes"]),
                         _fmt(r["ours-bytes"]), _fmt(r["ours-payload-bytes"]), _fmt(nn),
                         ratio(nn, r["ours-payload-bytes"]), ratio(nn, r["ours-bytes"]),
                         "—" if r["ours-snr-db"] is None else f"{r['ours-snr-db']:.2f}",
                         "—" if r["nncodec-snr-db"] is None else f"{r['nncodec-snr-db']:.2f}",
                         "—" if r["levels-differ"] is None else str(r["levels-differ"])])
            t = total.setdefault(r["direction"], {"sent": 0, "ours": 0, "payload": 0, "nn": None})
            t["sent"] += r["sent-bytes"]
            t["ours"] += r["ours-bytes"]
            t["payload"] += r["ours-payload-bytes"]
            if nn is not None:
                t["nn"] = (t["nn"] or 0) + nn
        for direction, t in total.items():
            rows.append([f"**{name}**", "all", direction, "", _fmt(t["sent"]), _fmt(t["ours"]), _fmt(t["payload"]),
                         _fmt(t["nn"]), ratio(t["nn"], t["payload"]), ratio(t["nn"], t["ours"]), "", "", ""])
    qp = any_rec["qp"]
    lines += [md_table(["method", "round", "direction", "messages", "bytes as sent", f"gpucabac QP {qp}",
                        f"gpucabac QP {qp} payload", f"NNCodec (same updates) QP {qp}", "NNCodec / gpucabac payload",
                        "NNCodec / gpucabac update", "SNR gpucabac dB", "SNR NNCodec dB", "levels ≠"], rows), ""]
    return lines


__all__ = ["NNCODEC_FL", "Message", "Recorder", "compare", "markdown_section", "nncodec", "nncodec_python", "ours"]
