"""The engine contract: what an entropy-coding engine takes and gives back (docs/design.md §2).

An engine codes integer levels into independently flushed slices and decodes them again; nothing
else. Quantization, the validity of levels, the choice of context initialisation, checksums of
a container's records and error messages are the codec's, shared by every engine (gpucabac.slices,
gpucabac.context_init). The contract is drawn at the GPU's granularity:

* `encode(jobs)` codes any number of tensors (each its levels, slice size, trellis, flags,
  zero runs or not, and context initialisation) and returns every slice's bytes, length and CRC-32. The levels are
  valid (slices.check_levels ran on them).
* `decode(table, outputs)` decodes one slice table that spans many tensors (`SliceTable`) in one
  call: the GPU in one launch, the CPU tensor by tensor. The table's `payload` is one flat uint8
  array in which every slice lies at its `slice_offset`; the slices need not be back to back nor
  cover all of it (the codec passes a zero-copy, read-only view of a container's payload area:
  `SliceTable.over_payload`). An engine only reads it. Each tensor's values are written as
  its `TensorOutput` asks: the int32 levels themselves, or dequantized into a float dtype
  (fused dequantization: level × step in the tensor's precision, then `dtypes.cast_float`).
  Every slice's CRC-32 is checked before it is decoded; per slice an error code of
  gpucabac.slices comes back (DECODE_CRC for a checksum mismatch).

Both directions are bit-exact across engines: the same levels give the same bytes, the same
bytes the same values. tests/test_engines.py runs one suite over every engine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..layout import MAX_CONTEXTS, full_context_init, slice_counts, slice_offsets
from ..modes import mode_dq

Progress = Callable[[int], None]


@dataclasses.dataclass(frozen=True)
class EncodeJob:
    """One tensor's levels to code: int32, flat, in scan order, valid for `dq` and the flags."""

    levels: np.ndarray
    slice_size: int
    dq: int  # trellis size, 0 without dependent quantization
    num_gt_flags: int
    init: np.ndarray  # [MAX_CONTEXTS] the preset every context starts each slice from
    # an upper bound on every slice's coded bytes, when the caller has it (slices.check_levels
    # returns it with the validity check); an engine may use it instead of computing its own
    slice_bytes_bound: np.ndarray | None = None
    runs: bool = False  # zeros coded as runs (format version 3) instead of one sig bin each


@dataclasses.dataclass(frozen=True)
class CodedSlices:
    """One tensor's coded slices, on the host: the payload and, per slice, its length and CRC-32."""

    payload: np.ndarray  # uint8
    lengths: np.ndarray  # uint32
    crcs: np.ndarray  # uint32


@dataclasses.dataclass(frozen=True)
class TensorOutput:
    """How a decoder writes one tensor of a slice table: `dtype` "int32" for the levels
    themselves, else a float dtype name for the values `level × step` reconstructed in the
    precision of `work` (the tensor's own float dtype, docs/format.md §3) and converted to `dtype`."""

    dtype: str
    work: str = "float32"
    step: float = 1.0


@dataclasses.dataclass(frozen=True)
class SliceTable:
    """The slices of several tensors as one flat table (host arrays), as both decoders read it.

    `payload` is one flat uint8 array (possibly a read-only view of the caller's bytes) holding
    every slice, at its `slice_offset`; bytes of it that no slice covers are never read.
    Slice arrays: `slice_offset` into `payload`, `slice_length`, `slice_crc`, `slice_tensor` (its
    tensor's index), `slice_first` and `slice_count` (the values it holds, within its tensor).
    Tensor arrays: `tensor_dq`, `tensor_gt`, `tensor_runs` (1: zeros coded as runs), `tensor_numel`,
    `tensor_first_slice` (T + 1 entries:
    tensor t owns slices tensor_first_slice[t] .. tensor_first_slice[t + 1] - 1) and
    `tensor_init` [T, MAX_CONTEXTS]."""

    payload: np.ndarray
    slice_offset: np.ndarray
    slice_length: np.ndarray
    slice_crc: np.ndarray
    slice_tensor: np.ndarray
    slice_first: np.ndarray
    slice_count: np.ndarray
    tensor_dq: np.ndarray
    tensor_gt: np.ndarray
    tensor_runs: np.ndarray
    tensor_numel: np.ndarray
    tensor_first_slice: np.ndarray
    tensor_init: np.ndarray

    @property
    def num_tensors(self) -> int:
        return int(self.tensor_dq.size)

    @property
    def num_slices(self) -> int:
        return int(self.slice_offset.size)

    def slices_of(self, t: int) -> slice:
        return slice(int(self.tensor_first_slice[t]), int(self.tensor_first_slice[t + 1]))

    @classmethod
    def from_records(cls, records: Sequence, payloads: Sequence[np.ndarray]) -> SliceTable:
        """The table of coded container records (container.TensorRecord, mode not 'raw', at least
        one value each) and their payload bytes, one array per record, already validated by the
        container reader. The payloads are copied into one array; `over_payload` makes the table
        without a copy when they already lie in one buffer."""
        pieces = [np.ascontiguousarray(data, dtype=np.uint8).reshape(-1) for data in payloads]
        starts = np.zeros(len(pieces), np.int64)
        if pieces:
            starts[1:] = np.cumsum([p.size for p in pieces[:-1]], dtype=np.int64)
        payload = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
        return cls.over_payload(records, payload, starts)

    @classmethod
    def over_payload(cls, records: Sequence, payload: np.ndarray, starts: Sequence[int]) -> SliceTable:
        """The table of coded container records (as for `from_records`) whose payload bytes lie in
        `payload` (flat uint8, used as given: a view of a container's bytes costs no copy), record
        t's at payload[starts[t] : starts[t] + payload_length]; with a container's payload area as
        `payload`, `starts` are the records' offsets. Each record's bytes must lie inside it."""
        payload = np.asarray(payload)
        if payload.dtype != np.uint8 or payload.ndim != 1 or not payload.flags.c_contiguous:
            raise ValueError("SliceTable payload: a flat, contiguous uint8 array")
        if payload.flags.writeable:  # engines only read it; one read-only type for numba, too
            payload = payload.view()
            payload.flags.writeable = False
        n = len(records)
        if len(starts) != n:
            raise ValueError(f"SliceTable: {n} records but {len(starts)} payload starts")
        offs, tens, firsts, counts = [], [], [], []
        dq = np.zeros(n, np.int32)
        gt = np.zeros(n, np.int32)
        runs = np.zeros(n, np.int32)
        numel = np.zeros(n, np.int64)
        first_slice = np.zeros(n + 1, np.int64)
        init = np.zeros((n, MAX_CONTEXTS), np.uint8)
        for t, (rec, start) in enumerate(zip(records, starts)):
            start = int(start)
            if start < 0 or start + rec.payload_length > payload.size:
                raise ValueError(f"SliceTable: the payload of record {t} ({rec.name!r}) lies outside the buffer")
            offs.append(start + slice_offsets(rec.slice_lengths))
            tens.append(np.full(rec.num_slices, t, np.int32))
            firsts.append(np.arange(rec.num_slices, dtype=np.int64) * rec.slice_size)
            counts.append(slice_counts(rec.numel, rec.slice_size))
            dq[t] = mode_dq(rec.mode)
            gt[t] = rec.num_gt_flags
            runs[t] = rec.runs
            numel[t] = rec.numel
            first_slice[t + 1] = first_slice[t] + rec.num_slices
            init[t] = full_context_init(rec.ctx_init, rec.num_gt_flags, dq[t], rec.runs)

        def cat(parts, dtype):
            return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)

        return cls(
            payload=payload, slice_offset=cat(offs, np.int64),
            slice_length=cat([r.slice_lengths for r in records], np.uint32),
            slice_crc=cat([r.slice_crcs for r in records], np.uint32), slice_tensor=cat(tens, np.int32),
            slice_first=cat(firsts, np.int64), slice_count=cat(counts, np.int64),
            tensor_dq=dq, tensor_gt=gt, tensor_runs=runs, tensor_numel=numel, tensor_first_slice=first_slice, tensor_init=init,
        )


@runtime_checkable
class Engine(Protocol):
    """An entropy-coding engine (the module docstring has the contract)."""

    name: str  # "cpu", "gpu", ...: what `get_engine` knows it by
    xp: Any  # the array module of decoded arrays: numpy, or cupy for arrays left on the GPU

    def describe(self) -> str:
        """Where it runs, for logs and benchmark records (e.g. "CUDA device 0 (NVIDIA H200)")."""

    def encode(self, jobs: Sequence[EncodeJob], progress: Progress | None = None) -> list[CodedSlices]:
        """Code every job's levels; `progress` gets the number of levels finished."""

    def decode(self, table: SliceTable, outputs: Sequence[TensorOutput],
               progress: Progress | None = None) -> tuple[list, np.ndarray]:
        """(flat arrays of `xp`, one per tensor of the table, as `outputs` asks; int32 error codes
        per slice, on the host). Slices of tensors after the first one with an error may be left
        undecoded (their codes 0). `progress` gets the number of values finished."""

    def upload(self, host: np.ndarray) -> Any:
        """A host array as an array of `xp` (what the codec hands out beside decoded tensors)."""

    def to_host(self, a) -> np.ndarray:
        """An array of `xp` as a NumPy array of the same dtype."""
