"""gpucabac.fl.sparsify: exact counts and the tie rule of top-k (per tensor and global) and
random-k, NNCodec's statistics threshold and structured pass (methods_spec §3.10) against an
independent re-statement of the spec, exemptions, and the typed errors."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gpucabac.errors import InputError
from gpucabac.fl import sparsify as sp

# small integer-valued floats: many ties, and both signs of zero
_tied = st.sampled_from([-3.0, -2.0, -1.0, -0.0, 0.0, 1.0, 2.0, 3.0])
_arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6), elements=_tied)
_densities = st.floats(0.0, 1.0)


def _oracle_topk(mag: np.ndarray, k: int) -> np.ndarray:
    """Flat mask: sort by (-|x|, index) and keep the first k."""
    order = np.lexsort((np.arange(mag.size), -mag.astype(np.float64)))
    mask = np.zeros(mag.size, bool)
    mask[order[:k]] = True
    return mask


def test_keep_count_rounds_to_the_nearest_halves_up():
    assert sp.keep_count(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in binary
    assert sp.keep_count(0.5, 3) == 2 and sp.keep_count(0.25, 2) == 1 and sp.keep_count(0.2, 2) == 0
    assert sp.keep_count(0.0, 10) == 0 and sp.keep_count(1.0, 10) == 10 and sp.keep_count(1.0, 0) == 0
    assert sp.keep_count(1 - 0.999, 1000) == 1  # a sparsity's complement keeps its count


@given(_arrays, _densities)
def test_topk_keeps_exactly_k_largest_ties_to_lower_index(x, density):
    out, res = sp.topk({"w": x}, density=density)
    k = sp.keep_count(density, x.size)
    mask = res.masks["w"]
    assert mask.shape == x.shape and mask.sum() == k == res.kept and res.eligible == x.size
    assert np.array_equal(mask.ravel(), _oracle_topk(np.abs(x).ravel(), k))
    assert np.array_equal(out["w"], np.where(mask, x, 0)) and out["w"].dtype == x.dtype


def test_topk_all_equal_and_the_extremes():
    x = np.full((4, 5), -0.5, np.float32)
    _, res = sp.topk({"w": x}, density=0.35)  # k = 7: the first seven positions
    assert np.flatnonzero(res.masks["w"]).tolist() == list(range(7))
    out, res = sp.topk({"w": x}, density=0.0)
    assert res.kept == 0 and not out["w"].any() and res.zero_fraction == 1.0
    out, res = sp.topk({"w": x}, sparsity=0.0)
    assert res.kept == 20 and np.array_equal(out["w"], x)
    z = np.array([[0.0, -0.0], [-0.0, 0.0]], np.float32)  # ±0 tie: lower index first, count exact
    _, res = sp.topk({"w": z}, density=0.5)
    assert np.flatnonzero(res.masks["w"]).tolist() == [0, 1]


def test_topk_keeps_float16_bfloat16_float64():
    for dt in (np.float16, ml_dtypes.bfloat16, np.float64):
        x = np.arange(-6, 6, dtype=np.float32).reshape(3, 4).astype(dt)
        out, res = sp.sparsify({"w": x}, "topk", density=0.25)
        assert out["w"].dtype == np.dtype(dt) and res.kept == 3
        assert sorted(np.abs(out["w"].astype(np.float32)[res.masks["w"]]).tolist()) == [5.0, 5.0, 6.0]


@given(st.lists(_arrays, min_size=1, max_size=3), _densities)
def test_global_topk_is_topk_of_the_concatenation(xs, density):
    update = {f"t{i}": x for i, x in enumerate(xs)}
    _, res = sp.global_topk(update, density=density)
    flat = np.concatenate([x.ravel() for x in xs])
    want = _oracle_topk(np.abs(flat), sp.keep_count(density, flat.size))
    assert np.array_equal(np.concatenate([res.masks[n].ravel() for n in update]), want)
    assert res.kept == want.sum() and res.eligible == flat.size


def test_global_and_per_tensor_differ():
    rng = np.random.default_rng(0)
    update = {"big": rng.normal(0, 1.0, (10, 10)).astype(np.float32), "small": rng.normal(0, 1e-3, (10, 10)).astype(np.float32)}
    _, per = sp.sparsify(update, "topk", density=0.1)
    _, glob = sp.sparsify(update, "global_topk", density=0.1)
    assert per.masks["big"].sum() == per.masks["small"].sum() == 10
    assert glob.masks["big"].sum() == 20 and glob.masks["small"].sum() == 0 and glob.kept == per.kept == 20
    # a tie across tensors goes to the earlier tensor in the mapping's order
    ones = {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)}
    _, res = sp.global_topk(ones, density=0.5)
    assert res.masks["a"].all() and not res.masks["b"].any()
    _, res = sp.global_topk(dict(reversed(list(ones.items()))), density=0.5)
    assert res.masks["b"].all() and not res.masks["a"].any()


def test_random_k_is_exact_and_seeded():
    rng = np.random.default_rng(1)
    update = {"a": rng.normal(size=(8, 9)).astype(np.float32), "b": rng.normal(size=(3, 3, 4, 5)).astype(np.float32)}
    out1, r1 = sp.sparsify(update, "random", density=0.3, seed=7)
    out2, r2 = sp.random_k(update, density=0.3, seed=np.random.default_rng(7))
    _, r3 = sp.random_k(update, density=0.3, seed=8)
    for n, x in update.items():
        assert r1.masks[n].sum() == sp.keep_count(0.3, x.size)
        assert np.array_equal(r1.masks[n], r2.masks[n]) and np.array_equal(out1[n], out2[n])
    assert any(not np.array_equal(r1.masks[n], r3.masks[n]) for n in update)
    _, r4 = sp.random_k(update, density=1.0, seed=0)
    assert all(m.all() for m in r4.masks.values())


def test_only_eligible_tensors_are_sparsified():
    rng = np.random.default_rng(2)
    bias = rng.normal(size=16).astype(np.float32)
    update = {"conv.kernel": rng.normal(size=(3, 3, 4, 16)).astype(np.float32), "conv.bias": bias,
              "conv.weight_scaling": rng.normal(size=(16, 1)).astype(np.float32),
              "conv/scale": rng.normal(size=(1, 16)).astype(np.float32),
              "up.kernel_scale": rng.normal(size=(4, 4)).astype(np.float32),
              "upscale": rng.normal(size=(4, 4)).astype(np.float32)}
    for method in sp.METHODS:
        out, res = sp.sparsify(update, method, sparsity=0.9, step=1e-3, seed=0)
        assert set(res.masks) == {"conv.kernel", "upscale"}, method
        for n in ("conv.bias", "conv.weight_scaling", "conv/scale", "up.kernel_scale"):
            assert out[n] is update[n], (method, n)
        assert np.count_nonzero(out["upscale"]) < 16 and np.count_nonzero(out["conv.kernel"]) < 576
    _, res = sp.topk(update, density=0.5, exempt=lambda name: name.startswith("conv"))
    assert set(res.masks) == {"up.kernel_scale", "upscale"}
    _, res = sp.topk(update, density=0.5, exempt=("kernel",), min_ndim=1)
    # the exemption given replaces the default: the scales are eligible now, "conv.kernel" is not
    assert set(res.masks) == {"conv.bias", "conv.weight_scaling", "conv/scale", "up.kernel_scale", "upscale"}


# --- methods_spec §3.10 -----------------------------------------------------------------------

def _spec_stats(update, target, step, max_iter=500):
    """§3.10, step 1, restated: (result, δ or None, iterations)."""
    def cut(src, delta):
        res = {}
        for n, w in src.items():
            if w.ndim < 2 or not w.any():
                res[n] = w
                continue
            tau = step / 2
            if delta is not None:
                m, s = float(np.mean(w, dtype=np.float64)), float(np.std(w, dtype=np.float64))
                tau = max(tau, abs(m - delta * s), abs(m + delta * s))
            res[n] = np.where(np.abs(w.astype(np.float64)) < tau, 0, w).astype(w.dtype)
        return res

    def zeros(u):
        return sum(int((a == 0).sum()) for a in u.values()) / sum(a.size for a in u.values())

    base = cut(update, None)
    cur, d, inc, it, delta = base, 0.25, 0.2, 0, None
    while it < max_iter and zeros(cur) < target:
        gap = target - zeros(cur)
        inc = 0.01 if gap < 0.05 else 0.05 if gap < 0.10 else 0.10 if gap < 0.30 else inc
        d, it = d + inc, it + 1
        cur, delta = cut(base, d), d
    return cur, delta, it


def _gauss_update(seed, scale=0.01):
    rng = np.random.default_rng(seed)
    return {"conv.kernel": rng.normal(0.001, scale, (3, 3, 8, 16)).astype(np.float32),
            "dense.kernel": rng.laplace(0, scale, (128, 10)).astype(np.float32),
            "dense.bias": rng.normal(0, scale, 10).astype(np.float32)}


@pytest.mark.parametrize("target", [0.3, 0.6, 0.9, 0.99])
@pytest.mark.parametrize("step", [1e-4, 4e-3])
def test_stats_threshold_reaches_the_target_as_the_spec_says(target, step):
    update = _gauss_update(3)
    out, res = sp.stats_threshold(update, sparsity=target, step=step)
    want, delta, it = _spec_stats(update, target, step)
    assert res.zero_fraction >= target and res.iterations == it and res.delta == pytest.approx(delta)
    for n in update:
        assert np.array_equal(out[n], want[n]), n
    for n, tau in res.thresholds.items():  # never below Δ/2, and exactly the cut made
        assert tau >= step / 2
        kept = np.abs(out[n][res.masks[n]])
        assert (kept >= tau).all() and (np.abs(update[n][~res.masks[n]]) < tau).all()
    assert out["dense.bias"] is update["dense.bias"]


def test_stats_threshold_never_below_half_step_and_counts_all_parameters():
    update = _gauss_update(4, scale=1e-3)
    step = 0.1  # Δ/2 = 0.05 ≫ every value: the first pass zeroes all the eligible ones
    out, res = sp.stats_threshold(update, sparsity=0.5, step=step)
    assert res.delta is None and res.iterations == 0 and set(res.thresholds.values()) == {0.05}
    assert not out["conv.kernel"].any() and not out["dense.kernel"].any()
    # the fraction is over ALL values: a large ineligible all-zero tensor meets the target alone
    big = dict(update, **{"other.bias": np.zeros(100_000, np.float32)})
    out, res = sp.stats_threshold(big, sparsity=0.9, step=1e-6)
    assert res.iterations == 0 and res.zero_fraction >= 0.9
    assert np.count_nonzero(out["conv.kernel"]) == np.count_nonzero(update["conv.kernel"])


def test_stats_threshold_floor_holds_while_delta_rises():
    update = _gauss_update(7)
    update["dense.kernel"][0, 0] = 10.0  # Δ/2 = 0.5 keeps only this one; |μ ± δσ| stays far below 0.5
    out, res = sp.stats_threshold(update, sparsity=0.6, step={"conv.kernel": 1e-4, "dense.kernel": 1.0})
    assert res.delta is not None and res.iterations > 0  # the conv kernel drove δ up
    w = out["dense.kernel"].astype(np.float64)
    mu, sigma = w.mean(), w.std()
    assert max(abs(mu - res.delta * sigma), abs(mu + res.delta * sigma)) < 0.5 == res.thresholds["dense.kernel"]
    assert np.count_nonzero(out["dense.kernel"]) == 1


def test_stats_delta_schedule_and_iteration_cap():
    update = _gauss_update(5)
    _, res = sp.stats_threshold(update, sparsity=0.999, step=1e-6, max_iterations=3)
    assert res.iterations == 3 and res.delta == pytest.approx(0.25 + 3 * 0.2)  # gap ≥ 0.30: steps of 0.2
    # the ineligible bias holds 10 of 2442 values (0.41%): 99.9% cannot be reached, the cap stops the search
    _, res = sp.stats_threshold(update, sparsity=0.999, step=1e-6)
    _, delta, it = _spec_stats(update, 0.999, 1e-6)
    assert res.iterations == it == 500 and res.delta == pytest.approx(delta) and res.zero_fraction < 0.999
    del update["dense.bias"]
    _, res = sp.stats_threshold(update, sparsity=0.999, step=1e-6)
    _, delta, it = _spec_stats(update, 0.999, 1e-6)
    assert res.iterations == it < 500 and res.delta == pytest.approx(delta) and res.zero_fraction >= 0.999
    _, res = sp.stats_threshold(update, density=1.0, step=1e-6)  # target sparsity 0: nothing to raise
    assert res.iterations == 0


def _spec_filters(w, g, axis):
    """§3.10, step 2, restated: the indices of the ⌊p·F⌋ filters of smallest mean |w|."""
    moved = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0)
    means = moved.reshape(moved.shape[0], -1).mean(axis=1)
    count = int((means < g * means.mean()).sum())  # p·F
    return set(np.argsort(means, kind="stable")[:count].tolist())


@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 9)),
                  elements=st.floats(-4, 4, width=32)),
       st.sampled_from([0.5, 0.9, 1.0, 1.5]), st.sampled_from([-1, 0, 1]))
def test_structured_zeroes_floor_p_f_filters(w, g, axis):
    out, res = sp.structured({"w": w}, factor=g, filter_axis=axis)
    moved = np.moveaxis(out["w"], axis, 0)
    want = _spec_filters(w, g, axis) if w.any() else set()
    assert res.filters_zeroed["w"] == len(want)
    for f in range(moved.shape[0]):
        if f in want:
            assert not moved[f].any()
        else:
            assert np.array_equal(moved[f], np.moveaxis(w, axis, 0)[f])


def test_structured_default_axis_is_flax_output_filters():
    w = np.ones((3, 3, 2, 10), np.float32)
    w[..., :4] *= 0.1  # four weak output filters (last axis)
    out, res = sp.structured({"conv.kernel": w})
    assert res.filters_zeroed["conv.kernel"] == 4 and not out["conv.kernel"][..., :4].any() and out["conv.kernel"][..., 4:].all()
    out, res = sp.structured({"conv.kernel": w}, filter_axis=0)  # PyTorch layout: the first axis, all alike
    assert res.filters_zeroed["conv.kernel"] == 0
    out, res = sp.structured({"conv.kernel": w}, factor=0.0)
    assert res.filters_zeroed["conv.kernel"] == 0 and np.array_equal(out["conv.kernel"], w)


def test_stats_method_runs_both_passes():
    update = _gauss_update(6)
    step = 2e-3
    out, res = sp.sparsify(update, "stats", sparsity=0.6, step=step, struct_factor=0.9)
    first, _, _ = _spec_stats(update, 0.6, step)
    for n in ("conv.kernel", "dense.kernel"):
        zeroed = _spec_filters(first[n], 0.9, -1)
        assert res.filters_zeroed[n] == len(zeroed) > 0
        assert np.array_equal(out[n], np.where(np.isin(np.arange(first[n].shape[-1]), list(zeroed)), 0, first[n]))
        assert np.array_equal(res.masks[n], out[n] != 0)
    assert res.zero_fraction >= 0.6
    out0, res0 = sp.sparsify(update, "stats", sparsity=0.6, step=step, struct_factor=0)
    assert res0.filters_zeroed is None and all(np.array_equal(out0[n], first[n]) for n in update)
    _, per = sp.sparsify(update, "stats", sparsity=0.6, step={"conv.kernel": step, "dense.kernel": 1.0})
    assert per.thresholds["dense.kernel"] == 0.5


# --- errors -----------------------------------------------------------------------------------

W = {"w": np.ones((4, 4), np.float32)}


@pytest.mark.parametrize("kwargs, match", [
    (dict(density=1.5), "density"), (dict(density=-0.1), "density"), (dict(density=math.nan), "density"),
    (dict(density=True), "density"), (dict(density="0.5"), "density"), (dict(sparsity=2.0), "sparsity"),
    (dict(density=0.5, sparsity=0.5), "exactly one"), (dict(), "exactly one"),
    (dict(density=0.5, exempt=3), "exempt"), (dict(density=0.5, exempt=("",)), "exempt"),
    (dict(density=0.5, min_ndim=-1), "min_ndim"),
])
def test_bad_arguments_raise_input_error(kwargs, match):
    for method in sp.METHODS:
        with pytest.raises(InputError, match=match):
            sp.sparsify(W, method, step=0.01, seed=0, **kwargs)


def test_bad_tensors_and_fields_raise_input_error_naming_them():
    with pytest.raises(InputError, match="method"):
        sp.sparsify(W, "magnitude", density=0.5)
    with pytest.raises(InputError, match="'ints'.*float"):
        sp.sparsify({"ints": np.ones((2, 2), np.int32)}, "topk", density=0.5)
    with pytest.raises(InputError, match="'flags'.*float"):
        sp.sparsify({"flags": np.ones((2, 2), bool)}, "topk", density=0.5)
    for bad in (np.nan, np.inf):
        x = np.ones((3, 3), np.float32)
        x[1, 1] = bad
        with pytest.raises(InputError, match="'bad'.*NaN"):
            sp.sparsify({"ok": np.ones((2, 2), np.float32), "bad": x}, "global_topk", density=0.5)
    with pytest.raises(InputError, match="mapping"):
        sp.sparsify([np.ones((2, 2))], "topk", density=0.5)
    with pytest.raises(InputError, match="step"):
        sp.sparsify(W, "stats", sparsity=0.5)
    for step in (0.0, -1.0, math.inf, True):
        with pytest.raises(InputError, match="step"):
            sp.sparsify(W, "stats", sparsity=0.5, step=step)
    with pytest.raises(InputError, match="step.*'w'"):
        sp.sparsify(W, "stats", sparsity=0.5, step={"other": 0.1})
    with pytest.raises(InputError, match="'w'.*filter_axis"):
        sp.sparsify(W, "stats", sparsity=0.5, step=0.01, filter_axis=2)
    with pytest.raises(InputError, match="struct_factor"):
        sp.sparsify(W, "stats", sparsity=0.5, step=0.01, struct_factor=-1)
    for seed in (-1, 1.5, "x"):
        with pytest.raises(InputError, match="seed"):
            sp.sparsify(W, "random", density=0.5, seed=seed)
    with pytest.raises(InputError, match="max_iterations"):
        sp.stats_threshold(W, sparsity=0.5, step=0.01, max_iterations=-1)
