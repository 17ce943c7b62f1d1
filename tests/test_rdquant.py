"""The JAX rate-distortion quantizers (gpucabac.rdquant): URQ greedy RDOQ and the rate-aware DQ
trellis, checked against plain-Python references, the numba quantizers and the real coder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpucabac
from gpucabac import codec, container, rdquant
from gpucabac.errors import InputError
from gpucabac.binarize import binarize_level, dq_coded_level, dq_next_state, dq_states
from gpucabac.quantization import quantize_levels
from gpucabac.tables import BIT_COST, CURVE

jax = pytest.importorskip("jax")

N = 11


def _ref_bits(levels, slice_size, dq, ctx_init, n=N):
    """Plain-Python estimator cost (docs/engine.md §2.8) of levels coded slice by slice from ctx_init:
    BIT_COST per regular bin with the states updated as the coder updates them, 1 bit per bypass bin."""
    s0i, s1i, sh0, sh1 = (a.astype(np.int64) for a in rdquant.context_arrays(ctx_init, n, dq))
    dq = dq_states(dq)
    ctx = np.zeros(64, np.int32)
    bins = np.zeros(64, np.int32)
    total = 0
    for start in range(0, len(levels), slice_size):
        s0, s1 = s0i.copy(), s1i.copy()
        prev, state = 0, 0
        for r in levels[start : start + slice_size]:
            q = dq_coded_level(int(r), state) if dq else int(r)
            nreg, _, nsuf = binarize_level(q, prev, state, n, ctx, bins)
            for j in range(nreg):
                c, b = int(ctx[j]), int(bins[j])
                total += int(BIT_COST[512 + ((int(s1[c]) + 16 * int(s0[c])) >> 3), b])
                sg = 2 * b - 1
                a0, a1 = int(s0[c]), int(s1[c])
                s0[c] = a0 + sg * (int(CURVE[16 + ((sg * a0) >> 3)]) >> int(sh0[c]))
                s1[c] = a1 + sg * (int(CURVE[16 + ((sg * a1) >> 7)]) >> int(sh1[c]))
            total += 32768 * nsuf
            prev = q
            if dq:
                state = dq_next_state(dq, state, q)
    return total / 32768.0


def _gauss(n, sigma=0.02, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * sigma).astype(np.float32)


STEP = 2.0 ** -6


@pytest.mark.parametrize("dq", [False, True, 64])
def test_estimated_rate_is_the_estimator_cost_of_the_chosen_levels(dq):
    # The survivor's rate equals the plain-Python estimator run over its levels: the scan keeps
    # exact integer context states (per survivor under DQ) and resets them per slice.
    w = _gauss(700, seed=1)
    w[5] = 0.4  # an Exp-Golomb remainder
    res = rdquant.rd_quantize_tensor(w, [STEP], [0.0, 0.1, 0.4], dq=dq, slice_size=256)
    for li in range(3):
        ref = _ref_bits(res.levels[0, li], 256, dq, res.ctx_init[0])
        assert res.bits[0, li] == pytest.approx(ref, rel=1e-5)
        d = np.sum((w.astype(np.float64) - res.levels[0, li] * np.float64(np.float32(STEP))) ** 2)
        assert res.dist[0, li] == pytest.approx(d, rel=1e-4)


@settings(max_examples=25)
@given(
    st.lists(st.floats(-40, 40, width=32), min_size=1, max_size=300),
    st.sampled_from([1.0, 0.5, 0.37, 3.0]),
)
def test_urq_lambda_zero_is_rounding(values, step):
    x = np.array(values, np.float32)
    x[::7] = np.float32(step) * (np.round(x[::7]) + 0.5)  # exact ties
    got = rdquant.rd_levels(x, step, 0.0, slice_size=64)
    np.testing.assert_array_equal(got, quantize_levels(x, step, slice_size=64))


def _greedy_dq(x, dq=8):
    """A valid DQ path: in each state, the nearest point of its quantizer."""
    state, out = 0, []
    for v in x:
        qid = state & 1
        lo = 2 * np.floor(v / 2) if qid == 0 else 2 * np.floor((v - 1) / 2) + 1
        r = int(lo if v - lo <= lo + 2 - v else lo + 2)
        k = 0 if r == 0 else (r + qid) // 2 if r > 0 else -((-r + qid) // 2)
        out.append(r)
        state = dq_next_state(dq, state, k)
    return np.array(out)


@settings(max_examples=15)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2.0 ** -6, 2.0 ** -4, 0.013]), st.sampled_from([8, 16, 128]))
def test_trellis_lambda_zero_distortion_bounds(seed, step, dq):
    # The distortion-only trellis is optimal over DQ paths: never worse than the greedy per-state
    # rounding path, and equal (up to float32) to the numba Viterbi at the same step.
    w = _gauss(300, seed=seed)
    res = rdquant.rd_quantize_tensor(w, [step], [0.0], dq=dq, slice_size=300)
    x = w.astype(np.float64) / np.float32(step)
    d_greedy = np.sum((x - _greedy_dq(x, dq)) ** 2)
    d_numba = np.sum((x - quantize_levels(w, step, dq=dq, slice_size=300)) ** 2)
    d_rd = np.sum((x - res.levels[0, 0]) ** 2)
    assert d_rd <= d_greedy * (1 + 1e-6) + 1e-9
    assert d_rd == pytest.approx(d_numba, rel=1e-5, abs=1e-6)


def test_a_large_trellis_over_huge_slices_is_refused_before_it_allocates():
    with pytest.raises(InputError, match="smaller slice size"):
        rdquant.rd_quantize_tensor(np.zeros(2_200_000, np.float32), [0.01], [0.1], dq=256, slice_size=1 << 22)
    with pytest.raises(InputError, match="smaller slice size"):
        quantize_levels(np.zeros(9_000_000, np.float32), 0.01, dq=256, slice_size=None)
    with pytest.raises(InputError, match="trellis size"):
        quantize_levels(np.zeros(10, np.float32), 0.01, dq=12)


def _exact_bits(levels, slice_size, dq):
    _, data, _ = codec.encode_levels(levels, slice_size, dq, N)
    return 8 * data.size


@pytest.mark.parametrize("dq", [False, True, 32])
def test_rate_falls_with_lambda_and_matches_the_coder(dq):
    w = _gauss(1 << 15, seed=3)
    lams = [0.0, 0.05, 0.1, 0.2, 0.4]
    res = rdquant.rd_quantize_tensor(w, [STEP], lams, dq=dq, slice_size=8192)
    exact = [_exact_bits(res.levels[0, i], 8192, dq) for i in range(len(lams))]
    assert all(np.diff(res.bits[0]) <= 0), res.bits[0]
    assert all(np.diff(exact) <= 0), exact
    assert all(np.diff(res.dist[0]) >= 0), res.dist[0]
    for est, ex in zip(res.bits[0], exact):
        assert abs(ex - est) <= 0.02 * ex, (est, ex)


def test_jit_equals_eager():
    w = _gauss(20, seed=4)
    w[3] = 0.3  # an Exp-Golomb remainder
    for dq in (False, True):
        with jax.numpy_dtype_promotion("strict"):
            a = rdquant.rd_quantize_tensor(w, [STEP, 1.5 * STEP], [0.0, 0.3], dq=dq, slice_size=12, kernel="jax")
            b = rdquant.rd_quantize_tensor(w, [STEP, 1.5 * STEP], [0.0, 0.3], dq=dq, slice_size=12, jit=False)
        np.testing.assert_array_equal(a.levels, b.levels)
        np.testing.assert_allclose(a.bits, b.bits, rtol=1e-6)


@pytest.mark.parametrize(("dq", "num_gt_flags"), [(False, 11), (False, 0), (True, 11), (True, 2), (16, 5)])
def test_cpu_kernel_equals_jax(dq, num_gt_flags):
    # The numba kernel (what "auto" runs on a CPU) is the JAX quantizer step for step: the same
    # levels and, to the bit, the same float32 bits and distortions, at lam = 0 (levels first,
    # rate after) and above, from fine steps (Exp-Golomb remainders) to coarse ones, with
    # importance, zeros, uneven last slices and an empty padding row.
    rng = np.random.default_rng(7 + num_gt_flags)
    w = (rng.standard_t(4, 1500) * 0.02).astype(np.float32)
    w[rng.random(w.size) < 0.3] = 0.0
    w[:3] = [0.5, -0.31, 0.2]
    imp = rng.uniform(0.0, 2.0, w.size).astype(np.float32)
    steps, lams = [2.0 ** -12, 2.0 ** -9, 0.013, 2.0 ** -5], [0.0, 0.03, 0.1, 0.37]
    for importance, slice_size in ((imp, 333), (None, 1500)):
        kw = dict(dq=dq, slice_size=slice_size, num_gt_flags=num_gt_flags, importance=importance)
        a = rdquant.rd_quantize_tensor(w, steps, lams, kernel="jax", **kw)
        b = rdquant.rd_quantize_tensor(w, steps, lams, kernel="numba", **kw)
        np.testing.assert_array_equal(a.levels, b.levels)
        for x, y in ((a.bits, b.bits), (a.wdist, b.wdist), (a.dist, b.dist)):
            np.testing.assert_array_equal(x, y)
        c = rdquant.rd_quantize_tensor(w, steps, lams, kernel="numba", with_levels=False, **kw)
        np.testing.assert_array_equal(c.bits, b.bits)
        assert c.levels is None
    assert np.abs(a.levels).max() > num_gt_flags + 2  # remainders were priced


def test_kernel_is_validated_and_auto_is_numba_on_the_cpu():
    with pytest.raises(InputError, match="kernel"):
        rdquant.rd_quantize_tensor(_gauss(10), [STEP], [0.1], kernel="cuda")
    assert rdquant._kernel_of("auto", True) == ("numba" if jax.default_backend() == "cpu" else "jax")
    assert rdquant._kernel_of("auto", False) == "jax"


def test_vectorised_equals_single_settings():
    w = _gauss(3000, seed=5)
    grid = rdquant.rd_quantize_tensor(w, [STEP, 2 * STEP], [0.05, 0.2], dq=True, slice_size=1024)
    for k, s in enumerate([STEP, 2 * STEP]):
        for l_, lam in enumerate([0.05, 0.2]):
            np.testing.assert_array_equal(grid.levels[k, l_], rdquant.rd_levels(w, s, lam, dq=True, slice_size=1024))


@pytest.mark.parametrize("dq", [False, True, 16])
def test_tensors_in_one_stream_equal_one_call_each(dq):
    """Slices of several tensors batched together (batches that cross tensor boundaries, a tensor
    smaller than a slice, per-tensor grids and importance) give each tensor what a call of its own
    gives: the same levels, rates and distortions."""
    rng = np.random.default_rng(12)
    tensors = {"a": _gauss(1000, seed=1).reshape(20, 50), "tiny": _gauss(37, seed=2),
               "b": _gauss(2600, seed=3), "c": _gauss(300, seed=4).reshape(3, 100)}
    grids = {"a": [STEP, 2 * STEP], "tiny": [STEP / 2, STEP], "b": [2 * STEP, 4 * STEP], "c": [STEP, 3 * STEP]}
    importance = {"b": rng.uniform(0.2, 2.0, 2600).astype(np.float32)}
    lams = [0.0, 0.15]
    together = rdquant.rd_quantize_tensors(tensors, grids, lams, dq=dq, slice_size=256, importance=importance,
                                          max_lanes=4 * 3)  # 3 slices per batch: batches span tensors
    assert list(together) == list(tensors)
    for name, x in tensors.items():
        alone = rdquant.rd_quantize_tensor(x, grids[name], lams, dq=dq, slice_size=256, importance=importance.get(name))
        got = together[name]
        np.testing.assert_array_equal(got.levels, alone.levels)
        np.testing.assert_array_equal(got.ctx_init, alone.ctx_init)
        np.testing.assert_allclose(got.bits, alone.bits, rtol=1e-12)
        np.testing.assert_allclose(got.dist, alone.dist, rtol=1e-12)
        np.testing.assert_allclose(got.wdist, alone.wdist, rtol=1e-12)
    with pytest.raises(gpucabac.InputError, match="same number of steps"):
        rdquant.rd_quantize_tensors(tensors, {**grids, "c": [STEP]}, lams, dq=dq)
    assert rdquant.rd_quantize_tensors({}, [STEP], lams) == {}


@pytest.mark.parametrize("dq", [False, True])
def test_round_trip_with_rd_levels(dq):
    rng = np.random.default_rng(6)
    t = {"a.weight": (rng.standard_normal((40, 50)) * 0.02).astype(np.float32),
         "a.bias": (rng.standard_normal(50) * 0.02).astype(np.float32)}
    kw = dict(qp=-30, dq=dq, slice_size=512)
    data = gpucabac.encode(t, lam=0.2, **kw)
    out = gpucabac.decode(data)
    want = gpucabac.quantize(t, lam=0.2, **kw)
    for k in t:
        np.testing.assert_array_equal(out[k], want[k])
    assert len(data) < len(gpucabac.encode(t, **kw))
    assert gpucabac.encode(t, lam=0.0, **kw) == gpucabac.encode(t, **kw)
    # per-tensor steps and lambdas
    base = gpucabac.CodingSettings.from_keywords(**kw)
    own = {"a.weight": base.replace(step=0.01, lam=0.1)}
    d2 = gpucabac.encode(t, base, per_tensor=own)
    assert gpucabac.info(d2).tensors[0].step == pytest.approx(0.01)
    np.testing.assert_array_equal(gpucabac.decode(d2)["a.weight"], gpucabac.quantize(t, base, per_tensor=own)["a.weight"])
    # the deprecated spellings of the same thing give the same bytes
    with pytest.warns(DeprecationWarning, match="per_tensor"):
        assert gpucabac.encode(t, lam={"a.weight": 0.1}, tensor_steps={"a.weight": 0.01}, **kw) == d2


@pytest.mark.parametrize("slice_size", [300, None])
def test_encode_quantizes_rd_tensors_as_one_rd_levels_call_each(slice_size):
    # encode runs the RD tensors that share a method and lambda as one stream; the levels are
    # those of rd_levels on each tensor alone, whatever the grouping
    rng = np.random.default_rng(9)
    t = {"a": (rng.standard_normal((40, 50)) * 0.02).astype(np.float32),
         "b": (rng.standard_normal((7, 30)) * 0.03).astype(np.float32),
         "c": (rng.standard_normal((64, 20)) * 0.01).astype(np.float32),
         "d": (rng.standard_normal((3, 5)) * 0.02).astype(np.float32)}
    lam = {"a": 0.2, "b": 0.2, "c": 0.05}
    imp = {"b": rng.uniform(0.5, 2.0, (7, 30)).astype(np.float32), "d": np.float32(2.0)}
    steps = {"a": 0.004, "b": 0.006, "c": 0.002, "d": 0.005}
    done = []
    base = gpucabac.CodingSettings(quantizer="dq16", slice_size=slice_size)
    per_tensor = {n: base.replace(step=steps[n], lam=lam.get(n, 0.0)) for n in t}
    data = gpucabac.encode(t, base, per_tensor=per_tensor, importance=imp, progress=done.append)
    assert sum(done) == sum(x.size for x in t.values())
    out = gpucabac.decode(data)
    for name, x in t.items():
        S = x.size if slice_size is None else slice_size
        f = None if name not in imp else np.broadcast_to(imp[name], x.shape)
        lv = rdquant.rd_levels(x, steps[name], lam.get(name, 0.0), dq=16, slice_size=S, importance=f)
        np.testing.assert_array_equal(out[name], (lv.astype(np.float32) * np.float32(steps[name])).reshape(x.shape))
    with pytest.raises(InputError, match="do not match"):
        gpucabac.encode(t, lam=0.1, importance={"a": np.ones((2, 2))})


def test_importance_weights():
    w = _gauss(2000, seed=7)
    f = np.ones_like(w)
    f[:1000] = 1e6  # these must stay at rounding
    lv = rdquant.rd_levels(w, STEP, 0.4, importance=f, slice_size=2000)
    r = quantize_levels(w, STEP, slice_size=2000)
    np.testing.assert_array_equal(lv[:1000], r[:1000])
    assert np.abs(lv[1000:]).sum() < np.abs(r[1000:]).sum()


def test_fisher_diagonal():
    jnp = jax.numpy
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 0.0]])}
    xs = jnp.array([[1.0, 2.0], [0.0, 1.0], [3.0, -1.0]])

    def loss(p, x):
        return 0.5 * jnp.sum(jnp.square(p["w"] @ x))

    fis = rdquant.fisher_diagonal(loss, params, xs)
    want = np.mean([np.square(np.outer(np.asarray(params["w"]) @ np.asarray(x), np.asarray(x))) for x in xs], axis=0)
    np.testing.assert_allclose(np.asarray(fis["w"]), want, rtol=1e-6)
    norm = rdquant.fisher_diagonal(loss, params, xs, normalize=True)
    assert float(jnp.mean(norm["w"])) == pytest.approx(1.0)


def test_smooth_importance_recovers_a_rank_one_shape_from_noise():
    rng = np.random.default_rng(3)
    rows, cols = rng.uniform(0.1, 10, 48), rng.uniform(0.1, 10, 32)
    true = np.outer(rows, cols)
    noisy = true * rng.chisquare(2, true.shape) / 2  # a few-probe estimate: right mean, large spread
    imp = rdquant.smooth_importance(noisy, floor=0.0)
    assert imp.shape == true.shape and imp.dtype == np.float32
    assert imp.mean() == pytest.approx(1.0, rel=1e-5)
    err_smooth = np.abs(np.log(imp / (true / true.mean()))).mean()
    err_raw = np.abs(np.log(np.maximum(noisy, 1e-12) / noisy.mean() / (true / true.mean()))).mean()
    assert err_smooth < 0.25 * err_raw
    floored = rdquant.smooth_importance(noisy, floor=0.5)
    assert floored.min() >= 0.5


def test_smooth_importance_declines_untouched_or_empty_estimates():
    table = np.zeros((100, 8))
    table[:10] = 1.0  # only the calibration's 10 "tokens" have a gradient
    assert rdquant.smooth_importance(table) is None
    assert rdquant.smooth_importance(np.zeros((4, 4))) is None
    np.testing.assert_allclose(rdquant.smooth_importance(np.array([1.0, 3.0]), floor=0.0), [0.5, 1.5])
    with pytest.raises(InputError, match="non-negative"):
        rdquant.smooth_importance(np.array([1.0, -1.0]))


def test_steps_from_importance_follows_the_inverse_square_root_of_the_mean():
    imp = {"a": np.full((10, 10), 4.0), "b": np.full((10, 10), 1.0), "c": np.full((20, 10), 0.25),
           "bias": np.full(10, 100.0), "dead": np.zeros((5, 5)), "huge": np.full((1, 4), 1e9)}
    steps = rdquant.steps_from_importance(imp, 0.01)
    assert set(steps) == {"a", "b", "c", "dead", "huge"}  # 1-D arrays set no step
    assert steps["b"] / steps["a"] == pytest.approx(2.0)
    assert steps["c"] / steps["b"] == pytest.approx(2.0)
    assert steps["dead"] == pytest.approx(0.16)  # no importance: the largest ratio
    assert steps["huge"] == pytest.approx(0.01 / 16)  # clamped at the smallest ratio
    assert min(steps.values()) >= 0.01 / 16 * (1 - 1e-6) and max(steps.values()) <= 0.16 * (1 + 1e-6)
    # the numel-weighted mean log-step of the unclamped tensors is log(step)
    live = {"a": imp["a"], "b": imp["b"], "c": imp["c"]}
    s = rdquant.steps_from_importance(live, 0.01)
    n = {k: v.size for k, v in live.items()}
    assert sum(n[k] * np.log(s[k]) for k in s) / sum(n.values()) == pytest.approx(np.log(0.01), abs=1e-6)
    with pytest.raises(InputError, match="positive"):
        rdquant.steps_from_importance(live, 0.0)


def test_output_sensitivity_of_a_linear_map_is_the_input_energy():
    jnp = jax.numpy
    rng = np.random.default_rng(5)
    W = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    x = rng.standard_normal((1, 4)).astype(np.float32)
    # one input: (J^T v)_ij = v_i x_j, and v_i^2 = 1, so every probe gives diag(J^T J) = x_j^2 exactly
    f = rdquant.output_sensitivity(lambda p, b: b @ p["W"].T, {"W": W}, jnp.asarray(x), probes=3, chunk=2)
    np.testing.assert_allclose(f["W"], np.broadcast_to(x[0] ** 2, (3, 4)), rtol=1e-6)
    # several inputs: the probes' mean tends to sum_s x_sj^2 (cross terms average out)
    xs = rng.standard_normal((5, 4)).astype(np.float32)
    f = rdquant.output_sensitivity(lambda p, b: b @ p["W"].T, {"W": W}, jnp.asarray(xs), probes=512, chunk=64)
    np.testing.assert_allclose(f["W"], np.broadcast_to((xs ** 2).sum(0), (3, 4)), rtol=0.25)
    with pytest.raises(InputError, match="probes"):
        rdquant.output_sensitivity(lambda p, b: b @ p["W"].T, {"W": W}, jnp.asarray(xs), probes=0)


# --- sweeps, operating points, CLI ------------------------------------------------------------


def _small_model():
    rng = np.random.default_rng(8)
    return {"fc1.weight": (rng.standard_normal((64, 96)) * 0.02).astype(np.float32),
            "fc2.weight": (rng.standard_normal((96, 32)) * 0.05).astype(np.float32),
            "fc2.bias": np.zeros(32, np.float32)}


@pytest.fixture(scope="module")
def small_sweep():
    return gpucabac.sweep(_small_model(), [2.0 ** -7, 2.0 ** -6, 2.0 ** -5], [0.0, 0.15], methods=("urq", "dq"),
                          slice_size=2048)


def test_sweep_of_a_larger_trellis_is_what_encode_codes():
    t = _small_model()
    res = gpucabac.sweep(t, [2.0 ** -6], [0.0, 0.15], methods=("dq", "dq64"), slice_size=2048)
    by = {(m["method"], m["lam"]): m for m in res.model}
    for lam in (0.0, 0.15):
        m = by["dq64", lam]
        data = gpucabac.encode({k: t[k] for k in ("fc1.weight", "fc2.weight")}, step=2.0 ** -6, lam=lam, dq=64,
                               slice_size=2048)
        assert {i.mode for i in gpucabac.info(data).tensors} == {"dq64"}
        assert sum(i.coded_bytes + i.header_bytes for i in gpucabac.info(data).tensors) * 8 == m["exact_bits"]
        # the larger trellis reaches a lower distortion at the same step (same reconstruction grid)
        assert m["sse"] < by["dq", lam]["sse"]
    op = gpucabac.choose_operating_point(res, "dq64", target_bpw=by["dq64", 0.15]["exact_bpw"])
    assert op.dq == 64 and op.method == "dq64"


def test_sweep_rows_and_aggregates(small_sweep):
    res = small_sweep
    assert {r["tensor"] for r in res.rows} == {"fc1.weight", "fc2.weight"}  # 1-D tensors are not swept
    assert len(res.model) == 2 * 3 * 2
    t = _small_model()
    for m in res.model:
        rs = [r for r in res.rows if (r["method"], r["step"], r["lam"]) == (m["method"], m["step"], m["lam"])]
        assert m["exact_bits"] == sum(r["exact_bits"] for r in rs)
        # the exact rate is the real container's: encode with the same settings
        data = gpucabac.encode({k: t[k] for k in ("fc1.weight", "fc2.weight")}, step=m["step"], lam=m["lam"],
                               dq=container.mode_dq(m["method"]), slice_size=2048)
        assert sum(i.coded_bytes + i.header_bytes for i in gpucabac.info(data).tensors) * 8 == m["exact_bits"]
        assert m["est_bits"] == pytest.approx(sum(r["est_payload_bits"] + r["header_bits"] for r in rs))
        assert abs(m["est_bits"] - m["exact_bits"]) <= 0.02 * m["exact_bits"]
        assert abs(sum(r["est_payload_bits"] for r in rs) - sum(r["payload_bits"] for r in rs)) <= 0.02 * m["exact_bits"]
        break  # one setting is enough for the encode cross-check


def test_sweep_with_a_grid_per_tensor(small_sweep, tmp_path):
    # one grid per tensor: its rows are those of a sweep of that tensor alone over its grid, and
    # a model row is one grid index (step None where the grids differ there)
    t = _small_model()
    grids = {"fc1.weight": [2.0 ** -7, 2.0 ** -6], "fc2.weight": [2.0 ** -5, 2.0 ** -6]}
    res = gpucabac.sweep(t, grids, [0.0, 0.15], methods=("dq",), slice_size=2048)
    assert res.settings["steps"] == grids
    for name, grid in grids.items():
        alone = gpucabac.sweep({name: t[name]}, grid, [0.0, 0.15], methods=("dq",), slice_size=2048)
        mine = [r for r in res.rows if r["tensor"] == name]
        assert [(r["step"], r["lam"], r["exact_bits"], r["sse"]) for r in mine] == [
            (r["step"], r["lam"], r["exact_bits"], r["sse"]) for r in alone.rows]
    by = {(m["grid_index"], m["lam"]): m for m in res.model}
    assert len(by) == 4 and by[1, 0.0]["step"] == 2.0 ** -6 and by[0, 0.0]["step"] is None
    assert by[0, 0.15]["exact_bits"] == sum(r["exact_bits"] for r in res.rows if r["grid_index"] == 0 and r["lam"] == 0.15)
    # one setting = one grid index: each tensor at its own step
    for (i, lam), m in by.items():
        op = gpucabac.choose_operating_point(res, "dq", target_snr_db=m["snr_db"], per_tensor=False)
        j = next(j for j in (0, 1) if op.steps == {n: g[j] for n, g in grids.items()})
        assert op.bits <= m["exact_bits"] and op.bits == by[j, op.lams["fc1.weight"]]["exact_bits"]
    # the task sees each tensor at its own step
    seen = []
    gpucabac.evaluate_task(res, t, lambda m: seen.append({k: m[k] for k in grids}) or 0.0)
    base = gpucabac.CodingSettings(quantizer="dq", slice_size=2048)
    want = gpucabac.quantize({k: t[k] for k in grids}, base, per_tensor={n: base.replace(step=g[0]) for n, g in grids.items()})
    first = next(i for i, m in enumerate(res.model) if (m["grid_index"], m["lam"]) == (0, 0.0))
    assert all(np.array_equal(seen[first][k], want[k]) for k in grids)
    res.to_json(tmp_path / "g.json")
    back = gpucabac.SweepResult.from_json(tmp_path / "g.json")
    assert back.model == res.model
    with pytest.raises(gpucabac.InputError, match="same, non-zero number"):
        gpucabac.sweep(t, {"fc1.weight": [0.01], "fc2.weight": [0.01, 0.02]}, [0.0])
    with pytest.raises(gpucabac.InputError, match="no grid for"):
        gpucabac.sweep(t, {"fc1.weight": [0.01]}, [0.0])


def test_operating_point_meets_its_target(small_sweep, tmp_path):
    for per_tensor in (True, False):
        op = gpucabac.choose_operating_point(small_sweep, "dq", target_bpw=4.0, per_tensor=per_tensor)
        assert op.bpw <= 4.0
        t = _small_model()
        assert op.slice_size == 2048
        data = gpucabac.encode(t, op.coding_settings(), per_tensor=op.per_tensor())
        coded = sum(i.coded_bytes + i.header_bytes for i in gpucabac.info(data).tensors if i.name in op.steps)
        assert coded * 8 == pytest.approx(op.bits)
    op = gpucabac.choose_operating_point(small_sweep, "urq", target_snr_db=20.0)
    assert op.snr_db >= 20.0
    op2 = gpucabac.choose_operating_point(small_sweep, "urq", target_mse=op.sse / op.numel)
    assert op2.sse <= op.sse and op2.bits <= op.bits
    with pytest.raises(gpucabac.InputError):
        gpucabac.choose_operating_point(small_sweep, "urq", target_snr_db=200.0)
    small_sweep.to_json(tmp_path / "s.json")
    back = gpucabac.SweepResult.from_json(tmp_path / "s.json")
    assert [m["exact_bits"] for m in back.model] == [m["exact_bits"] for m in small_sweep.model]


def _synthetic_sweep(tables: list[list[tuple[int, float]]], scale: float = 1.0) -> gpucabac.SweepResult:
    """A sweep of made-up tensors: per tensor, (exact bits, weighted error = error) per step."""
    rows = [dict(method="dq", step=float(i + 1), lam=0.0, tensor=f"t{t}", numel=100, signal=50.0,
                 exact_bits=bits, wsse=err * scale, sse=err)
            for t, table in enumerate(tables) for i, (bits, err) in enumerate(table)]
    return gpucabac.SweepResult(dict(methods=["dq"]), rows, [])


_tables = st.lists(st.lists(st.tuples(st.integers(0, 2000), st.floats(0.0, 50.0)), min_size=1, max_size=8),
                   min_size=1, max_size=5)


@settings(max_examples=60, deadline=None)
@given(_tables, st.floats(0.5, 20.0))
def test_per_tensor_choice_is_never_beaten_by_a_common_slope(tables, bpw):
    """For a rate target, no per-tensor choice at any common slope (a dense scan of it here) that
    meets the target has less weighted error than the chosen one."""
    res = _synthetic_sweep(tables)
    budget = bpw * 100 * len(tables)
    best = None
    slopes = [0.0, *np.geomspace(1e-6, 1e6, 400)]
    for mu in slopes:
        choice = [min(table, key=lambda be: (be[1] + mu * be[0], be[0])) for table in tables]
        bits, err = sum(c[0] for c in choice), sum(c[1] for c in choice)
        if bits <= budget and (best is None or err < best):
            best = err
    try:
        op = gpucabac.choose_operating_point(res, "dq", target_bpw=bpw)
    except gpucabac.InputError:
        assert best is None
        return
    assert op.bits <= budget
    assert best is None or op.wsse <= best + 1e-9 * max(1.0, best)


def test_per_tensor_choice_has_no_preset_range_of_slopes():
    """Weighted errors of any scale (raw importance) give the same choice: the slopes come from the
    sweep, not from a fixed scan."""
    rng = np.random.default_rng(5)
    tables = []
    for _ in range(6):
        bits = np.sort(rng.integers(100, 3000, 10))
        tables.append([(int(b), float(e)) for b, e in zip(bits, np.sort(rng.uniform(0.01, 40, 10))[::-1])])
    picks = {}
    for scale in (1e-30, 1.0, 1e30):
        op = gpucabac.choose_operating_point(_synthetic_sweep(tables, scale), "dq", target_bpw=12.0)
        picks[scale] = op.steps
        assert op.wsse == pytest.approx(scale * op.sse)
    assert picks[1e-30] == picks[1.0] == picks[1e30]


def test_importance_scales_share_the_steps_rule_and_its_clamp():
    imp = {"a": np.full((4, 4), 4.0), "b": np.full((4, 4), 1.0), "dead": np.zeros((2, 2)), "bias": np.ones(3)}
    scales = rdquant.importance_scales(imp)
    assert set(scales) == {"a", "b", "dead"}
    assert scales["a"] / scales["b"] == pytest.approx(4.0)
    assert scales["a"] * scales["b"] == pytest.approx(1.0)  # equal sizes: the reference is their geometric mean
    assert scales["dead"] == pytest.approx(16.0 ** -2)
    steps = rdquant.steps_from_importance(imp, 0.01)
    for n in scales:  # steps_from_importance's step is step * scale^(-1/2)
        assert steps[n] == pytest.approx(0.01 * scales[n] ** -0.5, rel=1e-6)
    assert rdquant.importance_scales({"x": np.full((2, 2), 1e9), "y": np.full((2, 2), 1e-9)}, max_ratio=4) == {
        "x": pytest.approx(16.0), "y": pytest.approx(1 / 16)}
    with pytest.raises(gpucabac.InputError, match="max_ratio"):
        rdquant.importance_scales(imp, max_ratio=0.5)


def test_tensor_weights_scale_the_weighted_error_only(small_sweep):
    t = {k: v for k, v in _small_model().items() if k in ("fc1.weight", "fc2.weight")}
    kw = dict(methods=("dq",), slice_size=2048)
    steps, lams = small_sweep.settings["steps"][:2], [0.0, 0.1]
    plain = gpucabac.sweep(t, steps, lams, **kw)
    weighted = gpucabac.sweep(t, steps, lams, tensor_weights={"fc1.weight": 8.0}, **kw)
    assert weighted.settings["tensor_weights"] == {"fc1.weight": 8.0, "fc2.weight": 1.0}
    for a, b in zip(plain.rows, weighted.rows):
        assert (a["exact_bits"], a["sse"]) == (b["exact_bits"], b["sse"])  # the quantizer saw the same
        assert b["wsse"] == pytest.approx(a["wsse"] * (8.0 if a["tensor"] == "fc1.weight" else 1.0))
    for bad, message in (({"nope": 1.0}, "not a swept tensor"), ({"fc1.weight": 0.0}, "positive number"),
                         ({"fc1.weight": "x"}, "positive number"), ({"fc1.weight": float("inf")}, "positive number")):
        with pytest.raises(gpucabac.InputError, match=message):
            gpucabac.sweep(t, steps, lams, tensor_weights=bad, **kw)


def test_sweep_files_and_figures_are_written_whole_or_not_at_all(small_sweep, tmp_path):
    from gpucabac.plotting import plot_sweeps

    small_sweep.to_json(tmp_path / "s.json")
    small_sweep.to_csv(tmp_path / "s.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json"]  # no temporary files left
    with pytest.raises(gpucabac.InputError, match="not a sweep file"):
        gpucabac.SweepResult.from_json(tmp_path / "s.csv")
    pytest.importorskip("matplotlib")
    with pytest.raises(gpucabac.InputError, match="cannot write a figure as 'xyz'"):
        plot_sweeps([tmp_path / "s.json"], tmp_path / "rd.xyz")
    plot_sweeps([tmp_path / "s.json"], tmp_path / "rd.svg")
    assert (tmp_path / "rd.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rd.svg", "s.csv", "s.json"]


def test_cli_sweep_and_plot(tmp_path):
    from click.testing import CliRunner

    from gpucabac import cli
    from gpucabac import io as gio

    path = tmp_path / "m.npz"
    gio.write_model(path, _small_model())
    r = CliRunner().invoke(cli.main, ["sweep", str(path), "-o", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.csv"),
                                      "--qp-range", "-30:-29", "--lams", "0,0.1", "--methods", "urq",
                                      "--slice-size", "1024"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "s.csv").read_text().count("\n") == 2 * 2 * 2 + 4 + 1
    pytest.importorskip("matplotlib")
    r = CliRunner().invoke(cli.main, ["plot", str(tmp_path / "s.json"), "-o", str(tmp_path / "rd.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rd.png").read_bytes()[:4] == b"\x89PNG"


_PROBE = np.random.default_rng(11).standard_normal((4, 64)).astype(np.float32)


def _task_agreement(model):
    """A stand-in task: how close a two-layer linear map stays to the original's outputs."""
    t = _small_model()
    ref = _PROBE @ t["fc1.weight"] @ t["fc2.weight"]
    out = _PROBE @ model["fc1.weight"] @ model["fc2.weight"]
    return float(1.0 - np.sum((out - ref) ** 2) / np.sum(ref ** 2))


def test_evaluate_task_scores_the_quantized_model_of_each_setting(small_sweep, tmp_path):
    import copy

    res = copy.deepcopy(small_sweep)
    t = _small_model()
    gpucabac.evaluate_task(res, t, _task_agreement, label="agreement")
    assert res.settings["task"] == {"label": "agreement", "higher_is_better": True}
    swept = {k: t[k] for k in ("fc1.weight", "fc2.weight")}
    for m in res.model:
        rec = gpucabac.quantize(swept, step=m["step"], dq=m["method"] == "dq", lam=m["lam"], slice_size=2048)
        assert m["task"] == _task_agreement(rec)
        # the task saw the very reconstruction the sweep measured
        sse = sum(float(np.sum((rec[k].astype(np.float64) - swept[k]) ** 2)) for k in swept)
        assert sse == pytest.approx(m["sse"], rel=1e-9)
    coarse, fine = (max(res.model, key=lambda m: m["step"]), min(res.model, key=lambda m: m["step"]))
    assert fine["task"] > coarse["task"]
    with pytest.raises(gpucabac.InputError, match="not in the model"):
        gpucabac.evaluate_task(res, {"fc1.weight": t["fc1.weight"]}, _task_agreement)
    with pytest.raises(gpucabac.InputError, match="returned nan"):
        gpucabac.evaluate_task(res, t, lambda model: float("nan"))
    pytest.importorskip("matplotlib")
    res.to_json(tmp_path / "task.json")
    from gpucabac.plotting import plot_sweeps

    plot_sweeps([tmp_path / "task.json"], tmp_path / "task.png", metric="task")
    assert (tmp_path / "task.png").read_bytes()[:4] == b"\x89PNG"
    small_sweep.to_json(tmp_path / "plain.json")
    with pytest.raises(gpucabac.InputError, match="no task metric"):
        plot_sweeps([tmp_path / "plain.json"], tmp_path / "x.png", metric="task")


def test_cli_sweep_with_a_task(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from gpucabac import cli
    from gpucabac import io as gio

    path = tmp_path / "m.npz"
    gio.write_model(path, _small_model())
    (tmp_path / "mytask.py").write_text("def score(model):\n    return float(-abs(model['fc1.weight']).sum())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["sweep", str(path), "-o", str(tmp_path / "s.json"), "--qp-range", "-30:-29", "--lams", "0",
            "--methods", "urq", "--slice-size", "1024"]
    r = CliRunner().invoke(cli.main, args + ["--task", "mytask:score", "--task-label", "neg L1", "--task-lower-is-better"])
    assert r.exit_code == 0, r.output
    back = gpucabac.SweepResult.from_json(tmp_path / "s.json")
    assert back.settings["task"] == {"label": "neg L1", "higher_is_better": False}
    assert all(isinstance(m["task"], float) for m in back.model) and len(back.model) == 2
    assert "neg L1" in r.output
    for bad, message in (("mytask", "is not MODULE:FUNC"), ("nosuchmodule:f", "cannot import"),
                         ("mytask:nosuch", "cannot import")):
        r = CliRunner().invoke(cli.main, args + ["--task", bad])
        assert r.exit_code != 0 and message in r.output, (bad, r.output)


def test_cli_sweep_task_sees_the_importance_weighted_quantizer(tmp_path, monkeypatch):
    """With --importance, each setting's task score is of the model quantized as the sweep
    quantized it: the importance-weighted trellis, not the plain quantizer."""
    from click.testing import CliRunner

    from gpucabac import cli
    from gpucabac import io as gio

    t = _small_model()
    gio.write_model(tmp_path / "m.npz", t)
    rng = np.random.default_rng(8)
    imp = {k: rng.uniform(0.1, 3.0, t[k].shape).astype(np.float32) for k in ("fc1.weight", "fc2.weight")}
    gio.write_model(tmp_path / "imp.npz", imp)
    (tmp_path / "l1task.py").write_text("def score(model):\n    return float(abs(model['fc1.weight']).sum())\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    r = CliRunner().invoke(cli.main, ["sweep", str(tmp_path / "m.npz"), "-o", str(tmp_path / "s.json"),
                                      "--qp-range", "-30:-30", "--lams", "0", "--methods", "dq", "--slice-size", "1024",
                                      "--importance", str(tmp_path / "imp.npz"), "--task", "l1task:score"])
    assert r.exit_code == 0, r.output
    (m,) = gpucabac.SweepResult.from_json(tmp_path / "s.json").model
    shapes = {k: gpucabac.smooth_importance(np.asarray(a, np.float64)) for k, a in imp.items()}
    weighted = gpucabac.quantize({k: t[k] for k in imp}, step=m["step"], dq=True, importance=shapes, slice_size=1024)
    plain = gpucabac.quantize({k: t[k] for k in imp}, step=m["step"], dq=True, slice_size=1024)
    assert m["task"] == float(np.abs(weighted["fc1.weight"]).sum())
    assert m["task"] != float(np.abs(plain["fc1.weight"]).sum())


def test_cli_encode_with_lambda(tmp_path):
    from click.testing import CliRunner

    from gpucabac import cli
    from gpucabac import io as gio

    path = tmp_path / "m.npz"
    gio.write_model(path, _small_model())
    sizes = []
    for lam in ("0", "0.3"):
        out = tmp_path / f"m{lam}.gcb"
        r = CliRunner().invoke(cli.main, ["encode", str(path), "-o", str(out), "--dq", "--lam", lam])
        assert r.exit_code == 0, r.output
        sizes.append(out.stat().st_size)
        np.testing.assert_array_equal(gpucabac.load(out)["fc1.weight"],
                                      gpucabac.quantize(_small_model(), dq=True, lam=float(lam))["fc1.weight"])
    assert sizes[1] < sizes[0]


@pytest.mark.slow
def test_bench_rd_smoke(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "bench_rd.py"
    r = subprocess.run([sys.executable, str(script), "--tiny", "--single-subset", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    res = json.loads((tmp_path / "bench_rd.json").read_text())
    assert all(v["validated"] for v in res["results"].values())


def test_sweep_takes_bfloat16_tensors_as_encode_does(tmp_path):
    # "is a float tensor" is one definition (gpucabac.dtypes.is_float): bfloat16 is swept, and the
    # sweep's exact rate is what encode writes for it
    import ml_dtypes

    from click.testing import CliRunner

    from gpucabac import cli
    from gpucabac import io as gio

    rng = np.random.default_rng(8)
    t = {"w": (rng.standard_normal((24, 64)) * 0.05).astype(ml_dtypes.bfloat16), "ids": np.arange(4, dtype=np.int32)}
    res = gpucabac.sweep(t, [2.0**-6], [0.0], methods=("urq",), slice_size=256)
    assert res.settings["tensors"] == ["w"]
    info = {i.name: i for i in gpucabac.info(gpucabac.encode(t, step=2.0**-6, slice_size=256)).tensors}
    assert res.rows[0]["exact_bits"] == 8 * (info["w"].coded_bytes + info["w"].header_bytes)
    gio.write_model(tmp_path / "m.safetensors", t)
    r = CliRunner().invoke(cli.main, ["sweep", str(tmp_path / "m.safetensors"), "-o", str(tmp_path / "s.json"),
                                      "--steps", "0.015625", "--lams", "0", "--methods", "urq", "--slice-size", "256"])
    assert r.exit_code == 0, r.output
    assert gpucabac.SweepResult.from_json(tmp_path / "s.json").settings["tensors"] == ["w"]
