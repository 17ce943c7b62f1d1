"""gpucabac.fl.scaling: filter-wise scales on differential updates ("delta": w_base + s·Δw, and
"filter": s·(w_base + Δw)), checked against forward passes computed by hand, and their training."""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

from flax import nnx  # noqa: E402

from gpucabac.errors import InputError  # noqa: E402
from gpucabac.fl import models as M  # noqa: E402
from gpucabac.fl import scaling as S  # noqa: E402
from gpucabac.fl import train as T  # noqa: E402
from fl_images import learnable_images  # noqa: E402


class ConvDense(nnx.Module):
    """One 3x3 conv (2 -> 3 filters, VALID) and one dense layer (12 -> 4) on 4x4x2 inputs."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(2, 3, (3, 3), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(12, 4, rngs=rngs)

    def __call__(self, x):
        h = self.conv(x)  # (N, 2, 2, 3)
        return self.fc(h.reshape(h.shape[0], -1))


def _hand_conv(x, k, b):
    """VALID 3x3 cross-correlation in plain loops: x (N, H, W, C), k (3, 3, C, F)."""
    n, hgt, wid, _ = x.shape
    out = np.zeros((n, hgt - 2, wid - 2, k.shape[-1]))
    for i in range(hgt - 2):
        for j in range(wid - 2):
            patch = x[:, i : i + 3, j : j + 3, :]
            out[:, i, j, :] = np.einsum("nhwc,hwcf->nf", patch, k)
    return out + b


def _random_tensors(seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    base = {"conv/kernel": f32(3, 3, 2, 3), "conv/bias": f32(3), "fc/kernel": f32(12, 4), "fc/bias": f32(4)}
    delta = {k: f32(*v.shape) for k, v in base.items()}
    scales = {"conv/kernel_scale": np.array([0.5, -2.0, 3.0], np.float32), "fc/kernel_scale": np.array([2.0, 0.0, 1.0, -0.5], np.float32)}
    return base, delta, scales, f32(5, 4, 4, 2)


@pytest.mark.parametrize("placement", S.PLACEMENTS)
def test_forward_matches_hand_computation(placement):
    base, delta, scales, x = _random_tensors()
    model = ConvDense()
    M.set_params(model, S.apply_scales(base, delta, scales, placement))
    got = np.asarray(model(x))

    # by hand, by linearity of each layer in its kernel: the scale multiplies the output filter
    x64 = x.astype(np.float64)
    sc, sf = scales["conv/kernel_scale"], scales["fc/kernel_scale"]
    conv_b = _hand_conv(x64, base["conv/kernel"], 0.0)
    conv_d = _hand_conv(x64, delta["conv/kernel"], 0.0)
    conv_bias = base["conv/bias"] + delta["conv/bias"]  # biases: base + delta, never scaled
    h = (conv_b + sc * conv_d if placement == "delta" else sc * (conv_b + conv_d)) + conv_bias
    h = h.reshape(5, -1)  # (N, 2*2*3) in (h, w, c) order, as the model reshapes
    fc_b, fc_d = h @ base["fc/kernel"], h @ delta["fc/kernel"]
    fc_bias = base["fc/bias"] + delta["fc/bias"]
    expected = (fc_b + sf * fc_d if placement == "delta" else sf * (fc_b + fc_d)) + fc_bias
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4)
    # and the placements do differ on these tensors
    other = "filter" if placement == "delta" else "delta"
    M.set_params(model, S.apply_scales(base, delta, scales, other))
    assert not np.allclose(np.asarray(model(x)), expected, atol=1e-2)


def test_apply_scales_elementwise_and_partial():
    base, delta, scales, _ = _random_tensors(1)
    d = S.apply_scales(base, delta, scales, "delta")
    f = S.apply_scales(base, delta, scales, "filter")
    s = scales["conv/kernel_scale"]
    for c in range(3):
        np.testing.assert_allclose(d["conv/kernel"][..., c], base["conv/kernel"][..., c] + s[c] * delta["conv/kernel"][..., c], rtol=1e-6)
        np.testing.assert_allclose(f["conv/kernel"][..., c], s[c] * (base["conv/kernel"][..., c] + delta["conv/kernel"][..., c]), rtol=1e-6)
    np.testing.assert_array_equal(d["fc/bias"], base["fc/bias"] + delta["fc/bias"])
    np.testing.assert_array_equal(f["conv/bias"], base["conv/bias"] + delta["conv/bias"])
    # a partial update (no fc/kernel delta) and a missing scale (conv unscaled)
    part = S.apply_scales(base, {"conv/kernel": delta["conv/kernel"]}, {"fc/kernel_scale": scales["fc/kernel_scale"]}, "filter")
    np.testing.assert_array_equal(part["conv/kernel"], base["conv/kernel"] + delta["conv/kernel"])
    np.testing.assert_allclose(part["fc/kernel"], base["fc/kernel"] * scales["fc/kernel_scale"], rtol=1e-6)
    np.testing.assert_array_equal(part["fc/bias"], base["fc/bias"])
    ones = S.init_scales(base)
    np.testing.assert_allclose(S.apply_scales(base, delta, ones, "delta")["fc/kernel"], base["fc/kernel"] + delta["fc/kernel"])
    assert all(v.dtype == np.float32 for v in d.values())


def test_apply_scales_errors():
    base, delta, scales, _ = _random_tensors()
    with pytest.raises(InputError, match="placement"):
        S.apply_scales(base, delta, scales, "weights")
    with pytest.raises(InputError, match="not in the base"):
        S.apply_scales(base, {**delta, "x/kernel": np.zeros((2, 2))}, scales)
    with pytest.raises(InputError, match="shape"):
        S.apply_scales(base, {**delta, "fc/bias": np.zeros(5)}, scales)
    with pytest.raises(InputError, match="no kernel"):
        S.apply_scales(base, delta, {**scales, "fc/bias_scale": np.ones(4)})
    with pytest.raises(InputError, match="expected"):
        S.apply_scales(base, delta, {**scales, "fc/kernel_scale": np.ones(3)})


@pytest.mark.parametrize("name", M.MODEL_NAMES)
def test_scale_names_cover_every_conv_and_dense_kernel(name):
    model = M.build_model(name, size="tiny")
    params = M.get_params(model)
    names = S.scale_names(params)
    layers = [M.path_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, (nnx.Conv, nnx.Linear))]
    assert sorted(names) == sorted(f"{layer}/kernel" for layer in layers)
    assert all(s == k + "_scale" and s.endswith("scale") and s not in params for k, s in names.items())
    assert S.scale_names(model) == names
    init = S.init_scales(params)
    assert set(init) == set(names.values())
    for k, s in names.items():
        assert init[s].shape == (params[k].shape[-1],) and init[s].dtype == np.float32 and np.all(init[s] == 1)


@functools.lru_cache(maxsize=None)
def _client(name="vgg", n=128, seed=0):
    """A base, a dense local update on learnable data, its top-2 % sparsification, the model
    (shared by the tests, which check that they leave it as it is)."""
    x, y = learnable_images(n, seed)
    model = M.build_model(name, seed=0, size="tiny")
    base = M.get_params(model)
    T.local_train(model, x, y, epochs=3, batch_size=32, lr=1e-2, seed=1)
    delta = {k: v - base[k] for k, v in M.get_params(model).items()}
    sparse = {}
    for k, d in delta.items():
        keep = max(1, d.size // 50)
        thr = np.sort(np.abs(d).ravel())[-keep]
        sparse[k] = np.where(np.abs(d) >= thr, d, 0).astype(np.float32)
    return model, base, sparse, x, y


def _loss(model, params, x, y):
    probe = nnx.clone(model)
    M.set_params(probe, params)
    return T.evaluate(probe, x, y)[0]


@pytest.mark.parametrize("placement", S.PLACEMENTS)
def test_train_scales_improves_a_sparse_update_and_freezes_the_rest(placement):
    model, base, sparse, x, y = _client()
    base_copy = {k: v.copy() for k, v in base.items()}
    sparse_copy = {k: v.copy() for k, v in sparse.items()}
    model_params = M.get_params(model)
    unscaled = _loss(model, S.apply_scales(base, sparse, {}, placement), x, y)
    scales = S.train_scales(model, base, sparse, x, y, placement=placement, steps=30, seed=0)
    assert set(scales) == set(S.scale_names(base).values())
    assert all(v.dtype == np.float32 and v.shape == (base[k].shape[-1],) for k, v in zip(S.scale_names(base), scales.values()))
    assert any(np.any(v != 1) for v in scales.values())
    scaled = _loss(model, S.apply_scales(base, sparse, scales, placement), x, y)
    assert scaled < unscaled - 0.02
    # base, delta and the model are untouched
    assert all(np.array_equal(base[k], base_copy[k]) and np.array_equal(sparse[k], sparse_copy[k]) for k in base)
    assert all(np.array_equal(M.get_params(model)[k], model_params[k]) for k in model_params)
    # deterministic given the seed; steps=0 gives the initial ones
    again = S.train_scales(model, base, sparse, x, y, placement=placement, steps=30, seed=0)
    assert all(np.array_equal(scales[k], again[k]) for k in scales)
    assert all(np.all(v == 1) for v in S.train_scales(model, base, sparse, x, y, placement=placement, steps=0).values())


def test_train_scales_keeps_batchnorm_frozen():
    model, base, sparse, x, y = _client("resnet", n=64)
    stats = M.get_batch_stats(model)
    scales = S.train_scales(model, base, sparse, x, y, placement="filter", steps=10, batch_size=16, seed=0)
    assert all(np.array_equal(M.get_batch_stats(model)[k], stats[k]) for k in stats)
    # eval mode: the loss the scales were trained for is the one evaluate reports (running stats)
    assert _loss(model, S.apply_scales(base, sparse, scales, "filter"), x, y) < _loss(model, S.apply_scales(base, sparse, {}, "filter"), x, y)
    # a delta filter that is all zero has no gradient in the "delta" placement: its scale stays 1
    zero = {k: np.zeros_like(v) if k == "fc/kernel" else v for k, v in sparse.items()}
    s = S.train_scales(model, base, zero, x, y, placement="delta", steps=5, batch_size=16)
    assert np.all(s["fc/kernel_scale"] == 1) and any(np.any(v != 1) for v in s.values())


def test_train_scales_errors():
    model, base, sparse, x, y = ConvDense(), *_random_tensors()[:2], None, None
    with pytest.raises(InputError, match="placement"):
        S.train_scales(model, base, sparse, x, y, placement="both")
    with pytest.raises(InputError, match="steps"):
        S.train_scales(model, base, sparse, x, y, steps=-1)
    with pytest.raises(InputError, match="does not match"):
        S.train_scales(model, {k: v for k, v in base.items() if k != "fc/bias"}, sparse, x, y)
    with pytest.raises(InputError, match="every kernel"):
        S.train_scales(model, base, sparse, x, y, init={"fc/kernel_scale": np.ones(4)})


def test_train_scales_follows_the_eval_mode_gradient():
    """One Adam step from s = 1 moves every scale by -lr·sign(g) (Adam's first step), g the gradient
    of the eval-mode loss (BatchNorm on running statistics, weights frozen) of the whole batch."""
    import jax
    import jax.numpy as jnp
    import optax

    model, base, sparse, x, y = _client("resnet", n=64)
    lr = 1e-3
    got = S.train_scales(model, base, sparse, x, y, placement="filter", steps=1, batch_size=64, lr=lr)
    layout = M.ParamLayout(nnx.view(model, use_running_average=True))

    def loss(scales):
        params = S.apply_scales(base, sparse, scales, "filter")
        logits = nnx.merge(layout.graphdef, layout.to_state(params), layout.rest, copy=True)(jnp.asarray(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y, jnp.int32)).mean()

    grads = jax.grad(loss)({k: jnp.asarray(v) for k, v in S.init_scales(base).items()})
    for k, g in grads.items():
        g = np.asarray(g)
        sure = np.abs(g) > 1e-5
        assert sure.sum() >= g.size // 2, k
        np.testing.assert_allclose(got[k][sure], 1 - lr * np.sign(g[sure]), rtol=0, atol=lr * 1e-2, err_msg=k)
