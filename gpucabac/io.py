"""Model files in and out: safetensors, NumPy .npz and PyTorch .pt/.pth, chosen by extension.

A model is a ``dict[str, np.ndarray]`` in file order. bfloat16 tensors are ``ml_dtypes.bfloat16``
arrays in every format. Every file is written atomically (:func:`atomic_write_bytes` and
:func:`write_model` share one mechanism): a temporary file in the target's directory, fsync, then
``os.replace``, so a failed or interrupted write leaves neither a partial output nor a temporary file.

Format notes
- safetensors: read and written here, streamed, without the library's whole-file buffers: the
  header is parsed and checked as the library checks it, and each tensor's bytes are read into
  (or written from) its own array, so a model is in memory once. Tensors are read in the order
  of the header (for files the library writes, the order of the data). The library writes
  tensors sorted by dtype and name, and so does :func:`write_model` (its files are the
  library's, byte for byte), which records the caller's order in the header's ``__metadata__``
  under ``gpucabac.order`` (a JSON list) beside ``"format": "pt"`` (which transformers asks
  for); :func:`read_model` restores it when it names exactly the file's tensors.
- npz: NumPy writes an ``ml_dtypes.bfloat16`` array as a 2-byte void (``'<V2'``) since the dtype is
  not NumPy's own; bfloat16 is the only 2-byte type written so, and :func:`read_model` reads any
  2-byte void array back as bfloat16. Members are uncompressed, in the dict's order.
- .pt/.pth: needs PyTorch (the ``gpucabac[torch]`` extra); loaded with ``weights_only=True`` on the
  CPU. A plain state dict, or a dict holding one under ``"state_dict"`` or ``"model"``; entries that
  are not tensors are dropped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import secrets
import struct
import sys
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from . import models
from .dtypes import DTYPES, bfloat16
from .errors import GpucabacError, InputError, ModelFileError

__all__ = ["SUPPORTED_DTYPES", "atomic_write_bytes", "read_model", "write_model", "model_format"]

PathLike = str | os.PathLike

_SUPPORTED_NAMES = ", ".join(DTYPES)


def __getattr__(name: str):
    # SUPPORTED_DTYPES (the NumPy dtypes gpucabac reads, codes and writes) is built on first use,
    # since bfloat16 needs ml_dtypes (gpucabac.dtypes says why that loads late).
    if name == "SUPPORTED_DTYPES":
        return tuple(bfloat16() if n == "bfloat16" else np.dtype(n) for n in DTYPES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _supported(dtype: np.dtype) -> bool:
    """Whether gpucabac reads, codes and writes tensors of this dtype (SUPPORTED_DTYPES)."""
    return dtype.name in DTYPES and (dtype.kind != "V" or dtype == bfloat16())

_FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".pt": "torch", ".pth": "torch"}
_ORDER_KEY = "gpucabac.order"
_MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


def model_format(path: PathLike) -> str:
    """'safetensors', 'npz' or 'torch' by the file's extension (any case); ModelFileError otherwise."""
    suffix = pathlib.Path(path).suffix.lower()
    if suffix == ".gcb":
        raise ModelFileError(f"{os.fspath(path)}: a .gcb file is a gpucabac container, not a model file; "
                             "decode it (gpucabac decode, gpucabac.load) instead")
    if suffix not in _FORMATS:
        raise ModelFileError(
            f"{os.fspath(path)}: unknown model file extension {suffix or '(none)'!r}; "
            f"known: {', '.join(_FORMATS)}"
        )
    return _FORMATS[suffix]


# ---------------------------------------------------------------------------------------------
# Reading


def read_model(path: PathLike) -> dict[str, np.ndarray]:
    """Read every tensor of a model file, in file order.

    ``path`` is a .safetensors, .npz, .pt or .pth file, or the name of a packaged model
    (``"minilm"``, see :mod:`gpucabac.models`) when no file of that name exists. A missing file, an
    unknown extension, an unreadable file or a tensor of a dtype outside :data:`SUPPORTED_DTYPES`
    raises :class:`ModelFileError` naming the path and the problem.
    """
    try:
        path = _resolve_model_path(path)
        if path.is_dir():
            raise ModelFileError(f"{path}: is a directory, not a model file")
        kind = model_format(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    except ModelFileError:
        raise
    except OSError as e:  # a name too long for the file system, a symlink loop, ...
        raise ModelFileError(f"{os.fspath(path)}: {e.strerror or e}") from e
    reader = {"safetensors": _read_safetensors, "npz": _read_npz, "torch": _read_torch}[kind]
    try:
        tensors = reader(path)
    except GpucabacError:
        raise
    except Exception as e:  # the libraries raise their own types for corrupt files
        raise ModelFileError(f"{path}: cannot read as {kind}: {_first_line(e)}") from e
    for name, array in tensors.items():
        tensors[name] = array = _native(array)
        if not _supported(array.dtype):
            raise ModelFileError(
                f"{path}: tensor {name!r} has dtype {array.dtype}, which gpucabac does not handle "
                f"(supported: {_SUPPORTED_NAMES})"
            )
    return tensors


def _first_line(e: BaseException, limit: int = 300) -> str:
    """A library's exception as one short line (torch's unpickling errors run to a page)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _native(array: np.ndarray, order: str = "K") -> np.ndarray:
    """The array in native byte order (a no-op for most), C-contiguous when order="C".

    Not np.ascontiguousarray, which turns 0-d arrays into shape (1,)."""
    return array.astype(array.dtype.newbyteorder("="), order=order, copy=False)


def _resolve_model_path(path: PathLike) -> pathlib.Path:
    """An existing path as is; a bare word that is no file is taken as a packaged model's name."""
    p = pathlib.Path(path)
    text = os.fspath(path)
    if p.exists() or p.suffix or os.sep in text or (os.altsep and os.altsep in text):
        return p
    try:
        return models.model_path(text)
    except ModelFileError as e:
        raise ModelFileError(f"{text}: no such file, nor a usable packaged model: {e}") from e


# safetensors dtype codes of the dtypes gpucabac handles; a tensor's bytes are little-endian
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8",
              "I16": "int16", "I32": "int32", "I64": "int64", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
              "U32": "uint32", "U64": "uint64"}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}
# The order the safetensors library writes tensors in: by dtype, in descending order of its Dtype
# enum (this list ascending), then by name; write_model follows it, so that its files are the
# library's byte for byte.
_ST_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
_MAX_DIM = (1 << 63) - 1


def _le(dtype: np.dtype) -> np.dtype:
    """The little-endian variant of a dtype (itself on a little-endian machine)."""
    return dtype if sys.byteorder == "little" or dtype.itemsize == 1 else dtype.newbyteorder("<")


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, read straight into its own array (np.empty, readinto):
    no memory map and no second copy. The header is checked as the library checks it: known
    dtypes and shapes, and data_offsets that tile the data area exactly, each the size of its
    tensor; a ModelFileError names the tensor otherwise."""
    header, data_start = _safetensors_header(path, with_data_start=True)
    names = [k for k in header if k != "__metadata__"]
    order = _recorded_order(header.get("__metadata__"), names)
    data_size = path.stat().st_size - data_start
    entries = {name: _safetensors_entry(path, name, header[name]) for name in names}
    pos = 0
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            raise ModelFileError(f"{path}: tensor {name!r}: data_offsets start at {begin}, expected {pos} "
                                 "(tensors must tile the data area without gaps or overlaps)")
        pos = end
    if pos != data_size:
        raise ModelFileError(f"{path}: the tensors use {pos} bytes of data, the file holds {data_size} "
                             "(truncated, or trailing bytes)")
    tensors = {}
    with open(path, "rb") as f:
        for name in order or names:
            dtype, shape, begin, end = entries[name]
            try:
                array = np.empty(shape, _le(dtype))
            except (ValueError, MemoryError) as e:
                raise ModelFileError(f"{path}: tensor {name!r}: cannot allocate shape {list(shape)}: {e}") from e
            if end > begin:
                f.seek(data_start + begin)
                view = memoryview(array.reshape(-1).view(np.uint8))
                done = 0
                while done < end - begin:
                    n = f.readinto(view[done:])
                    if not n:
                        raise ModelFileError(f"{path}: tensor {name!r}: file truncated inside its data")
                    done += n
            tensors[name] = array
    return tensors


def _safetensors_entry(path: pathlib.Path, name: str, entry: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one tensor of a safetensors header, validated."""
    if not isinstance(entry, dict):
        raise ModelFileError(f"{path}: tensor {name!r}: header entry is not a JSON object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str):
        raise ModelFileError(f"{path}: tensor {name!r}: header entry has no dtype")
    if code not in _ST_DTYPES:
        raise ModelFileError(f"{path}: tensor {name!r} has dtype {code}, which gpucabac does not handle "
                             f"(supported: {_SUPPORTED_NAMES})")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
        raise ModelFileError(f"{path}: tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]):
        raise ModelFileError(f"{path}: tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    dtype = bfloat16() if code == "BF16" else np.dtype(_ST_DTYPES[code])
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != offsets[1] - offsets[0]:
        raise ModelFileError(f"{path}: tensor {name!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, "
                             f"shape {shape} of {code} needs {nbytes}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _safetensors_header(path: pathlib.Path, *, with_data_start: bool = False):
    """The JSON header in file order (safe_open's keys() are sorted instead); with
    `with_data_start`, (header, the file offset of the data area)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelFileError(f"{path}: not a safetensors file: shorter than its 8-byte header size")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_SAFETENSORS_HEADER or size > path.stat().st_size - 8:
            raise ModelFileError(f"{path}: not a safetensors file: header size {size} out of range")
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path}: not a safetensors file: header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise ModelFileError(f"{path}: not a safetensors file: header is not a JSON object")
    return (header, 8 + size) if with_data_start else header


def _recorded_order(metadata: Any, names: list[str]) -> list[str] | None:
    """The order write_model recorded, if present and naming exactly these tensors."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get(_ORDER_KEY), str):
        return None
    try:
        order = json.loads(metadata[_ORDER_KEY])
    except json.JSONDecodeError:
        return None
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
        return None
    if sorted(order) != sorted(names):
        return None
    return order


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path}: not an .npz archive (no zip structure)")
    tensors = {}
    npz = np.load(path, allow_pickle=False)
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ModelFileError(f"{path}: not an .npz archive (a single .npy array?)")
    with npz:
        for name in npz.files:
            array = npz[name]
            if array.dtype.kind == "V" and array.dtype.itemsize == 2 and array.dtype.names is None:
                array = array.view(bfloat16())
            tensors[name] = array
    return tensors


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ModelFileError(
            "PyTorch is needed for .pt/.pth model files: pip install 'gpucabac[torch]'"
        ) from e
    return torch


def _torch_dtypes(torch) -> dict:
    """torch dtype -> NumPy dtype. bfloat16 goes through int16, since NumPy has no bfloat16 of its
    own; uint16/32/64 exist from torch 2.3 on."""
    names = ["float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
             "uint16", "uint32", "uint64"]
    table = {getattr(torch, n): np.dtype(n) for n in names if hasattr(torch, n)}
    table[torch.bfloat16] = bfloat16()
    return table


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    torch = _import_torch()
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    dtypes = _torch_dtypes(torch)
    tensors = {}
    for name, t in obj.items():
        if not isinstance(t, torch.Tensor):
            continue
        if t.layout != torch.strided:
            raise ModelFileError(f"{path}: tensor {name!r} has layout {t.layout}; only dense tensors")
        if t.dtype not in dtypes:
            raise ModelFileError(
                f"{path}: tensor {name!r} has dtype {t.dtype}, which gpucabac does not handle "
                f"(supported: {_SUPPORTED_NAMES})"
            )
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:
            tensors[str(name)] = t.view(torch.int16).numpy().view(bfloat16())
        else:
            tensors[str(name)] = t.numpy()
    if not tensors:
        raise ModelFileError(f"{path}: holds no tensors")
    return tensors


# ---------------------------------------------------------------------------------------------
# Writing


def write_model(path: PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write tensors to a .safetensors, .npz, .pt or .pth file (by extension), atomically.

    Every value must be a NumPy array of a dtype in :data:`SUPPORTED_DTYPES` (InputError
    otherwise); the file lists the tensors in the mapping's order. On any failure no output file
    exists afterwards (an older file at ``path`` is left untouched) and no temporary file remains.
    """
    path = pathlib.Path(path)
    kind = model_format(path)
    arrays = _checked_arrays(tensors)
    _check_names(path, kind, arrays)
    writer = {"safetensors": _write_safetensors, "npz": _write_npz, "torch": _write_torch}[kind]
    if kind == "torch":
        _import_torch()  # fail before creating anything
    _atomic_write(path, lambda f: writer(f, arrays))


def atomic_write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write raw bytes (a .gcb container, say) to ``path`` atomically, like :func:`write_model`."""
    _atomic_write(pathlib.Path(path), lambda f: f.write(data))


def _checked_arrays(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not isinstance(tensors, Mapping):
        raise InputError(f"tensors must be a mapping of names to arrays, not {type(tensors).__name__}")
    arrays = {}
    for name, array in tensors.items():
        if not isinstance(name, str):
            raise InputError(f"tensor names must be strings, got {name!r}")
        if not isinstance(array, np.ndarray):
            raise InputError(f"tensor {name!r} is a {type(array).__name__}, not a NumPy array")
        # contiguous, native byte order: the safetensors and torch writers copy raw memory
        array = _native(array, order="C")
        if not _supported(array.dtype):
            raise InputError(
                f"tensor {name!r} has dtype {array.dtype} (supported: {_SUPPORTED_NAMES})"
            )
        arrays[name] = array
    return arrays


def _check_names(path: pathlib.Path, kind: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse names a format cannot store faithfully (they would read back as other names)."""
    for name in arrays:
        if "\0" in name:
            raise InputError(f"{path}: tensor name {name!r} holds a NUL character, which model files cannot store")
        if kind == "npz" and name.endswith(".npy"):
            raise InputError(f"{path}: tensor name {name!r} cannot be stored faithfully in .npz (NumPy's reader "
                             "takes 'x.npy' and 'x' for the same tensor); write .safetensors instead")
        if kind == "safetensors" and name == "__metadata__":
            raise InputError(f"{path}: '__metadata__' is reserved in .safetensors files; it cannot name a tensor")


def _atomic_write(path: pathlib.Path, write: Callable[[BinaryIO], Any]) -> None:
    """The one atomic-write mechanism: temp file beside ``path``, fsync, os.replace.

    The temporary file is created with mode 0o666 so the umask applies, as for a plain open().
    """
    directory = path.parent
    while True:
        tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise ModelFileError(f"{path}: cannot create a file in {directory}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, (GpucabacError, OSError)) or not isinstance(e, Exception):
            raise
        raise ModelFileError(f"{path}: cannot write: {_first_line(e)}") from e
    _fsync_directory(directory)


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make the rename durable; not every platform or file system can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_layout(arrays: dict[str, np.ndarray]) -> tuple[bytes, list[str]]:
    """(the 8-byte header size and the JSON header, padded with spaces to a multiple of 8 bytes;
    the tensor names in the order of their data), as safetensors.numpy.save lays out a file:
    tensors by dtype (_ST_ORDER, descending) then name, the header compact JSON with
    __metadata__ first. The metadata records the caller's order (the module docstring)."""
    rank = {code: i for i, code in enumerate(_ST_ORDER)}
    codes = {name: _ST_CODES[a.dtype.name] for name, a in arrays.items()}
    order = sorted(arrays, key=lambda n: (-rank[codes[n]], n))
    header: dict[str, Any] = {"__metadata__": {"format": "pt", _ORDER_KEY: json.dumps(list(arrays))}}
    pos = 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": codes[name], "shape": [int(d) for d in a.shape], "data_offsets": [pos, pos + a.nbytes]}
        pos += a.nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _tensor_bytes(array: np.ndarray) -> memoryview:
    """A C-contiguous tensor's bytes as safetensors stores them (little-endian), without a copy on
    a little-endian machine."""
    array = array.astype(_le(array.dtype), copy=False)
    return memoryview(array.reshape(-1).view(np.uint8))


def _write_safetensors(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """Stream a safetensors file: the header, then each tensor's bytes from its own memory (the
    library's save() builds the whole file in memory first). The bytes are what
    safetensors.numpy.save writes for the same tensors and metadata (whose own order of the two
    metadata keys varies from run to run)."""
    head, order = _safetensors_layout(arrays)
    f.write(head)
    for name in order:
        if arrays[name].nbytes:
            f.write(_tensor_bytes(arrays[name]))


def _write_npz(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    # zipfile + format.write_array is what np.savez does, without its keyword arguments, which a
    # tensor named "file" or "allow_pickle" would collide with.
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, array in arrays.items():
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def _write_torch(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    torch = _import_torch()
    state = {}
    for name, array in arrays.items():
        if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays
            array = array.copy()
        if array.dtype.name == "bfloat16":
            state[name] = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(array)
    torch.save(state, f)
