"""The `gpucabac` command on tiny random models: encode, decode, info, demo and error handling."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import gpucabac
from gpucabac import cli
from gpucabac.metrics import tensors_snr_db
from gpucabac import io as gio

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tiny_model():
    rng = np.random.default_rng(7)
    return {
        "layer.weight": (rng.standard_normal((40, 30)) * 0.05).astype(np.float32),
        "embedding": (rng.standard_normal((70, 100)) * 0.05).astype(np.float32),  # > one default slice
        "layer.bias": (rng.standard_normal(30) * 0.01).astype(np.float32),
        "half": (rng.standard_normal((3, 50)) * 0.1).astype(np.float16),
        "brain": (rng.standard_normal(77) * 0.1).astype(BF16),
        "position_ids": np.arange(64, dtype=np.int64).reshape(1, 64),
        "mask": rng.standard_normal(9) > 0,
    }


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny.safetensors"
    gio.write_model(path, _tiny_model())
    return path


def run(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    return result


def _float_after(pattern, text):
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return float(m.group(1))


# --- encode / info / decode -------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, settings",
    [
        ([], dict(qp=-32)),
        (["--qp", "-36", "--dq"], dict(qp=-36, dq=True)),
        (["--qp", "-34", "--trellis", "32"], dict(qp=-34, dq=32)),
        (["--qp", "-30", "--scan", "auto"], dict(qp=-30, scan="auto")),
        (["--qp", "-34", "--dq", "--trellis", "8"], dict(qp=-34, dq=True)),
        (["--step", "0.004", "--slice-size", "whole"], dict(step=0.004, slice_size=None)),
        (["--qp", "-30", "--slice-size", "100", "--gt-flags", "3", "--threads", "1"],
         dict(qp=-30, slice_size=100, num_gt_flags=3, threads=1)),
        (["--small-step", "lossless", "--qp-density", "3", "--qp", "-60"],
         dict(small_step="lossless", qp_density=3, qp=-60)),
        (["--small-step", "0.001", "--no-dq"], dict(small_step=0.001)),
    ],
)
def test_encode_writes_the_stream_the_api_writes(tmp_path, model_file, options, settings):
    out = tmp_path / "m.gcb"
    result = run("encode", model_file, "-o", out, *options)
    assert result.exit_code == 0, result.output
    tensors = gio.read_model(model_file)
    data = out.read_bytes()
    assert data == gpucabac.encode(tensors, **settings)
    slices = {t.name: t.num_slices for t in gpucabac.info(data).tensors}
    size = settings.get("slice_size", gpucabac.DEFAULT_SLICE_SIZE)
    assert slices["embedding"] == (1 if size is None else math.ceil(7000 / size))

    weights = sum(t.size for t in tensors.values())
    line = result.stdout.strip()
    assert f"{weights:,} weights" in line
    assert _float_after(r"([\d.]+) bits/weight", line) == pytest.approx(8 * len(data) / weights, abs=5e-4)
    raw = sum(t.nbytes for t in tensors.values())
    assert _float_after(r"ratio ([\d.]+)x", line) == pytest.approx(raw / len(data), abs=5e-3)
    decoded = gpucabac.decode(data)
    assert _float_after(r"SNR ([\d.]+) dB", line) == pytest.approx(tensors_snr_db(tensors, decoded), abs=5e-3)
    assert re.search(r"[\d.]+ M weights/s", line)


def test_encode_with_importance_sets_steps_per_tensor(tmp_path, model_file):
    tensors = gio.read_model(model_file)
    rng = np.random.default_rng(1)
    imp = {"layer.weight": rng.uniform(0, 2, (40, 30)).astype(np.float32) * 16,  # 16x the importance
           "embedding": rng.uniform(0, 2, (70, 100)).astype(np.float32),
           "layer.bias": np.ones(30, np.float32)}  # 1-D: keeps the small step
    imp_file = tmp_path / "imp.npz"
    gio.write_model(imp_file, imp)
    out = tmp_path / "m.gcb"
    result = run("encode", model_file, "-o", out, "--qp", "-32", "--dq", "--importance", imp_file)
    assert result.exit_code == 0, result.output
    steps = gpucabac.steps_from_importance(imp, gpucabac.step_from_qp(-32))
    assert set(steps) == {"layer.weight", "embedding"}
    assert steps["embedding"] / steps["layer.weight"] == pytest.approx(4.0, rel=0.02)
    data = out.read_bytes()
    base = gpucabac.CodingSettings(qp=-32, quantizer="dq")
    per_tensor = {name: base.replace(step=step) for name, step in steps.items()}
    assert data == gpucabac.encode(tensors, base, per_tensor=per_tensor)
    got = {t.name: t.step for t in gpucabac.info(data).tensors}
    assert got["layer.weight"] == pytest.approx(steps["layer.weight"])
    assert got["layer.bias"] == pytest.approx(gpucabac.step_from_qp(-32) / 16)

    weighted = tmp_path / "w.gcb"
    result = run("encode", model_file, "-o", weighted, "--qp", "-32", "--dq", "--importance", imp_file, "--weighted")
    assert result.exit_code == 0, result.output
    smooth = {k: gpucabac.smooth_importance(v) for k, v in imp.items() if v.ndim == 2}
    assert weighted.read_bytes() == gpucabac.encode(tensors, base, per_tensor=per_tensor, importance=smooth)


@pytest.mark.parametrize("imp, message", [
    ({"nope": np.ones((2, 2), np.float32)}, "'nope' is not a tensor of the model"),
    ({"embedding": np.ones((100, 70), np.float32)}, "has shape (100, 70), the tensor (70, 100)"),
    ({"layer.bias": np.ones(30, np.float32)}, "no array of two or more dimensions"),
    ({"embedding": -np.ones((70, 100), np.float32)}, "finite and non-negative"),
])
def test_encode_rejects_a_bad_importance_file(tmp_path, model_file, imp, message):
    imp_file = tmp_path / "imp.safetensors"
    gio.write_model(imp_file, imp)
    out = tmp_path / "m.gcb"
    result = run("encode", model_file, "-o", out, "--importance", imp_file)
    assert result.exit_code == 1
    assert message in result.output
    assert not out.exists()


def test_weighted_needs_importance(tmp_path, model_file):
    result = run("encode", model_file, "-o", tmp_path / "m.gcb", "--weighted")
    assert result.exit_code == 2 and "--weighted needs --importance" in result.output


# --- sweep, then encode at a target -------------------------------------------------------------


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A model, an importance file (layer.weight 30x as important as the rest) and a sweep of both."""
    d = tmp_path_factory.mktemp("swept")
    tensors = _tiny_model()
    gio.write_model(d / "tiny.safetensors", tensors)
    rng = np.random.default_rng(2)
    imp = {k: (rng.uniform(0.5, 1.5, tensors[k].shape) * (30.0 if k == "layer.weight" else 1.0)).astype(np.float32)
           for k in ("layer.weight", "embedding", "half")}
    gio.write_model(d / "imp.safetensors", imp)
    result = run("sweep", d / "tiny.safetensors", "-o", d / "s.json", "--qp-range", "-36:-20", "--lams", "0,0.1",
                 "--slice-size", "1024", "--importance", d / "imp.safetensors")
    assert result.exit_code == 0, result.output
    return d, tensors, imp


@pytest.mark.parametrize("target", [["--target-bpw", "4"], ["--target-snr", "24"], ["--target-bpw", "3.5", "--no-dq"],
                                    ["--target-bpw", "4", "--one-setting"]])
def test_encode_at_the_sweeps_operating_point(tmp_path, swept, target):
    d, tensors, imp = swept
    out = tmp_path / "m.gcb"
    result = run("encode", d / "tiny.safetensors", "-o", out, "--sweep", d / "s.json", "--importance",
                 d / "imp.safetensors", *target)
    assert result.exit_code == 0, result.output
    res = gpucabac.SweepResult.from_json(d / "s.json")
    assert res.settings["importance"] and res.settings["tensor_weights"]["layer.weight"] > 10
    key, value = target[0][len("--target-"):].replace("snr", "snr_db"), float(target[1])
    methods = ["urq"] if "--no-dq" in target else ["urq", "dq"]
    points = []
    for m in methods:
        try:
            points.append(gpucabac.choose_operating_point(res, m, per_tensor="--one-setting" not in target,
                                                          **{f"target_{key}": value}))
        except gpucabac.InputError:  # this method cannot meet the target
            continue
    # the method that meets the target best: least weighted error for a rate, fewest bits for a quality
    op = min(points, key=lambda p: p.wsse if key == "bpw" else p.bits)
    shapes = {k: gpucabac.smooth_importance(np.asarray(a, np.float64)) for k, a in imp.items()}
    data = out.read_bytes()
    assert op.slice_size == 1024
    assert data == gpucabac.encode(tensors, op.coding_settings(), per_tensor=op.per_tensor(), importance=shapes)
    coded = sum(8 * (t.coded_bytes + t.header_bytes) for t in gpucabac.info(data).tensors if t.name in op.steps)
    assert coded == op.bits  # the sweep's exact rate is the coder's
    if key == "bpw":
        assert coded <= value * op.numel
    else:
        assert op.snr_db >= value
    if "--one-setting" in target:
        assert len(set(op.steps.values())) == 1
    else:  # the 30x more important tensor gets a finer step
        assert op.steps["layer.weight"] < op.steps["embedding"]
    assert f"predicted {op.bpw:.3f} bits/weight (exact)" in result.output
    assert f"swept tensors: {op.bpw:.3f} bits/weight" in result.output


def test_importance_buys_weighted_error_at_the_same_rate(tmp_path, swept):
    """Per-tensor steps chosen with importance: less importance-weighted error than one setting
    for all tensors, at no more bits."""
    d, _, _ = swept
    res = gpucabac.SweepResult.from_json(d / "s.json")
    per_tensor = gpucabac.choose_operating_point(res, "dq", target_bpw=4.0)
    one = gpucabac.choose_operating_point(res, "dq", target_bpw=4.0, per_tensor=False)
    assert per_tensor.bits <= 4.0 * per_tensor.numel and one.bits <= 4.0 * one.numel
    assert per_tensor.wsse < 0.8 * one.wsse


@pytest.mark.parametrize("extra, code, message", [
    (["--target-bpw", "4"], 1, "the sweep was run with --importance"),
    (["--target-bpw", "4", "--importance", "{d}/tiny.safetensors"], 1, "not the importance file the sweep was run with"),
    (["--target-bpw", "0.05", "--importance", "{d}/imp.safetensors"], 1, "meets the target"),
    (["--target-bpw", "4", "--target-snr", "20"], 2, "exactly one of --target-bpw"),
    (["--target-bpw", "4", "--lam", "0.1"], 2, "--sweep sets --lam from the sweep"),
    (["--target-bpw", "4", "--slice-size", "512", "--weighted", "--importance", "{d}/imp.safetensors"], 2, "--sweep sets --weighted, --slice-size"),
])
def test_encode_at_a_target_rejects_bad_requests(tmp_path, swept, extra, code, message):
    d, _, _ = swept
    out = tmp_path / "m.gcb"
    result = run("encode", d / "tiny.safetensors", "-o", out, "--sweep", d / "s.json", *[e.format(d=d) for e in extra])
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not out.exists()


def test_encode_at_a_target_checks_the_sweep_file_and_model(tmp_path, swept):
    d, tensors, _ = swept
    out = tmp_path / "m.gcb"
    assert "need --sweep" in run("encode", d / "tiny.safetensors", "-o", out, "--target-bpw", "4").output
    urq_only = gpucabac.SweepResult.from_json(d / "s.json")
    urq_only.settings["methods"] = ["urq"]
    urq_only.rows = [r for r in urq_only.rows if r["method"] == "urq"]
    urq_only.to_json(tmp_path / "urq.json")
    result = run("encode", d / "tiny.safetensors", "-o", out, "--sweep", tmp_path / "urq.json", "--target-bpw", "6",
                 "--importance", d / "imp.safetensors", "--dq")
    assert result.exit_code == 1 and "the sweep has no dq settings (it has urq)" in result.output
    no_slices = gpucabac.SweepResult.from_json(d / "s.json")
    del no_slices.settings["slice_size"]
    no_slices.to_json(tmp_path / "no_slices.json")
    result = run("encode", d / "tiny.safetensors", "-o", out, "--sweep", tmp_path / "no_slices.json", "--target-bpw", "6",
                 "--importance", d / "imp.safetensors")
    assert result.exit_code == 1 and "the sweep does not record its slice_size" in result.output
    (tmp_path / "x.json").write_text('{"kind": "something else"}')
    (tmp_path / "rows.json").write_text(json.dumps({"kind": "gpucabac-sweep", "tensors": [{"tensor": "a"}]}))
    result = run("encode", d / "tiny.safetensors", "-o", out, "--sweep", tmp_path / "rows.json", "--target-bpw", "4")
    assert result.exit_code == 1 and "tensors[0] lacks method, step, lam" in result.output
    result = run("encode", d / "tiny.safetensors", "-o", out, "--sweep", tmp_path / "x.json", "--target-bpw", "4")
    assert result.exit_code == 1 and "not a sweep file" in result.output
    (tmp_path / "y.json").write_bytes(b"\x00garbage")
    result = run("encode", d / "tiny.safetensors", "-o", out, "--sweep", tmp_path / "y.json", "--target-bpw", "4")
    assert result.exit_code == 1 and "not a sweep file (not JSON" in result.output
    other = dict(tensors, embedding=tensors["embedding"] * np.float32(1.01))
    gio.write_model(tmp_path / "other.safetensors", other)
    result = run("encode", tmp_path / "other.safetensors", "-o", out, "--sweep", d / "s.json", "--target-bpw", "4",
                 "--importance", d / "imp.safetensors")
    assert result.exit_code == 1 and "other weights for 'embedding'" in result.output
    assert not out.exists()


def test_sweep_needs_importance_for_every_swept_tensor(tmp_path, swept):
    d, _, imp = swept
    gio.write_model(tmp_path / "part.safetensors", {"embedding": imp["embedding"]})
    result = run("sweep", d / "tiny.safetensors", "-o", tmp_path / "s.json", "--qp-range", "-30:-30", "--lams", "0",
                 "--methods", "urq", "--importance", tmp_path / "part.safetensors")
    assert result.exit_code == 1 and "no array for the swept tensor(s) 'layer.weight', 'half'" in result.output
    assert not (tmp_path / "s.json").exists()


def test_encode_then_decode_gives_the_quantized_model(tmp_path, model_file):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb, "--qp", "-34").exit_code == 0
    tensors = gio.read_model(model_file)
    expected = gpucabac.quantize(tensors, qp=-34)
    for ext in ("safetensors", "npz"):
        out = tmp_path / f"back.{ext}"
        result = run("decode", gcb, "-o", out)
        assert result.exit_code == 0, result.output
        back = gio.read_model(out)
        assert list(back) == list(tensors)
        for name in tensors:
            assert back[name].dtype == expected[name].dtype, name
            np.testing.assert_array_equal(back[name], expected[name])
        weights = sum(t.size for t in tensors.values())
        assert re.search(rf"{len(tensors)} tensors, {weights:,} weights decoded in [\d.]+ s", result.stdout)


def test_decode_names_and_dtype(tmp_path, model_file):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb).exit_code == 0
    out = tmp_path / "part.npz"
    result = run("decode", gcb, "-o", out, "--names", "half,layer.weight", "--dtype", "bfloat16")
    assert result.exit_code == 0, result.output
    back = gio.read_model(out)
    want = gpucabac.decode(gcb.read_bytes(), ["half", "layer.weight"], dtype=BF16)
    assert sorted(back) == ["half", "layer.weight"]
    for name in back:
        assert back[name].dtype == BF16
        np.testing.assert_array_equal(back[name], want[name])


def test_decode_unknown_name_fails_cleanly(tmp_path, model_file):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb).exit_code == 0
    result = run("decode", gcb, "-o", tmp_path / "x.npz", "--names", "layer.bias,nope")
    assert result.exit_code == 1
    assert "gpucabac: error:" in result.stderr and "'nope'" in result.stderr
    assert not (tmp_path / "x.npz").exists()


def test_info_lists_every_tensor_and_totals(tmp_path, model_file):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb, "--slice-size", "256").exit_code == 0
    result = run("info", gcb)
    assert result.exit_code == 0, result.output
    meta = gpucabac.info(gcb.read_bytes())
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "dtype", "shape", "mode", "scan", "zeros", "step", "slices", "bytes", "bits/weight"]
    rows = {line.split()[0]: line.split() for line in lines[2 : 2 + len(meta.tensors)]}
    assert list(rows) == [t.name for t in meta.tensors]
    for t in meta.tensors:
        row = rows[t.name]
        assert row[1] == t.dtype and row[3] == t.mode and row[4] == t.scan and row[5] == t.zeros
        assert int(row[7]) == t.num_slices and int(row[8].replace(",", "")) == t.coded_bytes
        # a tensor's bits/weight counts its header record, as TensorInfo.bits_per_weight does
        assert row[9] == (f"{t.bits_per_weight:.3f}" if t.numel else "-")
    assert rows["layer.weight"][2] == "40x30" and int(rows["layer.weight"][7]) == math.ceil(1200 / 256)
    weights = sum(math.prod(t.shape) for t in meta.tensors)
    assert f"{len(meta.tensors)} tensors, {weights:,} weights, {meta.total_bytes:,} bytes" in lines[-1]
    coded = sum(t.coded_bytes for t in meta.tensors)
    assert f"({coded:,} coded, {meta.total_bytes - coded:,} of header: " in lines[-1]
    assert meta.total_bytes == gcb.stat().st_size


# --- demo ---------------------------------------------------------------------------------------


def test_demo_on_a_tiny_model_verifies_every_setting(model_file):
    result = run("demo", "--model", model_file, "--threads", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    table = [line for line in lines if line.startswith(("URQ", "DQ"))]
    assert len(table) == 5
    for line in table:
        assert line.split()[-1] == "yes", line
    assert any("whole tensors" in line for line in table)
    # a finer step costs more bits: QP -38 above QP -32
    urq32, urq38 = (float(next(x for x in table if x.startswith(f"URQ QP {q} S=")).split()[-6]) for q in ("-32", "-38"))
    assert urq38 > urq32


def test_demo_fails_when_a_decoded_tensor_differs(model_file, monkeypatch):
    real = gpucabac.quantize

    def off_by_one_step(tensors, *args, **kwargs):
        out = dict(real(tensors, *args, **kwargs))
        if "position_ids" in out:  # the demo checks tensor by tensor
            out["position_ids"] = out["position_ids"] + 1
        return out

    monkeypatch.setattr(gpucabac, "quantize", off_by_one_step)
    result = run("demo", "--model", model_file)
    assert result.exit_code == 1
    assert [line.split()[-1] for line in result.stdout.splitlines() if line.startswith(("URQ", "DQ"))] == ["no"] * 5
    assert "gpucabac: error: decoded tensors differ" in result.stderr and "'position_ids'" in result.stderr


def test_demo_reports_a_stream_that_fails_to_decode(model_file, monkeypatch):
    real = gpucabac.encode

    def corrupting(tensors, settings, **kwargs):
        data = bytearray(real(tensors, settings, **kwargs))
        if settings.dq and "layer.weight" in tensors:  # not the demo's warm-up
            data[-3] ^= 0xFF  # inside the last tensor's payload: its checksum no longer matches
        return bytes(data)

    monkeypatch.setattr(gpucabac, "encode", corrupting)
    result = run("demo", "--model", model_file)
    assert result.exit_code == 1
    rows = [line.rsplit(maxsplit=6) for line in result.stdout.splitlines() if line.startswith(("URQ", "DQ"))]
    verdicts = {row[0].split(" S=")[0]: row[-1] for row in rows}
    assert verdicts == {"URQ QP -32": "yes", "URQ QP -38": "yes", "DQ QP -36": "no", "DQ QP -32": "no",
                        "URQ QP -32 whole tensors": "yes"}
    assert "decode failed" in result.stderr


# --- errors -------------------------------------------------------------------------------------


def test_missing_model_is_a_clean_error(tmp_path):
    result = run("encode", tmp_path / "nope.safetensors", "-o", tmp_path / "x.gcb")
    assert result.exit_code == 1
    assert result.stderr.startswith("gpucabac: error: ") and "nope.safetensors: no such file" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.gcb").exists()


def test_corrupt_container_is_a_clean_error(tmp_path, model_file):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb).exit_code == 0
    bad = tmp_path / "bad.gcb"
    bad.write_bytes(gcb.read_bytes()[:-7])
    for args in (["info", bad], ["decode", bad, "-o", tmp_path / "o.npz"]):
        result = run(*args)
        assert result.exit_code == 1, args
        assert result.stderr.startswith("gpucabac: error: "), result.stderr
    assert not (tmp_path / "o.npz").exists()
    (tmp_path / "junk.gcb").write_bytes(b"not a container")
    assert run("info", tmp_path / "junk.gcb").exit_code == 1


def test_unwritable_output_is_a_clean_error(tmp_path, model_file):
    result = run("encode", model_file, "-o", tmp_path / "no" / "dir" / "m.gcb")
    assert result.exit_code == 1
    assert result.stderr.startswith("gpucabac: error: ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["encode", "{model}", "-o", "{tmp}/m.gcb", "--qp", "-30", "--step", "0.01"], "not both"),
        (["encode", "{model}", "-o", "{tmp}/m.gcb", "--slice-size", "0"], "must be positive"),
        (["encode", "{model}", "-o", "{tmp}/m.gcb", "--slice-size", "big"], "neither a number"),
        (["encode", "{model}", "-o", "{tmp}/m.gcb", "--small-step", "-1"], "positive finite"),
        (["encode", "{model}", "-o", "{tmp}/m.gcb", "--step", "0"], "--step"),
        (["encode", "{model}", "-o", "{tmp}/m.gcb", "--no-dq", "--trellis", "16"], "contradicts --no-dq"),
        (["encode", "{model}", "-o", "{tmp}/m.gcb", "--trellis", "12"], "'12' is not one of"),
        (["encode", "{model}"], "Missing option '-o'"),
        (["decode", "{model}", "-o", "{tmp}/out.bin"], "unknown model file extension '.bin'"),
        (["decode", "{model}", "-o", "{tmp}/out.npz", "--dtype", "int8"], "--dtype"),
    ],
)
def test_usage_errors_exit_2(tmp_path, model_file, args, message):
    args = [a.format(model=model_file, tmp=tmp_path) for a in args]
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "m.gcb").exists()


def test_python_m_gpucabac_is_the_command():
    r = subprocess.run([sys.executable, "-m", "gpucabac", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all(c in r.stdout for c in ("encode", "decode", "info", "demo", "sweep", "plot"))


def test_encode_device_and_gt_flag_bound(tmp_path, model_file, monkeypatch):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb, "--device", "cpu").exit_code == 0
    assert run("encode", model_file, "-o", tmp_path / "auto.gcb", "--device", "auto").exit_code == 0
    assert (tmp_path / "auto.gcb").read_bytes() == gcb.read_bytes()
    from gpucabac.engines import gpu as engine_gpu

    monkeypatch.setattr(engine_gpu, "unavailable_reason", lambda: "no CUDA device (test)")
    result = run("encode", model_file, "-o", tmp_path / "g.gcb", "--device", "gpu")
    assert result.exit_code == 1 and "no CUDA device (test)" in result.stderr
    assert not (tmp_path / "g.gcb").exists()
    for command in (["encode", model_file, "-o", tmp_path / "x.gcb"], ["sweep", model_file, "-o", tmp_path / "x.json"]):
        result = run(*command, "--gt-flags", "21")
        assert result.exit_code == 2 and "0<=x<=20" in result.stderr


def test_help_and_version():
    result = run("--help")
    assert result.exit_code == 0
    for command in ("encode", "decode", "info", "demo"):
        assert command in result.stdout
    result = run("--version")
    assert result.exit_code == 0 and "gpucabac" in result.stdout


# --- the SNR the summaries report ---------------------------------------------------------------


def test_snr_db():
    w = {"a": np.array([3.0, 4.0], np.float32), "i": np.array([100, 200], np.int64)}
    assert tensors_snr_db(w, {"a": np.array([3.0, 4.0], np.float32), "i": w["i"] * 0}) == math.inf  # ints ignored
    assert tensors_snr_db(w, {"a": np.array([3.0, 3.0], np.float32), "i": w["i"]}) == pytest.approx(
        10 * math.log10(25 / 1)
    )
    b = {"b": np.array([1.0, 1.0], BF16)}
    assert tensors_snr_db(b, {"b": np.array([1.0, 0.0], BF16)}) == pytest.approx(10 * math.log10(2))
    assert math.isnan(tensors_snr_db({"i": np.arange(3)}, {"i": np.arange(3)}))


# --- never clobber, and the output checked before the work ----------------------------------------


def test_encode_refuses_to_overwrite_its_input(tmp_path, model_file, monkeypatch):
    before = model_file.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(model_file)
    monkeypatch.setattr(gpucabac, "encode", lambda *a, **k: pytest.fail("encode ran before the output was checked"))
    for out in (model_file, link):
        for extra in ([], ["--force"]):
            result = run("encode", model_file, "-o", out, *extra)
            assert result.exit_code == 1, result.output
            assert "refusing to overwrite the input file" in result.stderr
    assert model_file.read_bytes() == before


def test_an_existing_output_needs_force(tmp_path, model_file):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb, "--qp", "-30").exit_code == 0
    first = gcb.read_bytes()
    result = run("encode", model_file, "-o", gcb, "--qp", "-36")
    assert result.exit_code == 1 and "already exists; give --force (-f)" in result.stderr
    assert gcb.read_bytes() == first
    assert run("encode", model_file, "-o", gcb, "--qp", "-36", "-f").exit_code == 0
    assert gcb.read_bytes() != first
    out = tmp_path / "back.npz"
    assert run("decode", gcb, "-o", out).exit_code == 0
    result = run("decode", gcb, "-o", out)
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert run("decode", gcb, "-o", out, "--force").exit_code == 0
    result = run("decode", gcb, "-o", gcb.with_suffix(".npz").parent / "m.gcb")
    assert result.exit_code == 2  # .gcb is not a model file extension: a usage error


def test_output_problems_are_found_before_the_work(tmp_path, model_file, monkeypatch):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb).exit_code == 0
    monkeypatch.setattr(gpucabac, "encode", lambda *a, **k: pytest.fail("encode ran"))
    monkeypatch.setattr(gpucabac, "load", lambda *a, **k: pytest.fail("decode ran"))
    monkeypatch.setattr(gpucabac, "sweep", lambda *a, **k: pytest.fail("sweep ran"))
    missing = tmp_path / "no" / "such"
    for args, message in (
        (["encode", model_file, "-o", missing / "m.gcb"], "does not exist"),
        (["decode", gcb, "-o", missing / "m.npz"], "does not exist"),
        (["sweep", model_file, "-o", missing / "s.json"], "does not exist"),
        (["sweep", model_file, "-o", tmp_path / "s.json", "--csv", gcb], "already exists"),
    ):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert "gpucabac: error:" in result.stderr and message in result.stderr, (args, result.stderr)
    assert run("encode", model_file, "-o", tmp_path).exit_code == 2  # a folder as the output: click's usage error
    if importlib.util.find_spec("torch") is None:
        result = run("decode", gcb, "-o", tmp_path / "m.pt")
        assert result.exit_code == 1 and "needs PyTorch" in result.stderr


@pytest.mark.parametrize("args", [
    ["encode", "{tmp}/missing.safetensors", "-o", "{tmp}/m.gcb"],
    ["decode", "{tmp}/missing.gcb", "-o", "{tmp}/m.npz"],
    ["info", "{tmp}/missing.gcb"],
    ["sweep", "{tmp}/missing.safetensors", "-o", "{tmp}/s.json"],
    ["plot", "{tmp}/missing.json", "-o", "{tmp}/rd.png"],
    ["encode", "{model}", "-o", "{tmp}/m.gcb", "--importance", "{tmp}/missing.npz"],
    ["encode", "{model}", "-o", "{tmp}/m.gcb", "--sweep", "{tmp}/missing.json", "--target-bpw", "4"],
])
def test_a_missing_input_is_an_error_of_status_1_for_every_command(tmp_path, model_file, args):
    result = run(*[a.format(model=model_file, tmp=tmp_path) for a in args])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("gpucabac: error: ") and "missing" in result.stderr
    assert not (tmp_path / "m.gcb").exists()


def test_an_empty_selection_is_an_error(tmp_path, model_file):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb).exit_code == 0
    for names in ("", " , "):
        result = run("decode", gcb, "-o", tmp_path / "x.npz", "--names", names)
        assert result.exit_code == 1 and "no tensor names" in result.stderr
    assert not (tmp_path / "x.npz").exists()


def test_settings_that_destroy_the_model_warn(tmp_path, model_file):
    result = run("encode", model_file, "-o", tmp_path / "m.gcb", "--qp", "100")
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "zero" in result.stderr
    result = run("encode", model_file, "-o", tmp_path / "ok.gcb", "--qp", "-32")
    assert "warning:" not in result.stderr


def test_progress_without_a_terminal_is_plain_lines(tmp_path, model_file, monkeypatch):
    from gpucabac.cli import _common

    monkeypatch.setattr(_common, "PLAIN_FIRST_S", 0.0)
    monkeypatch.setattr(_common, "PLAIN_EVERY_S", 0.0)
    result = run("encode", model_file, "-o", tmp_path / "m.gcb")
    assert result.exit_code == 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("gpucabac: encode: ")]
    assert lines and lines[-1].startswith("gpucabac: encode: 100% (")
    assert "\r" not in result.stderr  # no bar redrawing itself into a log
    result = run("--quiet", "encode", model_file, "-o", tmp_path / "q.gcb")
    assert result.exit_code == 0 and "gpucabac: encode:" not in result.stderr


def test_encode_of_a_container_points_to_decode(tmp_path, model_file):
    gcb = tmp_path / "m.gcb"
    assert run("encode", model_file, "-o", gcb).exit_code == 0
    result = run("encode", gcb, "-o", tmp_path / "again.gcb")
    assert result.exit_code == 1 and "is a gpucabac container" in result.stderr and "decode" in result.stderr


def test_plain_progress_keeps_reporting_while_no_update_comes(monkeypatch):
    """A stage without updates (a compilation, a long first chunk) still prints lines: the
    ticker thread reports the elapsed time, at 0%."""
    import time

    import click

    from gpucabac.cli import _common

    monkeypatch.setattr(_common, "PLAIN_FIRST_S", 0.0)
    monkeypatch.setattr(_common, "PLAIN_EVERY_S", 0.0)

    @click.command()
    def slow():
        with _common.progress_bar(100, "slow") as progress:
            time.sleep(2.5)  # no update: only the ticker can speak
            progress(100)

    result = CliRunner().invoke(slow, [])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("gpucabac: slow: ")]
    assert len(lines) >= 3, lines
    assert lines[0].startswith("gpucabac: slow: 0% (0 of 100)") and lines[-1].startswith("gpucabac: slow: 100% (")


def test_timed_leaves_numba_compilations_out_and_says_so_once(monkeypatch):
    import time

    import click
    import numba

    from gpucabac.cli import _common

    monkeypatch.setattr(_common, "_compiling_noted", False)
    seen = {}

    @click.command()
    def work():
        @numba.njit(cache=False)  # a new function: numba must compile it here
        def f(x):
            return x + 1

        with _common.timed(10, "work") as stage:
            time.sleep(0.2)
            f(1)
        again = _common.Timed()
        with _common.timed(10, "again") as again:
            f(2)  # compiled already: no compilation, no note
        seen.update(stage=stage, again=again)

    result = CliRunner().invoke(work, [])
    assert result.exit_code == 0, result.output
    stage, again = seen["stage"], seen["again"]
    assert stage.compile_seconds > 0 and 0.2 <= stage.seconds < 0.2 + 5
    assert again.compile_seconds == 0
    assert result.stderr.count("compiling gpucabac's coder with numba") == 1
    assert "plus" in stage.throughput(10) and "compiling" in stage.throughput(10)
    assert "compiling" not in again.throughput(10)


# --- encode's check, tensor by tensor --------------------------------------------------------------


def _reference_snr(original: dict, decoded: dict) -> float:
    """Σw² / Σ(w−ŵ)² over the float tensors, each summed whole in float64 (the formula the CLI
    printed before it compared tensor by tensor)."""
    from gpucabac.dtypes import is_float

    signal = noise = 0.0
    for name, w in original.items():
        if is_float(w):
            w64 = np.asarray(w, np.float64).ravel()
            e = w64 - np.asarray(decoded[name], np.float64).ravel()
            signal, noise = signal + float(w64 @ w64), noise + float(e @ e)
    return 10 * math.log10(signal / noise)


def test_encode_checks_what_it_wrote_tensor_by_tensor(tmp_path, model_file, monkeypatch):
    """The check decodes the container one group of tensors at a time (never the whole model
    at once beside the original), and prints the SNR the whole-tensor formula gives."""
    from gpucabac import codec
    from gpucabac.cli import _common
    from gpucabac.cli._common import fmt_snr

    monkeypatch.setattr(gpucabac, "decode", lambda *a, **k: pytest.fail("the check decoded the whole model at once"))
    monkeypatch.setattr(codec, "ITER_GROUP_BYTES", 1)  # one tensor per group
    held, real = [], codec.iter_decode

    def watched(*args, **kwargs):
        for name, x in real(*args, **kwargs):
            held.append(name)
            yield name, x

    monkeypatch.setattr(codec, "iter_decode", watched)
    monkeypatch.setattr(_common, "PLAIN_FIRST_S", 0.0)
    monkeypatch.setattr(_common, "PLAIN_EVERY_S", 0.0)
    out = tmp_path / "m.gcb"
    for options in ([], ["--dq", "--qp", "-38", "--scan", "auto"]):
        held.clear()
        result = run("encode", model_file, "-o", out, "-f", *options)
        assert result.exit_code == 0, result.output
        tensors = gio.read_model(model_file)
        assert held == list(tensors)
        decoded = dict(real(out.read_bytes(), group_bytes=None))
        assert f"SNR {fmt_snr(_reference_snr(tensors, decoded))} dB" in result.stdout
        lines = [line for line in result.stderr.splitlines() if line.startswith("gpucabac: check (decode): ")]
        assert lines and lines[-1].startswith("gpucabac: check (decode): 100% (")


def test_encode_at_a_sweep_point_reports_the_swept_tensors_snr(tmp_path, swept):
    from gpucabac.cli._common import fmt_snr

    d, tensors, _ = swept
    out = tmp_path / "m.gcb"
    result = run("encode", d / "tiny.safetensors", "-o", out, "--sweep", d / "s.json", "--importance",
                 d / "imp.safetensors", "--target-bpw", "4")
    assert result.exit_code == 0, result.output
    point, _ = gpucabac.point_from_sweep(d / "s.json", tensors, importance_file=d / "imp.safetensors", target_bpw=4.0)
    decoded = gpucabac.decode(out.read_bytes())
    line = next(x for x in result.stdout.splitlines() if x.startswith("swept tensors: "))
    want = _reference_snr({n: tensors[n] for n in tensors if n in point.steps}, decoded)
    assert f"SNR {fmt_snr(want)} dB (predicted" in line


def test_snr_in_chunks_is_the_whole_tensor_figure(monkeypatch):
    from gpucabac import metrics

    rng = np.random.default_rng(3)
    w = {"a": (rng.standard_normal((300, 70)) * 0.05).astype(np.float32), "b": (rng.standard_normal(999) * 0.1).astype(BF16),
         "c": rng.standard_normal(()), "i": np.arange(5)}
    r = {k: (v + rng.standard_normal(np.shape(v)) * 1e-3).astype(v.dtype) for k, v in w.items()}
    want = _reference_snr(w, r)
    for chunk in (1, 7, 1000, 1 << 20):
        monkeypatch.setattr(metrics, "SNR_CHUNK", chunk)
        assert tensors_snr_db(w, r) == pytest.approx(want, rel=1e-12)
        total = metrics.SnrSum()
        for k in w:
            total.add(w[k], r[k])
        assert total.snr_db() == pytest.approx(want, rel=1e-12)
    assert math.isnan(metrics.SnrSum().snr_db())


def test_every_option_of_every_command_has_help():
    import click

    from gpucabac.cli import main

    def walk(cmd, path):
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    missing = [f"{' '.join(path)} {opt.opts[0]}" for path, cmd in walk(main, ["gpucabac"])
               for opt in cmd.params if isinstance(opt, click.Option) and not opt.hidden and not opt.help]
    assert not missing, missing
    assert all(cmd.help for _, cmd in walk(main, ["gpucabac"]))
