"""gpucabac.fl: differential updates (update.py), pytrees (pytree.py), error feedback (feedback.py)."""

from __future__ import annotations

import numpy as np
import pytest

import gpucabac
from gpucabac.errors import FormatError, GpucabacError, InputError
from gpucabac.fl.feedback import ErrorFeedback
from gpucabac.fl.pytree import decode_tree, encode_tree, flatten, unflatten
from gpucabac.fl.update import (add_delta, apply_update, base_digest, decode_update, encode_deltas, encode_snapshot,
                                 encode_update, is_snapshot, read_snapshot, read_update)


def _model(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "conv/kernel": rng.normal(0, 0.1, (3, 3, 4, 8)).astype(np.float32),
        "conv/bias": rng.normal(0, 0.01, 8).astype(np.float32),
        "dense/kernel": rng.normal(0, 0.05, (32, 10)).astype(np.float32),
        "bn/count": np.array([7], np.int64),
        "half": rng.normal(0, 0.1, (6, 5)).astype(np.float16),
    }


def _trained(base, seed=1, scale=0.01):
    rng = np.random.default_rng(seed)
    new = {}
    for k, v in base.items():
        if v.dtype.kind == "f":
            new[k] = (v.astype(np.float32) + rng.normal(0, scale, v.shape)).astype(v.dtype)
        else:
            new[k] = v + 3
    return new


def test_an_update_round_trips_to_base_plus_the_quantized_difference():
    base = _model()
    new = _trained(base)
    data = encode_update(new, base, qp=-40)
    out = decode_update(data, base)
    assert set(out) == set(base)
    for name, b in base.items():
        assert out[name].dtype == b.dtype and out[name].shape == b.shape
        if b.dtype.kind != "f":
            np.testing.assert_array_equal(out[name], new[name])  # integers exact
            continue
        delta = new[name].astype(np.float32) - b.astype(np.float32)
        expected = add_delta(b, gpucabac.quantize({name: delta}, qp=-40)[name])
        np.testing.assert_array_equal(out[name], expected)  # the receiver's rule, bit for bit
        step = gpucabac.step_from_qp(-40) / (16 if b.ndim <= 1 else 1)
        assert np.max(np.abs(out[name].astype(np.float32) - new[name].astype(np.float32))) <= step / 2 + 1e-3


def test_the_base_is_named_by_its_digest_and_another_base_is_refused():
    base = _model()
    new = _trained(base)
    data = encode_update(new, base)
    other = _model(seed=5)
    before = {k: v.copy() for k, v in other.items()}
    with pytest.raises(InputError, match="another base"):
        decode_update(data, other)
    for k in other:
        np.testing.assert_array_equal(other[k], before[k])
    # one changed bit of the base changes its digest
    flipped = {k: v.copy() for k, v in base.items()}
    flipped["dense/kernel"].view(np.uint32)[0, 0] ^= 1
    assert base_digest(flipped) != base_digest(base)
    with pytest.raises(InputError, match="another base"):
        decode_update(data, flipped)


def test_a_digest_the_caller_holds_gives_the_same_bytes_and_checks():
    base, other = _model(), _model(seed=5)
    deltas = {k: v.astype(np.float32) - base[k].astype(np.float32)
              for k, v in _trained(base).items() if v.dtype.kind == "f"}
    digest = base_digest(base)
    data = encode_deltas(deltas, base, qp=-40, digest=digest)
    assert data == encode_deltas(deltas, base, qp=-40)
    got = read_update(data, base, digest=digest)
    want = read_update(data, base)
    assert got.base_digest == want.base_digest and all(np.array_equal(got.deltas[k], want.deltas[k]) for k in want.deltas)
    with pytest.raises(InputError, match="another base"):
        read_update(data, other, digest=base_digest(other))
    for bad in (digest[:31], digest.hex(), 7):
        with pytest.raises(InputError, match="digest must be"):
            encode_deltas(deltas, base, qp=-40, digest=bad)
        with pytest.raises(InputError, match="digest must be"):
            read_update(data, base, digest=bad)


def test_a_partial_update_costs_only_what_it_sends():
    base = _model()
    new = _trained(base)
    full = encode_update(new, base, qp=-36)
    part = encode_update(new, base, qp=-36, names=["conv/kernel"])
    assert len(part) < len(full) / 2
    upd = read_update(part, base)
    assert upd.names == ["conv/kernel"]
    out = apply_update(upd, base)
    for name in base:
        if name != "conv/kernel":
            assert out[name] is base[name] or np.array_equal(out[name], base[name])
    assert not np.array_equal(out["conv/kernel"], base["conv/kernel"])
    # unchanged tensors are left out by default
    same = encode_update(base, base)
    assert read_update(same, base).names == []
    assert decode_update(same, base).keys() == base.keys()


def test_corrupt_and_truncated_updates_raise_and_leave_the_base_alone():
    base = _model()
    data = bytearray(encode_update(_trained(base), base, qp=-36))
    before = {k: v.copy() for k, v in base.items()}
    for cut in (0, 3, 10, 40, 45, len(data) // 2, len(data) - 1):
        with pytest.raises(GpucabacError):
            decode_update(bytes(data[:cut]), base)
    rng = np.random.default_rng(0)
    for _ in range(200):
        bad = bytearray(data)
        i = int(rng.integers(len(bad)))
        bad[i] ^= 1 << int(rng.integers(8))
        try:
            out = decode_update(bytes(bad), base)
        except GpucabacError:
            continue
        # a flip that survives every check (e.g. in a slice's padding) still yields the base's tensors
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in base.items()}
    with pytest.raises(FormatError, match="not a gpucabac update"):
        decode_update(gpucabac.encode(base), base)
    for k in base:
        np.testing.assert_array_equal(base[k], before[k])


def test_a_snapshot_carries_the_whole_model_exactly_with_its_version():
    model, like = _trained(_model()), _model(seed=5)  # the receiver's model: same tensors, other values
    data = encode_snapshot(model, 7)
    assert is_snapshot(data) and not is_snapshot(encode_update(model, like))
    out, version = read_snapshot(data, like)
    assert version == 7 and list(out) == list(model)
    for k, v in model.items():
        assert out[k].dtype == v.dtype and out[k].tobytes() == v.tobytes(), k
    raw_bytes = sum(v.nbytes for v in model.values())
    assert raw_bytes < len(data) < raw_bytes + 1024  # the values as they are, and headers


def test_a_corrupt_or_mismatched_snapshot_is_a_format_error():
    model = _model()
    data = encode_snapshot(model, 3)
    before = {k: v.copy() for k, v in model.items()}
    for cut in (0, 3, 20, 47, 48, len(data) // 2, len(data) - 1):
        with pytest.raises(FormatError):
            read_snapshot(data[:cut], model)
    for i in (0, 4, 5, 8, 12, 44, 60, len(data) - 3):  # magic, version, reserved, version, digest, CRC, container
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(FormatError):
            read_snapshot(bytes(bad), model)
    other = dict(model, **{"conv/bias": np.zeros(9, np.float32)})
    with pytest.raises(FormatError, match="conv/bias"):
        read_snapshot(data, other)
    with pytest.raises(FormatError, match="same names"):
        read_snapshot(data, {k: v for k, v in model.items() if k != "half"})
    with pytest.raises(FormatError, match="same names"):
        read_snapshot(data, dict(reversed(list(model.items()))))
    with pytest.raises(InputError, match="model version"):
        encode_snapshot(model, -1)
    for k in model:
        np.testing.assert_array_equal(model[k], before[k])


def test_a_raw_update_is_dense_float32_and_exact():
    base = _model()
    new = _trained(base)
    deltas = {k: new[k].astype(np.float32) - base[k].astype(np.float32) for k in base if base[k].dtype.kind == "f"}
    data = encode_deltas(deltas, base, raw=True, values={"bn/count": new["bn/count"]})
    upd = read_update(data, base)
    for k, d in deltas.items():
        np.testing.assert_array_equal(upd.deltas[k], d)
    assert len(data) > 4 * sum(d.size for d in deltas.values())  # every float32 difference, uncoded
    assert len(data) < 4 * sum(d.size for d in deltas.values()) + 2000  # plus headers only
    with pytest.raises(InputError, match="no coding settings"):
        encode_deltas(deltas, base, raw=True, qp=-30)


def test_deltas_and_values_are_checked_against_the_base():
    base = _model()
    with pytest.raises(InputError, match="not in the base"):
        encode_deltas({"nope": np.zeros(3, np.float32)}, base)
    with pytest.raises(InputError, match="shape"):
        encode_deltas({"conv/bias": np.zeros(3, np.float32)}, base)
    with pytest.raises(InputError, match="new value"):
        encode_deltas({"bn/count": np.zeros(1, np.float32)}, base)
    with pytest.raises(InputError, match="difference"):
        encode_deltas({}, base, values={"conv/bias": base["conv/bias"]})
    with pytest.raises(InputError, match="different tensors"):
        encode_update({"conv/bias": base["conv/bias"]}, base)


def test_per_tensor_settings_code_the_scales_finely_and_integers_exactly():
    base = _model()
    new = _trained(base, scale=0.05)
    fine = gpucabac.CodingSettings(qp=-60)
    data = encode_update(new, base, gpucabac.CodingSettings(qp=-28), per_tensor={"dense/kernel": fine})
    out = decode_update(data, base)
    err = lambda n: float(np.max(np.abs(out[n].astype(np.float32) - new[n].astype(np.float32))))  # noqa: E731
    assert err("dense/kernel") <= gpucabac.step_from_qp(-60) / 2 + 1e-6
    assert err("conv/kernel") > 10 * err("dense/kernel")
    np.testing.assert_array_equal(out["bn/count"], new["bn/count"])


# --- pytrees -------------------------------------------------------------------------------------


def test_nested_trees_flatten_with_path_names_and_come_back_exactly():
    tree = {"a": {"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)},
            "layers": [np.arange(4, dtype=np.int32), np.full((2, 2), 0.5, np.float16)]}
    named = flatten(tree)
    assert list(named) == ["a/bias", "a/kernel", "layers/0", "layers/1"]
    back = unflatten(named, tree)
    assert set(back) == {"a", "layers"} and isinstance(back["layers"], list)
    np.testing.assert_array_equal(back["layers"][1], tree["layers"][1])
    with pytest.raises(InputError, match="same name"):
        flatten({"a/b": np.ones(1), "a": {"b": np.ones(1)}})
    with pytest.raises(InputError, match="do not match"):
        unflatten({"a/bias": named["a/bias"]}, tree)
    with pytest.raises(InputError, match="the tree's leaf"):
        unflatten({**named, "a/bias": np.zeros(4, np.float32)}, tree)


def _flax_model():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)
            self.head = nnx.List([nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])

    return nnx, Net(nnx.Rngs(0))


def test_a_flax_nnx_state_codes_and_decodes_in_its_own_structure():
    nnx, model = _flax_model()
    import jax

    state = nnx.state(model)
    named = flatten(state)
    assert {"conv/kernel", "conv/bias", "bn/mean", "bn/var", "bn/scale", "bn/bias", "head/0/kernel"} <= set(named)
    data = encode_tree(state, qp=-40)
    back = decode_tree(data, state)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    leaves = jax.tree_util.tree_leaves(back)
    assert all(isinstance(x, jax.Array) for x in leaves)
    nnx.update(model, back)  # a decoded state goes straight back into the model
    np.testing.assert_array_equal(np.asarray(model.conv.kernel[...]), gpucabac.quantize({"k": named["conv/kernel"]}, qp=-40)["k"])


def test_an_update_between_two_flax_states():
    nnx, model = _flax_model()
    base = nnx.state(model, nnx.Param)
    named = flatten(base)
    new = unflatten({k: v + np.float32(0.01) for k, v in named.items()}, base)
    out = decode_update(encode_update(new, base, qp=-44), base)
    got = flatten(out)
    for k, v in named.items():
        assert np.max(np.abs(got[k] - (v + np.float32(0.01)))) <= gpucabac.step_from_qp(-44) / 2 + 1e-6


# --- error feedback ------------------------------------------------------------------------------


def test_error_feedback_keeps_what_the_coded_updates_left_out():
    rng = np.random.default_rng(3)
    base = {"w": np.zeros((40, 50), np.float32), "b": np.zeros(50, np.float32)}
    fb = ErrorFeedback()
    sent_total = {k: np.zeros_like(v, np.float64) for k, v in base.items()}
    true_total = {k: np.zeros_like(v, np.float64) for k, v in base.items()}
    for _ in range(6):
        true = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in base.items()}
        intended = fb.add(true)
        # a crude sparsifier: keep the largest 5% of |intended| in w, nothing of b
        w = intended["w"]
        keep = np.abs(w) >= np.quantile(np.abs(w), 0.95)
        data = encode_deltas({"w": np.where(keep, w, 0)}, base, qp=-30)
        decoded = read_update(data, base).deltas
        fb.keep(intended, decoded)
        for k in base:
            true_total[k] += true[k]
            sent_total[k] += decoded.get(k, 0)
    for k in base:  # sum of decoded updates + final residual = sum of true updates
        np.testing.assert_allclose(sent_total[k] + fb.residual[k], true_total[k], atol=1e-5)
    restored = ErrorFeedback.from_arrays(fb.to_arrays())
    assert restored.residual.keys() == fb.residual.keys() and restored.norm() == pytest.approx(fb.norm())
    with pytest.raises(InputError, match="shape"):
        fb.add({"w": np.zeros(3, np.float32)})
