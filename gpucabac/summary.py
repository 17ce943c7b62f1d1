"""What a container holds, read from its header alone: `info`, and the ContainerInfo /
TensorInfo it returns. It imports no coder (no numba, no ml_dtypes), so that `gpucabac info`
starts in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import math
import os

from . import container
from .metrics import bits_per_weight


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    mode: str  # 'urq' | 'dq' (or 'dq16' .. 'dq256') | 'int' | 'raw'
    step: float
    slice_size: int
    num_slices: int
    num_gt_flags: int
    coded_bytes: int  # payload bytes of all its slices
    header_bytes: int  # bytes of its record in the tensor table
    scan: str = "rows"  # or "columns": the order its slices hold the values in
    zeros: str = "flags"  # or "runs": how its zero levels are coded (format version 3)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        """Its payload and its header record, per weight."""
        return bits_per_weight(self.coded_bytes + self.header_bytes, self.numel)


@dataclasses.dataclass(frozen=True)
class ContainerInfo:
    version: int
    total_bytes: int
    tensors: list[TensorInfo]

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """The whole container (preamble, table, payloads) per weight."""
        return bits_per_weight(self.total_bytes, self.numel)


def info(data) -> ContainerInfo:
    """Describe a container given as bytes or as a path (of which only the header is read)."""
    if isinstance(data, (str, os.PathLike)):
        with container.open_file(data) as f:
            header = container.read_header_file(f)
            total = os.fstat(f.fileno()).st_size
    else:
        buf = memoryview(data).cast("B")
        header = container.parse_container(buf)
        total = len(buf)
    tensors = [
        TensorInfo(r.name, r.dtype, r.shape, r.mode, r.step, r.slice_size, r.num_slices, r.num_gt_flags,
                   r.payload_length, container.record_size(r), r.scan,
                   "runs" if r.runs else "flags")
        for r in header.records
    ]
    return ContainerInfo(header.version, total, tensors)


__all__ = ["ContainerInfo", "TensorInfo", "info"]
