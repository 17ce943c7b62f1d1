"""gpucabac.fl.models and gpucabac.fl.train: the Flax NNX CNNs, their variables as flat dicts,
local training and evaluation (BatchNorm in train mode to train, eval mode to evaluate)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")

from flax import nnx  # noqa: E402

from gpucabac.errors import InputError  # noqa: E402
from gpucabac.fl import models as M  # noqa: E402
from gpucabac.fl import train as T  # noqa: E402
from fl_images import learnable_images  # noqa: E402

# (name, size): parameter elements (nnx.Param), as the module docstring states
PARAM_COUNTS = {
    ("vgg", "tiny"): 13_974,
    ("vgg", "small"): 1_009_102,
    ("resnet", "tiny"): 1_382,
    ("resnet", "small"): 77_754,
    ("mobilenet", "tiny"): 554,
    ("mobilenet", "small"): 31_946,
}


_data = learnable_images


@pytest.mark.parametrize("name, size", sorted(PARAM_COUNTS))
def test_parameter_counts_and_layer_kinds(name, size):
    model = M.build_model(name, seed=0, size=size)
    assert M.num_params(model) == PARAM_COUNTS[(name, size)]
    params = M.get_params(model)
    assert sum(v.size for v in params.values()) == PARAM_COUNTS[(name, size)]
    assert all(v.dtype == np.float32 for v in params.values())
    n_conv = n_dense = 0
    for path, module in nnx.iter_modules(model):
        prefix = M.path_name(path)
        if isinstance(module, nnx.Conv):
            n_conv += 1
            k = params[f"{prefix}/kernel"]
            assert k.ndim == 4 and k.shape[-1] == module.out_features  # output filters last
            assert k.shape[2] == module.in_features // module.feature_group_count
        elif isinstance(module, nnx.Linear):
            n_dense += 1
            k = params[f"{prefix}/kernel"]
            assert k.shape == (module.in_features, module.out_features)
    assert n_conv >= 2 and n_dense >= 1
    kernels = [k for k, v in params.items() if M.is_kernel(k, v.shape)]
    assert len(kernels) == n_conv + n_dense  # nothing else is taken for a kernel


@pytest.mark.parametrize("name", M.MODEL_NAMES)
def test_tiny_forward_shape_and_determinism(name):
    a = M.build_model(name, seed=5, size="tiny")
    b = M.build_model(name, seed=5, size="tiny")
    c = M.build_model(name, seed=6, size="tiny")
    pa, pb, pc = M.get_params(a), M.get_params(b), M.get_params(c)
    assert list(pa) == list(pb)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    assert any(not np.array_equal(pa[k], pc[k]) for k in pa)
    x, _ = _data(3)
    out = nnx.view(a, use_running_average=True, raise_if_not_found=False)(x)
    assert out.shape == (3, 10) and np.all(np.isfinite(np.asarray(out)))


def test_mobilenet_has_depthwise_convs():
    model = M.build_model("mobilenet", size="tiny")
    dw = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Conv) and m.feature_group_count > 1]
    assert dw and all(m.feature_group_count == m.in_features == m.out_features for m in dw)
    assert M.get_params(model)["blocks/0/dw/kernel"].shape == (3, 3, 1, 4)


def test_resnet_params_versus_batch_stats():
    model = M.build_model("resnet", size="tiny")
    kinds = M.variable_kinds(model)
    params, stats = M.get_params(model), M.get_batch_stats(model)
    assert set(kinds) == set(params) | set(stats) and not set(params) & set(stats)
    bn_layers = [M.path_name(p) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    assert len(bn_layers) == 6  # stem, 2 per block, the projection's
    for layer in bn_layers:
        assert kinds[f"{layer}/scale"] == kinds[f"{layer}/bias"] == "param"
        assert kinds[f"{layer}/mean"] == kinds[f"{layer}/var"] == "batch_stat"
    assert set(stats) == {f"{l}/{s}" for l in bn_layers for s in ("mean", "var")}
    assert "blocks/1/proj/kernel" in params and "stem/bias" not in params  # convs before BN: no bias
    assert M.get_batch_stats(M.build_model("vgg", size="tiny")) == {}


def test_set_params_roundtrip_and_errors():
    model = M.build_model("resnet", size="tiny")
    params = M.get_params(model)
    new = {k: v + 1.5 for k, v in params.items()}
    M.set_params(model, new)
    got = M.get_params(model)
    assert all(np.array_equal(got[k], new[k]) for k in new)
    stats = M.get_batch_stats(model)
    M.set_batch_stats(model, {k: v + 2 for k, v in stats.items()})
    assert all(np.array_equal(M.get_batch_stats(model)[k], stats[k] + 2) for k in stats)
    M.set_params(model, {"fc/bias": np.zeros(10)}, partial=True)
    assert np.array_equal(M.get_params(model)["fc/bias"], np.zeros(10)) and M.get_params(model)["fc/bias"].dtype == np.float32
    with pytest.raises(InputError, match="missing"):
        M.set_params(model, {"fc/bias": np.zeros(10)})
    with pytest.raises(InputError, match="no such"):
        M.set_params(model, {**new, "fc/nope": np.zeros(1)})
    with pytest.raises(InputError, match="shape"):
        M.set_params(model, {**new, "fc/bias": np.zeros(11)})
    with pytest.raises(InputError, match="no such"):
        M.set_batch_stats(model, {"fc/kernel": new["fc/kernel"]}, partial=True)


def test_param_layout_matches_names():
    model = M.build_model("resnet", size="tiny")
    layout = M.ParamLayout(model)
    params = M.get_params(model)
    assert sorted(layout.names) == sorted(params)
    flat = layout.from_state(nnx.state(model, nnx.Param))
    assert all(np.array_equal(np.asarray(flat[k]), params[k]) for k in params)
    moved = {k: v * 2 for k, v in params.items()}
    rebuilt = nnx.merge(layout.graphdef, layout.to_state(moved), layout.rest)
    assert all(np.array_equal(M.get_params(rebuilt)[k], moved[k]) for k in moved)


def test_build_model_errors():
    with pytest.raises(InputError, match="unknown model"):
        M.build_model("alexnet")
    with pytest.raises(InputError, match="unknown size"):
        M.build_model("vgg", size="huge")


# --- training ------------------------------------------------------------------------------------


def test_local_train_reduces_loss_and_is_deterministic():
    x, y = _data(64)
    a = M.build_model("vgg", seed=0, size="tiny")
    before = T.evaluate(a, x, y)
    losses = T.local_train(a, x, y, epochs=6, batch_size=32, lr=1e-2, seed=1)
    after = T.evaluate(a, x, y)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert after[0] < before[0] - 0.3 and after[1] > before[1]
    b = M.build_model("vgg", seed=0, size="tiny")
    T.local_train(b, x, y, epochs=6, batch_size=32, lr=1e-2, seed=1)
    pa, pb = M.get_params(a), M.get_params(b)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    c = M.build_model("vgg", seed=0, size="tiny")
    T.local_train(c, x, y, epochs=6, batch_size=32, lr=1e-2, seed=2)  # another data order
    assert any(not np.array_equal(pa[k], M.get_params(c)[k]) for k in pa)


def test_sgd_and_settings():
    x, y = _data(48)
    model = M.build_model("vgg", seed=0, size="tiny")
    s = T.TrainSettings(epochs=6, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.9)
    losses = T.local_train(model, x, y, **s.as_kwargs(), seed=0)
    assert losses[-1] < losses[0]
    with pytest.raises(InputError, match="optimizer"):
        T.local_train(model, x, y, optimizer="lion")
    with pytest.raises(InputError, match="lr"):
        T.local_train(model, x, y, lr=0.0)
    with pytest.raises(InputError, match="labels"):
        T.local_train(model, x, y[:-1])


def test_batchnorm_train_mode_in_training_eval_mode_in_evaluate():
    x, y = _data(40)
    model = M.build_model("resnet", seed=0, size="tiny")
    stats0 = M.get_batch_stats(model)
    # eval mode: a sample's loss does not depend on the rest of its batch
    l_full, _ = T.evaluate(model, x, y, batch_size=40)
    l_small, _ = T.evaluate(model, x, y, batch_size=7)
    assert l_full == pytest.approx(l_small, rel=1e-5)
    assert all(np.array_equal(M.get_batch_stats(model)[k], stats0[k]) for k in stats0)  # untouched
    T.local_train(model, x, y, epochs=1, batch_size=20, lr=1e-3, seed=0)
    stats1 = M.get_batch_stats(model)
    assert all(not np.array_equal(stats1[k], stats0[k]) for k in stats0)  # train mode updated them
    # the running statistics are what evaluate uses
    l_before, _ = T.evaluate(model, x, y)
    M.set_batch_stats(model, {k: (v + 3 if k.endswith("mean") else v) for k, v in stats1.items()})
    assert T.evaluate(model, x, y)[0] != pytest.approx(l_before, rel=1e-3)


def test_recalibrate_batch_stats_is_the_data_mean():
    x, _ = _data(32)
    model = M.build_model("resnet", seed=0, size="tiny")
    M.set_batch_stats(model, {k: np.full_like(v, 7.0) for k, v in M.get_batch_stats(model).items()})
    params = M.get_params(model)
    T.recalibrate_batch_stats(model, x, batch_size=32)  # one batch: exactly its statistics
    stats = M.get_batch_stats(model)
    conv = np.asarray(model.stem(x))
    np.testing.assert_allclose(stats["stem_bn/mean"], conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["stem_bn/var"], conv.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-6)
    assert all(np.array_equal(M.get_params(model)[k], params[k]) for k in params)  # parameters untouched
    assert all(np.all(v != 7.0) for v in stats.values())  # every layer re-estimated
    T.recalibrate_batch_stats(model, x, batch_size=8)  # four batches: the average of their means
    np.testing.assert_allclose(M.get_batch_stats(model)["stem_bn/mean"], conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_epoch_batches_and_round_seed():
    rng = np.random.default_rng(0)
    b = T.epoch_batches(10, 4, rng)
    assert b.shape == (3, 4) and set(b.ravel()) == set(range(10))
    assert T.epoch_batches(3, 64, rng).shape == (1, 3)
    seeds = {T.round_seed(0, c, r) for c in range(5) for r in range(5)}
    assert len(seeds) == 25 and T.round_seed(0, 1, 2) == T.round_seed(0, 1, 2)
    assert T.as_inputs(np.full((2, 28, 28), 255, np.uint8)).max() == 1.0
