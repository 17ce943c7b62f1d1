"""CodingSettings: validated once when made, frozen, the same bytes however they are spelled."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import gpucabac
from gpucabac import CodingSettings
from gpucabac.errors import InputError
from gpucabac.settings import plan_tensor


def test_defaults_and_step_from_qp():
    s = CodingSettings()
    assert s.step == gpucabac.step_from_qp(-32) and s.quantizer == "urq" and s.dq == 0
    assert s.slice_size == gpucabac.DEFAULT_SLICE_SIZE and s.num_gt_flags == gpucabac.DEFAULT_GT_FLAGS
    assert CodingSettings(qp=-30, qp_density=3).step == gpucabac.step_from_qp(-30, 3)
    assert CodingSettings(qp=-32) == CodingSettings(step=gpucabac.step_from_qp(-32))  # equal by what is coded
    assert CodingSettings(quantizer="dq256").dq == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = 1.0  # type: ignore[misc]
    assert hash(s) == hash(CodingSettings())


def test_replace_keeps_step_and_qp_apart():
    s = CodingSettings(qp=-32, quantizer="dq")
    assert s.replace(lam=0.3).step == s.step and s.replace(lam=0.3).lam == 0.3
    assert s.replace(qp=-28).step == gpucabac.step_from_qp(-28)
    t = s.replace(step=0.01)
    assert t.step == 0.01 and t.qp is None and t.replace(lam=0.1).step == 0.01


@pytest.mark.parametrize("fields, message", [
    (dict(step=0.1, qp=-3), "either step or qp"),
    (dict(step=0.0), "positive"), (dict(step=1e-50), "float32"), (dict(step="x"), "positive number"),
    (dict(qp=1.5), "qp must be an integer"), (dict(qp_density=8), "qp_density"),
    (dict(quantizer="dq7"), "quantizer must be one of"), (dict(lam=-1), "lam"), (dict(lam=float("nan")), "lam"),
    (dict(scan="diagonal"), "scan must be one of"), (dict(slice_size=0), "slice_size"),
    (dict(slice_size=2**32), "slice_size"), (dict(slice_size=True), "slice_size"),
    (dict(num_gt_flags=21), "num_gt_flags must be in 0..20"), (dict(small_step="fine"), "small_step"),
    (dict(small_step=-2.0), "small_step"),
])
def test_bad_fields_name_themselves(fields, message):
    with pytest.raises(InputError, match=message):
        CodingSettings(**fields)


def test_dict_round_trip_is_json():
    s = CodingSettings(qp=-30, quantizer="dq64", lam=0.2, scan="auto", slice_size=None, num_gt_flags=4,
                       small_step="lossless")
    d = json.loads(json.dumps(s.to_dict()))
    assert CodingSettings.from_dict(d) == s
    with pytest.raises(InputError, match="unknown coding settings colour"):
        CodingSettings.from_dict({**d, "colour": 1})


def test_plans_follow_rank_and_dtype():
    s = CodingSettings(qp=-32, quantizer="dq", lam=0.2, scan="auto", slice_size=100)
    w = plan_tensor(np.zeros((30, 20), np.float16), s)
    assert (w.mode, w.lam, w.scans, w.slice_size, w.dtype) == ("dq", 0.2, ("rows", "columns"), 100, "float16")
    b = plan_tensor(np.zeros(7, np.float32), s)  # small tensors: step / 16, no RD, rows
    assert (b.step, b.lam, b.scans, b.slice_size) == (float(np.float32(s.step / 16)), 0.0, ("rows",), 7)
    assert plan_tensor(np.zeros(7, np.float32), s, explicit=True).step == float(np.float32(s.step))
    assert plan_tensor(np.zeros(7, np.float32), s.replace(small_step="lossless")).mode == "raw"
    assert plan_tensor(np.arange(5, dtype=np.int16), s).mode == "int"
    assert plan_tensor(np.array([2**40]), s).mode == "raw"


def test_settings_and_keywords_give_the_same_bytes():
    rng = np.random.default_rng(3)
    t = {"w": (rng.standard_normal((40, 60)) * 0.02).astype(np.float32), "b": np.ones(60, np.float32)}
    s = CodingSettings(qp=-30, quantizer="dq16", scan="auto", slice_size=512, num_gt_flags=5)
    data = gpucabac.encode(t, s)
    assert data == gpucabac.encode(t, qp=-30, dq=16, scan="auto", slice_size=512, num_gt_flags=5)
    got, want = gpucabac.decode(data), gpucabac.quantize(t, s)
    assert all(np.array_equal(got[k], want[k]) for k in t)
    with pytest.raises(InputError, match="not both"):
        gpucabac.encode(t, s, qp=-30)
    with pytest.raises(InputError, match="must be a gpucabac.CodingSettings"):
        gpucabac.encode(t, {"qp": -30})
    with pytest.raises(InputError, match="per_tensor names 'x'"):
        gpucabac.encode(t, s, per_tensor={"x": s})
    with pytest.raises(TypeError, match="unexpected keyword arguments tensor_step"):
        gpucabac.encode(t, tensor_step={"w": 0.1})


def test_per_tensor_settings_apply_as_given():
    rng = np.random.default_rng(4)
    t = {"a": (rng.standard_normal((30, 50)) * 0.02).astype(np.float32),
         "b": (rng.standard_normal((30, 50)) * 0.02).astype(np.float32), "bias": np.ones(50, np.float32) * 0.1}
    s = CodingSettings(qp=-32, slice_size=256)
    own = {"b": CodingSettings(step=0.004, quantizer="dq64", num_gt_flags=3, slice_size=100),
           "bias": s.replace(step=0.05)}
    data = gpucabac.encode(t, s, per_tensor=own)
    rec = {r.name: r for r in gpucabac.info(data).tensors}
    assert (rec["a"].mode, rec["a"].slice_size, rec["a"].num_gt_flags) == ("urq", 256, 11)
    assert (rec["b"].mode, rec["b"].slice_size, rec["b"].num_gt_flags) == ("dq64", 100, 3)
    assert rec["b"].step == pytest.approx(0.004) and rec["bias"].step == pytest.approx(0.05)
    got, want = gpucabac.decode(data), gpucabac.quantize(t, s, per_tensor=own)
    assert all(np.array_equal(got[k], want[k]) for k in t)
