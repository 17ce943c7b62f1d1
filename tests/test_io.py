"""Model files in and out (gpucabac.io): round trips, interop with files other tools write,
atomic writes and clean errors."""

from __future__ import annotations

import json
import os
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from gpucabac import io as gio
from gpucabac.errors import InputError, ModelFileError

FORMATS = ["safetensors", "npz", "pt", "pth"]
BF16 = np.dtype(ml_dtypes.bfloat16)


def _needs(ext):
    if ext in ("pt", "pth"):
        pytest.importorskip("torch", reason="the .pt/.pth format needs the gpucabac[torch] extra")


def _sample(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 50
    if np.dtype(dtype) == np.bool_:
        return x > 0
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(x, info.min, info.max).astype(dtype)
    return x.astype(dtype)


def _model():
    """One tensor per supported dtype, plus 0-d, empty, odd-shaped and order-revealing names."""
    tensors = {f"t{i}.{d.name}": _sample(d, (3, 7), seed=i) for i, d in enumerate(gio.SUPPORTED_DTYPES)}
    tensors["zz.scalar"] = np.array(1.5, np.float32)
    tensors["aa.empty"] = np.zeros((0, 4), BF16)
    tensors["mm.bf16.4d"] = _sample(BF16, (2, 3, 1, 5), seed=99)
    # names that collide with np.savez's own keyword arguments
    tensors["file"] = _sample(np.int64, (2,), seed=5)
    tensors["allow_pickle"] = _sample(np.float16, (4,), seed=6)
    return tensors


def _assert_same(got, want):
    assert list(got) == list(want)
    for name in want:
        assert isinstance(got[name], np.ndarray), name
        assert got[name].dtype == want[name].dtype.newbyteorder("="), name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == np.ascontiguousarray(want[name], got[name].dtype).tobytes(), name


@pytest.mark.parametrize("ext", FORMATS)
def test_round_trip_every_dtype_keeps_bytes_dtypes_shapes_and_order(tmp_path, ext):
    _needs(ext)
    tensors = _model()
    path = tmp_path / f"m.{ext}"
    gio.write_model(path, tensors)
    _assert_same(gio.read_model(path), tensors)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("ext", FORMATS)
def test_bfloat16_comes_back_as_ml_dtypes_bfloat16(tmp_path, ext):
    _needs(ext)
    x = np.array([1.0, -2.5, 3.140625, -0.0, np.inf], BF16)
    gio.write_model(tmp_path / f"b.{ext}", {"x": x})
    y = gio.read_model(tmp_path / f"b.{ext}")["x"]
    assert y.dtype == BF16
    assert y.view(np.uint16).tolist() == x.view(np.uint16).tolist()


@pytest.mark.parametrize("ext", FORMATS)
def test_non_contiguous_and_big_endian_inputs_are_written_by_value(tmp_path, ext):
    _needs(ext)
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"transposed": base.T, "strided": base[:, ::2], "big": base.astype(">f4"), "big_i": base.astype(">i8")}
    gio.write_model(tmp_path / f"n.{ext}", tensors)
    got = gio.read_model(tmp_path / f"n.{ext}")
    for name, want in tensors.items():
        assert got[name].dtype.isnative
        np.testing.assert_array_equal(got[name], want)


@pytest.mark.parametrize("ext", ["safetensors", "npz"])
def test_read_only_and_empty_models(tmp_path, ext):
    x = np.arange(5, dtype=np.int32)
    x.flags.writeable = False
    gio.write_model(tmp_path / f"r.{ext}", {"x": x})
    np.testing.assert_array_equal(gio.read_model(tmp_path / f"r.{ext}")["x"], x)


def test_supported_dtypes_are_the_containers():
    from gpucabac import container

    assert sorted(d.name for d in gio.SUPPORTED_DTYPES) == sorted(container.DTYPES)


# --- interop: files written by the usual tools ------------------------------------------------


def test_safetensors_written_by_the_library_reads_in_header_order(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"b": np.ones(3, np.float32), "a": np.ones(2, np.float16), "c": np.ones(1, np.int64)}
    path = tmp_path / "lib.safetensors"
    save_file(tensors, path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header_order = [k for k in json.loads(f.read(n)) if k != "__metadata__"]
    got = gio.read_model(path)
    assert list(got) == header_order
    assert sorted(got) == sorted(tensors)
    for name in tensors:
        np.testing.assert_array_equal(got[name], tensors[name])


def test_safetensors_bf16_and_scalar_written_by_the_library(tmp_path):
    from safetensors.numpy import save_file

    # safetensors.numpy writes bfloat16 arrays (its dtype name matches) but cannot load them itself
    tensors = {"w": np.array([[1.5, -2.0]], BF16), "s": np.array(7, np.int16)}
    save_file(tensors, tmp_path / "bf.safetensors")
    got = gio.read_model(tmp_path / "bf.safetensors")
    assert got["w"].dtype == BF16 and got["w"].shape == (1, 2)
    assert got["s"].shape == () and got["s"] == 7  # safe_open gives 0-d tensors shape (1,)


def test_safetensors_written_here_records_order_and_format(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "o.safetensors"
    gio.write_model(path, {"z": np.zeros(1, np.float32), "a": np.zeros(1, np.int64)})
    with safe_open(path, framework="np") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert json.loads(meta["gpucabac.order"]) == ["z", "a"]


def test_safetensors_recorded_order_is_ignored_when_it_does_not_match(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"b": np.ones(1, np.float32), "a": np.ones(1, np.float32)}
    for bad in ['["b"]', '["b", "a", "c"]', "not json", '{"b": 1}', '["b", 1]']:
        save_file(tensors, tmp_path / "m.safetensors", metadata={"gpucabac.order": bad})
        assert list(gio.read_model(tmp_path / "m.safetensors")) == ["a", "b"], bad


def test_npz_from_numpy_savez_with_bfloat16(tmp_path):
    # np.savez stores ml_dtypes.bfloat16 as a 2-byte void ('<V2'); it reads back as bfloat16
    w = np.array([0.5, -1.25, 3.0], BF16)
    np.savez(tmp_path / "s.npz", w=w, n=np.arange(3, dtype=np.uint8))
    got = gio.read_model(tmp_path / "s.npz")
    assert list(got) == ["w", "n"]
    assert got["w"].dtype == BF16
    assert got["w"].view(np.uint16).tolist() == w.view(np.uint16).tolist()


def test_pt_state_dict_shapes(tmp_path):
    torch = pytest.importorskip("torch", reason="the .pt format needs the gpucabac[torch] extra")
    sd = {"w": torch.nn.Parameter(torch.randn(3, 4)), "b": torch.arange(3, dtype=torch.int32)}
    sd["h"] = torch.tensor([1.5, 2.0], dtype=torch.bfloat16)
    sd["steps"] = 12  # not a tensor: dropped
    for wrapped in (sd, {"state_dict": sd, "epoch": 3}, {"model": sd, "optimizer": {"lr": 0.1}}):
        torch.save(wrapped, tmp_path / "m.pt")
        got = gio.read_model(tmp_path / "m.pt")
        assert list(got) == ["w", "b", "h"]
        np.testing.assert_array_equal(got["w"], sd["w"].detach().numpy())
        assert got["b"].dtype == np.int32 and got["b"].tolist() == [0, 1, 2]
        assert got["h"].dtype == BF16 and got["h"].astype(np.float32).tolist() == [1.5, 2.0]


def test_pt_transposed_view_is_read_by_value(tmp_path):
    torch = pytest.importorskip("torch", reason="the .pt format needs the gpucabac[torch] extra")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    torch.save({"t": t.T}, tmp_path / "v.pth")
    np.testing.assert_array_equal(gio.read_model(tmp_path / "v.pth")["t"], t.T.numpy())


def test_pt_errors(tmp_path):
    torch = pytest.importorskip("torch", reason="the .pt format needs the gpucabac[torch] extra")
    torch.save({"c": torch.ones(2, dtype=torch.complex64)}, tmp_path / "c.pt")
    with pytest.raises(ModelFileError, match=r"c\.pt: tensor 'c' has dtype torch\.complex64"):
        gio.read_model(tmp_path / "c.pt")
    torch.save([torch.ones(2)], tmp_path / "l.pt")
    with pytest.raises(ModelFileError, match="not a state dict"):
        gio.read_model(tmp_path / "l.pt")
    torch.save({"epoch": 3}, tmp_path / "e.pt")
    with pytest.raises(ModelFileError, match="no tensors"):
        gio.read_model(tmp_path / "e.pt")
    torch.save({"s": torch.ones(2).to_sparse()}, tmp_path / "s.pt")
    with pytest.raises(ModelFileError, match="only dense"):
        gio.read_model(tmp_path / "s.pt")


def test_pt_without_torch_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    (tmp_path / "m.pt").write_bytes(b"PK")
    with pytest.raises(ModelFileError, match=r"gpucabac\[torch\]"):
        gio.read_model(tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match=r"gpucabac\[torch\]"):
        gio.write_model(tmp_path / "out.pth", {"x": np.zeros(2, np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["m.pt"]


# --- packaged models --------------------------------------------------------------------------


@pytest.mark.default_model
def test_packaged_model_by_name():
    tensors = gio.read_model("minilm")
    assert len(tensors) == 104
    assert next(iter(tensors)) == "embeddings.position_ids"
    assert tensors["embeddings.position_ids"].dtype == np.int64
    assert {str(t.dtype) for name, t in tensors.items() if name != "embeddings.position_ids"} == {"float32"}
    assert sum(t.size for t in tensors.values()) == 22_713_728


def test_a_file_of_that_name_wins_over_the_packaged_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "minilm").write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unknown model file extension"):
        gio.read_model("minilm")


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, match",
    [
        ("missing.safetensors", r"missing\.safetensors: no such file"),
        ("missing.npz", r"missing\.npz: no such file"),
        ("model.txt", r"unknown model file extension '\.txt'"),
        ("no_such_packaged_model", r"no_such_packaged_model: no such file, nor a usable packaged model"),
    ],
)
def test_missing_or_unknown_files(tmp_path, monkeypatch, name, match):
    monkeypatch.chdir(tmp_path)
    if name.endswith(".txt"):
        (tmp_path / name).write_text("weights")
    with pytest.raises(ModelFileError, match=match):
        gio.read_model(name)


def test_a_directory_is_not_a_model(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ModelFileError, match="is a directory"):
        gio.read_model(tmp_path / "d.safetensors")


@pytest.mark.parametrize("ext", FORMATS)
@pytest.mark.parametrize("content", [b"", b"garbage that is no model file at all" * 3])
def test_corrupt_files(tmp_path, ext, content):
    _needs(ext)
    path = tmp_path / f"bad.{ext}"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=r"bad\." + ext):
        gio.read_model(path)


@pytest.mark.parametrize("ext", ["safetensors", "npz"])
def test_truncated_files(tmp_path, ext):
    path = tmp_path / f"t.{ext}"
    gio.write_model(path, {"w": np.arange(1000, dtype=np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=r"t\." + ext):
        gio.read_model(path)


def test_unsupported_dtype_in_a_file(tmp_path):
    np.savez(tmp_path / "u.npz", ok=np.zeros(2, np.float32), bad=np.zeros(2, np.complex64))
    with pytest.raises(ModelFileError, match=r"tensor 'bad' has dtype complex64"):
        gio.read_model(tmp_path / "u.npz")


def test_npz_with_object_array_or_single_npy(tmp_path):
    np.savez(tmp_path / "o.npz", o=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ModelFileError, match=r"o\.npz"):
        gio.read_model(tmp_path / "o.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    os.replace(tmp_path / "single.npy", tmp_path / "single.npz")
    with pytest.raises(ModelFileError, match="not an .npz archive"):
        gio.read_model(tmp_path / "single.npz")


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"x": [1.0, 2.0]}, "'x' is a list, not a NumPy array"),
        ({"x": np.zeros(2, np.complex64)}, "'x' has dtype complex64"),
        ({"x": np.zeros(2, np.float128)}, "'x' has dtype float128"),
        ({"x": np.zeros(2, "U3")}, "'x' has dtype <U3"),
        ({1: np.zeros(2, np.float32)}, "names must be strings"),
    ],
)
def test_write_rejects_bad_tensors_before_creating_anything(tmp_path, tensors, match):
    with pytest.raises(InputError, match=match):
        gio.write_model(tmp_path / "m.safetensors", tensors)
    assert os.listdir(tmp_path) == []


def test_write_unknown_extension(tmp_path):
    with pytest.raises(ModelFileError, match="unknown model file extension"):
        gio.write_model(tmp_path / "m.bin", {"x": np.zeros(1, np.float32)})
    assert os.listdir(tmp_path) == []


# --- atomic writes ----------------------------------------------------------------------------


def test_atomic_write_bytes(tmp_path):
    data = bytes(range(256)) * 1000
    gio.atomic_write_bytes(tmp_path / "a.gcb", data)
    assert (tmp_path / "a.gcb").read_bytes() == data
    gio.atomic_write_bytes(tmp_path / "a.gcb", memoryview(b"new"))  # replaces
    assert (tmp_path / "a.gcb").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.gcb"]


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        gio.atomic_write_bytes(tmp_path / "a.gcb", b"x")
        gio.write_model(tmp_path / "m.npz", {"x": np.zeros(1, np.float32)})
    finally:
        os.umask(old)
    assert (tmp_path / "a.gcb").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "m.npz").stat().st_mode & 0o777 == 0o640


def test_write_into_a_missing_directory(tmp_path):
    with pytest.raises(ModelFileError, match="cannot create a file in"):
        gio.atomic_write_bytes(tmp_path / "nope" / "a.gcb", b"x")


def _fail_on_second_call(monkeypatch, module, name, exc):
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize("existing", [False, True])
def test_npz_write_failing_midway_leaves_nothing(tmp_path, monkeypatch, existing):
    path = tmp_path / "m.npz"
    if existing:
        gio.write_model(path, {"old": np.ones(3, np.float32)})
    calls = _fail_on_second_call(monkeypatch, np.lib.format, "write_array", RuntimeError("disk on fire"))
    with pytest.raises(ModelFileError, match=r"m\.npz: cannot write: RuntimeError: disk on fire"):
        gio.write_model(path, {"a": np.zeros(10, np.float32), "b": np.zeros(10, np.float32)})
    assert len(calls) == 2  # the first member was written before the failure
    assert os.listdir(tmp_path) == (["m.npz"] if existing else [])
    if existing:
        monkeypatch.undo()
        assert list(gio.read_model(path)) == ["old"]


def test_fsync_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        gio.atomic_write_bytes(tmp_path / "a.gcb", b"payload")
    with pytest.raises(OSError, match="Input/output error"):
        gio.write_model(tmp_path / "m.safetensors", {"x": np.zeros(4, np.float32)})
    assert os.listdir(tmp_path) == []


def test_interrupt_during_write_leaves_nothing(tmp_path, monkeypatch):
    # the safetensors writer streams the header, then each tensor's bytes: interrupt it midway,
    # after the header and the first tensor went out
    written = []
    tensor_bytes = gio._tensor_bytes

    def interrupted(array):
        if written:
            raise KeyboardInterrupt
        written.append(array)
        return tensor_bytes(array)

    monkeypatch.setattr(gio, "_tensor_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gio.write_model(tmp_path / "m.safetensors", {"x": np.zeros(4, np.float32), "y": np.ones(4, np.float32)})
    assert written and os.listdir(tmp_path) == []


def test_failing_replace_leaves_the_old_file(tmp_path, monkeypatch):
    gio.atomic_write_bytes(tmp_path / "a.gcb", b"old")

    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(PermissionError):
        gio.atomic_write_bytes(tmp_path / "a.gcb", b"new")
    assert os.listdir(tmp_path) == ["a.gcb"]
    assert (tmp_path / "a.gcb").read_bytes() == b"old"


def test_npz_members_are_stored_uncompressed_in_order(tmp_path):
    gio.write_model(tmp_path / "m.npz", {"b": np.zeros(2, np.float32), "a": np.zeros(2, np.int8)})
    with zipfile.ZipFile(tmp_path / "m.npz") as zf:
        assert [i.filename for i in zf.infolist()] == ["b.npy", "a.npy"]
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}


def test_big_endian_npz_reads_as_native(tmp_path):
    np.savez(tmp_path / "be.npz", f=np.arange(3, dtype=">f4"), i=np.arange(3, dtype=">i8"))
    got = gio.read_model(tmp_path / "be.npz")
    assert got["f"].dtype == np.float32 and got["f"].dtype.isnative and got["f"].tolist() == [0, 1, 2]
    assert got["i"].dtype == np.int64 and got["i"].dtype.isnative and got["i"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("ext, names, match", [
    (".npz", {"x.npy": 1, "x": 2}, "cannot be stored faithfully in .npz"),
    (".safetensors", {"__metadata__": 1}, "reserved in .safetensors"),
    (".safetensors", {"a\0b": 1}, "NUL character"),
    (".npz", {"a\0b": 1}, "NUL character"),
])
def test_names_a_format_cannot_store_are_refused(tmp_path, ext, names, match):
    tensors = {k: np.full(3, v, np.float32) for k, v in names.items()}
    with pytest.raises(InputError, match=match):
        gio.write_model(tmp_path / f"m{ext}", tensors)
    assert not list(tmp_path.iterdir())


def test_a_name_too_long_for_the_file_system_is_a_model_file_error(tmp_path):
    with pytest.raises(ModelFileError):
        gio.read_model(tmp_path / ("n" * 300 + ".safetensors"))


# --- the streamed safetensors writer and the readinto reader ----------------------------------


def _library_bytes(arrays: dict, metadata: dict) -> bytes:
    """safetensors.numpy.save's file for these tensors, with the two metadata entries in the
    order write_model writes them: the library keeps its metadata in a hash map, so their order
    in its header varies from one call to the next (everything else is fixed)."""
    from safetensors.numpy import save

    data = save(arrays, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    theirs = json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode()
    ours = json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode()
    if theirs not in data[8 : 8 + n]:  # the other order of the two entries
        theirs = json.dumps(dict(reversed(list(meta.items()))), ensure_ascii=False, separators=(",", ":")).encode()
    assert theirs in data[8 : 8 + n] and len(theirs) == len(ours)
    return data.replace(theirs, ours, 1)


def _tricky_model() -> dict:
    tensors = _model()
    tensors["name with \"quotes\", \\ back\\slash, /slash, tab\t, nl\n, \x01\x1f\x7f, é ü 漢 \u2028 😀"] = np.arange(3, dtype=np.float32)
    tensors["scalar.bf16"] = np.array(-0.75, BF16)
    tensors["empty.bool"] = np.zeros((2, 0, 3), np.bool_)
    tensors["b.same.dtype"] = np.ones(2, np.float32)  # ties broken by name within a dtype
    return tensors


def test_safetensors_written_here_are_the_librarys_bytes(tmp_path):
    """write_model streams what safetensors.numpy.save would build in memory: the same header
    (dtype/name order, data_offsets, compact JSON, space padding to 8) and data, byte for byte."""
    tensors = _tricky_model()
    path = tmp_path / "m.safetensors"
    gio.write_model(path, tensors)
    metadata = {"format": "pt", "gpucabac.order": json.dumps(list(tensors))}
    assert path.read_bytes() == _library_bytes(tensors, metadata)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert n % 8 == 0
    # an empty model, and a single 0-d tensor
    for t in ({}, {"s": np.array(3, np.int64)}):
        gio.write_model(path, t)
        assert path.read_bytes() == _library_bytes(t, {"format": "pt", "gpucabac.order": json.dumps(list(t))})


def test_safetensors_written_here_read_back_by_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    tensors = _tricky_model()
    path = tmp_path / "m.safetensors"
    gio.write_model(path, tensors)
    plain = {k: v for k, v in tensors.items() if v.dtype != BF16}
    loaded = load_file(path)  # the library's numpy loader, without bfloat16 (it cannot make them itself)
    for name, want in plain.items():
        got = loaded[name]
        assert got.dtype == want.dtype and got.size == want.size, name
        assert got.tobytes() == want.tobytes(), name
    with safe_open(path, framework="np") as f:  # bfloat16 too, with ml_dtypes loaded
        assert sorted(f.keys()) == sorted(tensors)
        for name, want in tensors.items():
            got = f.get_tensor(name)
            assert got.dtype == want.dtype and got.size == want.size, name
            assert got.tobytes() == want.tobytes(), name
    _assert_same(gio.read_model(path), tensors)


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize("entries, data_size, match", [
    ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [8, 20])}, 20, r"tensor 'b': data_offsets \[8, 20\] hold 12 bytes"),
    ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [4, 12])}, 12, r"tensor 'b': data_offsets start at 4, expected 8"),
    ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [12, 20])}, 20, r"tensor 'b': data_offsets start at 12, expected 8"),
    ({"a": ("F32", [2], [0, 8]), "b": ("F32", [2], [8, 16])}, 12, r"the tensors use 16 bytes of data, the file holds 12"),
    ({"a": ("F32", [2], [0, 8])}, 12, r"the tensors use 8 bytes of data, the file holds 12"),
    ({"a": ("F32", [2], [8, 0])}, 8, r"tensor 'a': data_offsets \[8, 0\]"),
    ({"a": ("F32", [2], [-8, 0])}, 8, r"tensor 'a': data_offsets"),
    ({"a": ("F32", [2], [0])}, 8, r"tensor 'a': data_offsets"),
    ({"a": ("F32", [2], [0, 8.0])}, 8, r"tensor 'a': data_offsets"),
    ({"a": ("F32", [-2], [0, 8])}, 8, r"tensor 'a': shape \[-2\]"),
    ({"a": ("F32", "2", [0, 8])}, 8, r"tensor 'a': shape"),
    ({"a": ("F32", [2, True], [0, 8])}, 8, r"tensor 'a': shape"),
    ({"a": ("C64", [1], [0, 8])}, 8, r"tensor 'a' has dtype C64, which gpucabac does not handle"),
    ({"a": ("F8_E4M3", [8], [0, 8])}, 8, r"tensor 'a' has dtype F8_E4M3"),
    ({"a": (None, [2], [0, 8])}, 8, r"tensor 'a': header entry has no dtype"),
    ({"a": ("BF16", [3], [0, 8])}, 8, r"tensor 'a': data_offsets \[0, 8\] hold 8 bytes, shape \[3\] of BF16 needs 6"),
])
def test_safetensors_with_bad_offsets_shapes_or_dtypes(tmp_path, entries, data_size, match):
    header = {"__metadata__": {"format": "pt"}}
    header |= {name: {"dtype": d, "shape": s, "data_offsets": o} for name, (d, s, o) in entries.items()}
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, bytes(data_size))
    with pytest.raises(ModelFileError, match=r"bad\.safetensors: " + match):
        gio.read_model(path)


def test_safetensors_header_entries_must_be_objects(tmp_path):
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, {"a": [1, 2]}, b"")
    with pytest.raises(ModelFileError, match="tensor 'a': header entry is not a JSON object"):
        gio.read_model(path)


def test_safetensors_offsets_in_any_order_and_empty_tensors(tmp_path):
    """The header need not list tensors in the order of their data; empty tensors take no bytes
    (several at one offset); each tensor reads its own bytes."""
    a, b = np.arange(3, dtype="<f4"), np.arange(2, dtype="<i2")
    header = {"b": {"dtype": "I16", "shape": [2], "data_offsets": [12, 16]},
              "e1": {"dtype": "F32", "shape": [0, 2], "data_offsets": [12, 12]},
              "a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
              "e0": {"dtype": "BF16", "shape": [0], "data_offsets": [0, 0]},
              "s": {"dtype": "U8", "shape": [], "data_offsets": [16, 17]}}
    path = tmp_path / "o.safetensors"
    _raw_safetensors(path, header, a.tobytes() + b.tobytes() + b"\x07")
    got = gio.read_model(path)
    assert list(got) == ["b", "e1", "a", "e0", "s"]
    assert got["a"].tolist() == [0, 1, 2] and got["b"].tolist() == [0, 1] and got["s"].shape == () and got["s"] == 7
    assert got["e1"].shape == (0, 2) and got["e0"].dtype == BF16 and got["e0"].shape == (0,)


def test_safetensors_reader_reads_each_tensor_once_into_its_array(tmp_path, monkeypatch):
    """No memory map, no bytes objects of the data: every tensor's bytes go by readinto straight
    into the array read_model returns."""
    import builtins

    tensors = {"w": np.arange(50_000, dtype=np.float32).reshape(100, 500), "b": np.arange(7, dtype=np.int64)}
    path = tmp_path / "m.safetensors"
    gio.write_model(path, tensors)
    reads, real_open = [], builtins.open

    class Recording:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(("read", len(data)))
            return data

        def readinto(self, b):
            n = self.f.readinto(b)
            reads.append(("readinto", n))
            return n

    def recording_open(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        return Recording(f) if str(file) == str(path) else f

    monkeypatch.setattr(builtins, "open", recording_open)
    got = gio.read_model(path)
    monkeypatch.undo()
    _assert_same(got, tensors)
    assert sum(n for kind, n in reads if kind == "readinto") == sum(t.nbytes for t in tensors.values())
    assert all(n <= 1024 for kind, n in reads if kind == "read")  # the header size and the header only
