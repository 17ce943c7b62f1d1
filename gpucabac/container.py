"""The .gcb container: fixed preamble, tensor table, slice payloads.

docs/format.md is the specification; this module is its only writer and reader. Every field
read from a file is validated before use, and every failure raises FormatError naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import struct
import zlib

import numpy as np

from .dtypes import DTYPES, FLOAT_DTYPES, ITEMSIZE, numpy_dtype
from .errors import FormatError, ModelFileError
from .layout import num_slices, used_contexts
from .modes import QUANTIZERS, mode_dq
from .tables import MAX_GT_FLAGS, NUM_PRESETS

MAGIC = b"\x89GCB\r\n\x1a\n"
VERSION = 3  # the newest this gpucabac writes and reads; a file is written as the oldest version its records need
PREAMBLE = struct.Struct("<8sHHIQII")  # magic, version, flags, tensor count, table length, table crc, reserved
PREAMBLE_SIZE = PREAMBLE.size  # 32

# Coding modes by their code in the mode byte (docs/format.md §3): version 1 has the first four,
# the larger DQ trellises came with version 2.
MODES = ("urq", "dq", "int", "raw", *QUANTIZERS[2:])
V1_MODES = 4
COLUMN_SCAN_BIT = 0x80  # of the mode byte
ZERO_RUNS_BIT = 0x40  # of the mode byte, version 3


def format_version(records) -> int:
    """The container version a file with these tensor records is written as (docs/format.md):
    3 with zero runs, 2 with a larger trellis or a column scan, else 1."""
    if any(r.runs for r in records):
        return 3
    return 2 if any(MODES.index(r.mode) >= V1_MODES or r.scan != "rows" for r in records) else 1


def can_scan_columns(mode: str, dtype: str, ndim: int) -> bool:
    """Whether a tensor may be scanned column-wise: coded float tensors of two or more dimensions."""
    return (mode == "urq" or mode_dq(mode) > 0) and dtype in FLOAT_DTYPES and ndim >= 2


def scan_view(x: np.ndarray, scan: str) -> np.ndarray:
    """The values of x in scan order, as an array whose row-major order is that scan: x itself
    ("rows"), or the transpose of x viewed as [shape[0], rest] ("columns")."""
    if scan == "rows" or x.size == 0:
        return x
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def unscan(values: np.ndarray, shape: tuple, scan: str, xp=np):
    """The tensor of `shape` whose scan (scan_view) is the flat `values` (NumPy or CuPy, `xp`)."""
    if scan == "rows" or not values.size:
        return values.reshape(shape)
    return xp.ascontiguousarray(values.reshape(-1, shape[0]).T).reshape(shape)


MAX_NDIM = 8
MAX_ELEMENTS = 1 << 40
# A coded slice cannot hold more levels than this per payload byte: a level costs at least about
# 0.0102 bits (an MPS in the most skewed state at the narrowest range, ~790 levels per byte), so a
# reader rejects absurd shapes before it allocates anything.
MAX_LEVELS_PER_BYTE = 1024
MIN_SLICE_BYTES = 2


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One row of the tensor table. `ctx_init` holds the preset index of every used context."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    mode: str
    step: float
    num_gt_flags: int
    slice_size: int
    ctx_init: np.ndarray  # uint8, one preset index (0..8) per used context
    offset: int  # of the tensor's first slice, from the start of the payload area
    slice_lengths: np.ndarray  # uint32
    slice_crcs: np.ndarray  # uint32
    scan: str = "rows"  # or "columns" (format version 2): the order the slices hold the values in
    runs: bool = False  # zeros coded as runs instead of one sig bin each (format version 3)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_slices(self) -> int:
        return int(self.slice_lengths.shape[0])

    @property
    def payload_length(self) -> int:
        return int(self.slice_lengths.sum(dtype=np.int64))


# --- writer ---------------------------------------------------------------------------------------

def ctx_init_bytes(count: int) -> int:
    """Bytes of a record's `count` context-init indices (a nibble each)."""
    return (count + 1) // 2


def _record_bytes(rec: TensorRecord) -> bytes:
    name = rec.name.encode("utf-8")
    parts = [
        struct.pack("<H", len(name)), name,
        struct.pack("<BBBB", DTYPES.index(rec.dtype),
                    MODES.index(rec.mode) | (COLUMN_SCAN_BIT if rec.scan == "columns" else 0) | (ZERO_RUNS_BIT if rec.runs else 0),
                    len(rec.shape), rec.num_gt_flags),
        struct.pack(f"<{len(rec.shape)}Q", *rec.shape),
        struct.pack("<fII", rec.step, rec.slice_size, rec.num_slices),
    ]
    if rec.mode != "raw":
        nib = np.zeros(2 * ctx_init_bytes(len(rec.ctx_init)), np.uint8)
        nib[: len(rec.ctx_init)] = rec.ctx_init
        parts += [struct.pack("<B", len(rec.ctx_init)), (nib[0::2] | (nib[1::2] << 4)).tobytes()]
    parts += [
        struct.pack("<QQ", rec.offset, rec.payload_length),
        rec.slice_lengths.astype("<u4").tobytes(),
        rec.slice_crcs.astype("<u4").tobytes(),
    ]
    return b"".join(parts)


def record_size(rec: TensorRecord) -> int:
    return len(_record_bytes(rec))


def write(records: list[TensorRecord], payload) -> bytes:
    """The container of `records` and their payload area: one bytes-like object, or a list (or
    tuple) of them, the records' payloads back to back, which are joined once into the result
    without an intermediate copy."""
    table = b"".join(_record_bytes(r) for r in records)
    version = format_version(records)
    pre = PREAMBLE.pack(MAGIC, version, 0, len(records), len(table), zlib.crc32(table), 0)
    parts = list(payload) if isinstance(payload, (list, tuple)) else [payload]
    return b"".join([pre, table, *(_as_bytes(p) for p in parts)])


def _as_bytes(part):
    """A payload part as a bytes-like object of its bytes (an array by its memory, not a copy)."""
    if isinstance(part, np.ndarray):
        return np.ascontiguousarray(part).reshape(-1).view(np.uint8)
    return part


# --- reader ---------------------------------------------------------------------------------------

class _Fields:
    """Cursor over the tensor table; every read is bounds checked and names what it reads."""

    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise FormatError(f"tensor table truncated while reading {what} (needs {n} bytes at offset {self.pos})")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        st = struct.Struct("<" + fmt)
        return st.unpack(self.take(st.size, what))


@dataclasses.dataclass(frozen=True)
class Header:
    version: int
    records: list[TensorRecord]
    payload_start: int  # file offset of the payload area
    payload_size: int



def read_preamble(buf: bytes | memoryview) -> tuple[int, int, int, int]:
    """(format version, tensor count, table length, table crc) from the first PREAMBLE_SIZE bytes."""
    if len(buf) < PREAMBLE_SIZE:
        raise FormatError(f"file too short for a gpucabac container: {len(buf)} bytes, the preamble alone is {PREAMBLE_SIZE}")
    magic, version, flags, count, table_len, table_crc, reserved = PREAMBLE.unpack(bytes(buf[:PREAMBLE_SIZE]))
    if magic != MAGIC:
        raise FormatError(f"not a gpucabac container: magic is {magic!r}, expected {MAGIC!r}")
    if not 1 <= version <= VERSION:
        raise FormatError(f"unsupported container version {version}; this gpucabac reads versions 1 to {VERSION}")
    if flags != 0 or reserved != 0:
        raise FormatError(f"reserved preamble fields are not zero (flags={flags}, reserved={reserved})")
    return version, count, table_len, table_crc


def parse(table: bytes | memoryview, count: int, table_crc: int, file_size: int, version: int = VERSION) -> Header:
    """Validate and parse the tensor table of a container of format `version`; `file_size` is the
    whole container's length."""
    if zlib.crc32(table) != table_crc:
        raise FormatError("tensor table checksum mismatch: the header is corrupt")
    payload_start = PREAMBLE_SIZE + len(table)
    payload_size = file_size - payload_start
    if payload_size < 0:
        raise FormatError(f"tensor table length {len(table)} runs past the end of the file ({file_size} bytes)")
    f = _Fields(memoryview(table))
    # Smallest record: 2 (name length) + 1 (name) + 4 + 12 + 16 bytes.
    if count > len(table) // 35:
        raise FormatError(f"tensor count {count} cannot fit in a {len(table)}-byte tensor table")
    records = []
    names = set()
    expected_offset = 0
    for t in range(count):
        (nlen,) = f.unpack("H", f"name length of tensor #{t}")
        if nlen == 0:
            raise FormatError(f"tensor #{t} has an empty name")
        try:
            name = bytes(f.take(nlen, f"name of tensor #{t}")).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"name of tensor #{t} is not valid UTF-8") from e
        if name in names:
            raise FormatError(f"tensor name {name!r} appears twice")
        names.add(name)
        dcode, mcode, ndim, ngt = f.unpack("BBBB", f"dtype/mode/ndim of {name!r}")
        if dcode >= len(DTYPES):
            raise FormatError(f"tensor {name!r}: unknown dtype code {dcode}")
        scan = "columns" if version >= 2 and mcode & COLUMN_SCAN_BIT else "rows"
        runs = bool(version >= 3 and mcode & ZERO_RUNS_BIT)
        mcode &= 0x3F if version >= 3 else (0x7F if version >= 2 else 0xFF)
        if mcode >= (V1_MODES if version == 1 else len(MODES)):
            raise FormatError(f"tensor {name!r}: unknown coding mode {mcode} (format version {version})")
        dtype, mode = DTYPES[dcode], MODES[mcode]
        if ndim > MAX_NDIM:
            raise FormatError(f"tensor {name!r}: {ndim} dimensions, at most {MAX_NDIM} allowed")
        if scan == "columns" and not can_scan_columns(mode, dtype, ndim):
            raise FormatError(f"tensor {name!r}: a column scan needs a coded float tensor of two or more dimensions")
        if runs and mode == "raw":
            raise FormatError(f"tensor {name!r}: zero runs need a coded tensor, not a raw one")
        shape = f.unpack(f"{ndim}Q", f"shape of {name!r}")
        numel = 1
        for d in shape:
            if d > MAX_ELEMENTS:  # also with a zero elsewhere: no array of such a shape can be made
                raise FormatError(f"tensor {name!r}: dimension {d} of shape {shape} exceeds {MAX_ELEMENTS}")
            numel *= d
            if numel > MAX_ELEMENTS:
                raise FormatError(f"tensor {name!r}: shape {shape} has more than {MAX_ELEMENTS} elements")
        step, slice_size, nslices = f.unpack("fII", f"step/slice size of {name!r}")
        if mode == "raw":
            if nslices != 1 or slice_size != 0 or ngt != 0:
                raise FormatError(f"tensor {name!r}: a raw tensor has one slice, slice size 0 and no flags")
            init = np.zeros(0, np.uint8)
        else:
            if ngt > MAX_GT_FLAGS:
                raise FormatError(f"tensor {name!r}: {ngt} greater-than flags, at most {MAX_GT_FLAGS}")
            if not (math.isfinite(step) and step > 0):
                raise FormatError(f"tensor {name!r}: step {step} is not a positive finite number")
            if dtype in FLOAT_DTYPES and mode == "int":
                raise FormatError(f"tensor {name!r}: integer mode for a {dtype} tensor")
            if dtype not in FLOAT_DTYPES and mode != "int":
                raise FormatError(f"tensor {name!r}: coding mode {mode} for a {dtype} tensor (integer tensors are 'int' or 'raw')")
            if slice_size == 0:
                raise FormatError(f"tensor {name!r}: slice size 0")
            want = num_slices(numel, slice_size)
            if nslices != want:
                raise FormatError(f"tensor {name!r}: {nslices} slices, but {numel} elements in slices of {slice_size} make {want}")
            (nctx,) = f.unpack("B", f"context count of {name!r}")
            raw = np.frombuffer(f.take((nctx + 1) // 2, f"context initialisation of {name!r}"), np.uint8)
            init = np.empty(2 * raw.size, np.uint8)
            init[0::2] = raw & 15
            init[1::2] = raw >> 4
            if nctx % 2 and init[nctx]:
                raise FormatError(f"tensor {name!r}: the padding nibble after its {nctx} context initialisations is not zero")
            init = init[:nctx]
            want_ctx = len(used_contexts(ngt, mode_dq(mode), runs))
            if nctx != want_ctx:
                raise FormatError(f"tensor {name!r}: {nctx} context initialisations, its mode and {ngt} flags use {want_ctx}")
            if init.size and init.max() >= NUM_PRESETS:
                raise FormatError(f"tensor {name!r}: context initialisation index {int(init.max())} is not a preset (0..{NUM_PRESETS - 1})")
        offset, length = f.unpack("QQ", f"payload offset/length of {name!r}")
        lengths = np.frombuffer(f.take(4 * nslices, f"slice lengths of {name!r}"), "<u4").astype(np.uint32)
        crcs = np.frombuffer(f.take(4 * nslices, f"slice checksums of {name!r}"), "<u4").astype(np.uint32)
        if offset != expected_offset:
            raise FormatError(f"tensor {name!r}: payload offset {offset}, expected {expected_offset} (tensors are stored back to back)")
        if int(lengths.sum(dtype=np.int64)) != length:
            raise FormatError(f"tensor {name!r}: slice lengths add up to {int(lengths.sum(dtype=np.int64))}, payload length says {length}")
        if offset + length > payload_size:
            raise FormatError(f"tensor {name!r}: payload [{offset}, {offset + length}) runs past the end of the file (payload area is {payload_size} bytes)")
        if mode == "raw":
            if length != numel * ITEMSIZE[dtype]:
                raise FormatError(f"tensor {name!r}: raw payload of {length} bytes, shape {shape} of {dtype} needs {numel * ITEMSIZE[dtype]}")
        elif nslices:
            counts = np.full(nslices, slice_size, np.int64)
            counts[-1] = numel - slice_size * (nslices - 1)
            if lengths.min() < MIN_SLICE_BYTES:
                s = int(np.argmin(lengths))
                raise FormatError(f"tensor {name!r}: slice {s} has {int(lengths[s])} bytes, a coded slice has at least {MIN_SLICE_BYTES}")
            # a run of zeros costs O(log r) bits: such slices hold any number of levels per byte
            over = counts > MAX_LEVELS_PER_BYTE * lengths.astype(np.int64)
            if not runs and over.any():
                s = int(np.argmax(over))
                raise FormatError(f"tensor {name!r}: slice {s} claims {int(counts[s])} levels in {int(lengths[s])} bytes, more than any valid stream holds")
        expected_offset = offset + length
        records.append(TensorRecord(name, dtype, tuple(int(d) for d in shape), mode, float(step), ngt,
                                    int(slice_size), init, int(offset), lengths, crcs, scan, runs))
    if f.pos != len(table):
        raise FormatError(f"tensor table has {len(table) - f.pos} unused bytes after the last tensor")
    if expected_offset != payload_size:
        raise FormatError(f"payload area is {payload_size} bytes but the tensors use {expected_offset}: the file is truncated or has trailing data")
    # a writer writes the oldest version its records need (the preamble has no checksum of its own)
    if version != format_version(records):
        raise FormatError(f"the preamble says format version {version}, its tensors are version {format_version(records)}: "
                          "the preamble is corrupt")
    return Header(version, records, payload_start, payload_size)


def parse_container(buf: bytes | memoryview) -> Header:
    version, count, table_len, table_crc = read_preamble(buf)
    if PREAMBLE_SIZE + table_len > len(buf):
        raise FormatError(f"tensor table of {table_len} bytes runs past the end of the file ({len(buf)} bytes)")
    return parse(memoryview(buf)[PREAMBLE_SIZE : PREAMBLE_SIZE + table_len], count, table_crc, len(buf), version)



# ---------------------------------------------------------------------------------------------
# What a record's dtype and mode mean for its decoded values (shared by the CPU and GPU decoders)


def raw_values(rec: TensorRecord, payload: np.ndarray) -> np.ndarray:
    """The values of a raw (uncoded) tensor from its payload bytes, after its CRC check; flat,
    in the record's dtype (the payload is little-endian)."""
    if zlib.crc32(payload) != int(rec.slice_crcs[0]):
        raise FormatError(f"tensor {rec.name!r}: checksum mismatch in its raw payload")
    dtype = numpy_dtype(rec.dtype)
    if rec.dtype == "bool" and payload.size and int(np.asarray(payload, np.uint8).max()) > 1:
        raise FormatError(f"tensor {rec.name!r}: a raw bool payload holds bytes other than 0 and 1")
    return np.asarray(payload, np.uint8).view(dtype.newbyteorder("<")).astype(dtype)


def check_int_range(rec: TensorRecord, vmin: int, vmax: int) -> None:
    """An integer tensor's decoded values must fit its dtype (a corrupt stream may decode to any level)."""
    lo, hi = (0, 1) if rec.dtype == "bool" else (np.iinfo(rec.dtype).min, np.iinfo(rec.dtype).max)
    if vmin < lo or vmax > hi:
        raise FormatError(f"tensor {rec.name!r}: decoded values {vmin}..{vmax} do not fit its dtype {rec.dtype}")


# --- files ------------------------------------------------------------------------------------


def open_file(path):
    """A .gcb file opened for reading; ModelFileError for a missing path or one that is not a
    regular file (a FIFO would block the reader, a directory cannot be read)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ModelFileError(f"{os.fspath(path)}: {e.strerror or e}") from e
    if not stat.S_ISREG(mode):
        raise ModelFileError(f"{os.fspath(path)}: not a regular file (a directory, device or pipe); a .gcb container is a file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise ModelFileError(f"{os.fspath(path)}: {e.strerror or e}") from e


def read_header_file(f) -> Header:
    """The header of a container file opened for reading (its preamble and tensor table only)."""
    size = os.fstat(f.fileno()).st_size
    pre = f.read(PREAMBLE_SIZE)
    version, count, table_len, crc = read_preamble(pre)
    if PREAMBLE_SIZE + table_len > size:
        raise FormatError(f"tensor table of {table_len} bytes runs past the end of the file ({size} bytes)")
    return parse(f.read(table_len), count, crc, size, version)
