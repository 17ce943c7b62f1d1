"""How tensors are coded: one frozen, validated settings object, and the plan it makes for a tensor.

    >>> from gpucabac import CodingSettings
    >>> s = CodingSettings(qp=-30, quantizer="dq")
    >>> round(s.step, 6), s.dq
    (0.007812, 8)
    >>> CodingSettings.from_dict(s.to_dict()) == s
    True

`CodingSettings` holds what the coded bytes depend on: the step (or NNC's QP), the quantizer,
the rate-distortion λ, the scan order, the slice size, the greater-than flags and the rule for
small tensors. How the work runs (device, threads, progress) is kept apart, as arguments of
`encode`. Per-tensor settings are a mapping {name: CodingSettings}; an operating point chosen
from a sweep is such a mapping (`OperatingPoint.per_tensor`). The object validates itself once,
when it is made; everything downstream trusts it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .dtypes import dtype_name, is_float
from .errors import InputError
from .modes import QUANTIZER_STATES, QUANTIZERS, SCAN_CHOICES, SCANS, ZERO_CHOICES, dq_mode, step_from_qp
from .tables import MAX_ABS_LEVEL, MAX_GT_FLAGS

DEFAULT_QP = -32
DEFAULT_SLICE_SIZE = 8192  # experiments/results/slice_size_curve_qp-32.md: +0.29% against one slice per tensor
DEFAULT_GT_FLAGS = 11  # NNCodec 2 codes N = 11 greater-than flags
# Tensors of at most one dimension (biases, norms) get step / SMALL_STEP_DIVISOR by default:
# they are a tiny share of the weights and sensitive, so fine steps cost little.
SMALL_STEP_DIVISOR = 16
MAX_SLICE_SIZE = 0xFFFFFFFF  # a 32-bit field of the format
# zeros="auto" tries zero runs on a tensor when at least this share of its levels is zero: below
# it the sig flags win (experiments/results/fl_sparse_bits.md), and trying costs a second coding.
RUNS_MIN_ZERO_SHARE = 0.75
# ... and codes runs alone from this share on, on tensors of at least RUNS_ONLY_MIN_LEVELS: over
# the 86 settings whose levels were on average at least 95% zero, flags were never more than 0.04%
# smaller (their record is up to 10 bytes shorter), while they took 1.1-5.8x the encoding and
# 1.4-8.4x the decoding time of runs (experiments/results/zero_coding_choice.md). Smaller tensors
# are cheap to code twice, and there the record's length can decide.
RUNS_ONLY_ZERO_SHARE = 0.95
RUNS_ONLY_MIN_LEVELS = 1 << 18


def _positive_float32(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0) or not np.isfinite(np.float32(v)) or np.float32(v) == 0:
        raise InputError(f"{what} must be a positive float32 number, got {v}")
    return v


@dataclasses.dataclass(frozen=True)
class CodingSettings:
    """What the coded bytes of a tensor depend on (validated when made; see the module doc).

    step / qp: the step of tensors of two or more dimensions, directly or as NNC's QP at
        `qp_density` (step_from_qp); neither: QP -32. `step` always reads back the step in use.
    quantizer: "urq" (rounding), "dq" (NNC's 8-state trellis) or "dq16" … "dq256".
    lam: the rate-distortion weight, in step² per bit (0: the plain quantizer, byte for byte);
        applies to tensors of two or more dimensions.
    scan: "rows", "columns" or "auto" (each eligible tensor both ways, the smaller kept).
    zeros: how zero levels are coded: "flags" (a sig bin each, format versions 1-2), "runs" (the
        length of each run of zeros, format version 3: far cheaper for sparse tensors) or "auto"
        (both ways when at least 75% of a tensor's levels are zero, the smaller kept; runs alone on
        tensors of 2^18 levels or more that are at least 95% zero).
    slice_size: values per independently coded slice; None for one slice per tensor.
    num_gt_flags: greater-than flags before the Exp-Golomb remainder, 0..20.
    small_step: the step of tensors of at most one dimension: a number, "lossless", or None for
        step / 16.
    """

    step: float | None = None
    # how the step was given; settings with the same step are equal however it was given
    qp: int | None = dataclasses.field(default=None, compare=False)
    qp_density: int = dataclasses.field(default=2, compare=False)
    quantizer: str = "urq"
    lam: float = 0.0
    scan: str = "rows"
    zeros: str = "auto"
    slice_size: int | None = DEFAULT_SLICE_SIZE
    num_gt_flags: int = DEFAULT_GT_FLAGS
    small_step: float | str | None = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if self.step is not None and self.qp is not None:
            raise InputError("give either step or qp, not both")
        if isinstance(self.qp_density, bool) or not isinstance(self.qp_density, (int, np.integer)) or not 0 <= self.qp_density <= 7:
            raise InputError(f"qp_density must be an integer in 0..7, got {self.qp_density!r}")
        put("qp_density", int(self.qp_density))
        if self.qp is not None:
            if isinstance(self.qp, bool) or not isinstance(self.qp, (int, np.integer)):
                raise InputError(f"qp must be an integer, got {self.qp!r}")
            put("qp", int(self.qp))
        step = step_from_qp(DEFAULT_QP if self.qp is None else self.qp, self.qp_density) if self.step is None else self.step
        put("step", _positive_float32(step, "step"))
        if self.quantizer not in QUANTIZERS:
            raise InputError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        try:
            lam = float(self.lam)
        except (TypeError, ValueError):
            lam = math.nan
        if not (math.isfinite(lam) and lam >= 0):
            raise InputError(f"lam must be a finite number >= 0, got {self.lam!r}")
        put("lam", lam)
        if self.scan not in SCAN_CHOICES:
            raise InputError(f"scan must be one of {', '.join(SCAN_CHOICES)}, got {self.scan!r}")
        if self.zeros not in ZERO_CHOICES:
            raise InputError(f"zeros must be one of {', '.join(ZERO_CHOICES)}, got {self.zeros!r}")
        if self.slice_size is not None:
            if isinstance(self.slice_size, bool) or not isinstance(self.slice_size, (int, np.integer)) \
                    or not 1 <= self.slice_size <= MAX_SLICE_SIZE:
                raise InputError(f"slice_size must be between 1 and 2**32-1 (or None for one slice per tensor), got {self.slice_size!r}")
            put("slice_size", int(self.slice_size))
        if isinstance(self.num_gt_flags, bool) or not isinstance(self.num_gt_flags, (int, np.integer)) \
                or not 0 <= self.num_gt_flags <= MAX_GT_FLAGS:
            raise InputError(f"num_gt_flags must be in 0..{MAX_GT_FLAGS}, got {self.num_gt_flags!r}")
        put("num_gt_flags", int(self.num_gt_flags))
        if isinstance(self.small_step, str):
            if self.small_step != "lossless":
                raise InputError(f"small_step must be a number, 'lossless' or None, got {self.small_step!r}")
        elif self.small_step is not None:
            put("small_step", _positive_float32(self.small_step, "small_step"))

    @property
    def dq(self) -> int:
        """The trellis size of the quantizer (0 for "urq")."""
        return QUANTIZER_STATES[self.quantizer]

    def replace(self, **changes) -> CodingSettings:
        """A copy with some fields changed (validated again). A new `step` drops the QP; otherwise
        a QP (new, or the one these settings were made with) sets the step again."""
        if changes.get("step") is not None:
            changes.setdefault("qp", None)
        elif changes.get("qp", self.qp) is not None:
            changes["step"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the step as resolved; `from_dict` gives the same settings back)."""
        d = dataclasses.asdict(self)
        d["qp"] = None  # the step is what was resolved from it
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CodingSettings:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InputError(f"unknown coding settings {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def from_keywords(cls, *, step=None, qp=None, qp_density=2, dq=False, lam=0.0, scan="rows", zeros="auto",
                      slice_size=DEFAULT_SLICE_SIZE, num_gt_flags=DEFAULT_GT_FLAGS, small_step=None) -> CodingSettings:
        """The settings of the keyword spelling of encode() (`dq`: a bool or a trellis size)."""
        try:
            quantizer = dq_mode(dq)
        except ValueError as e:
            raise InputError(str(e)) from None
        return cls(step=step, qp=qp, qp_density=qp_density, quantizer=quantizer, lam=lam, scan=scan, zeros=zeros,
                   slice_size=slice_size, num_gt_flags=num_gt_flags, small_step=small_step)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """How one tensor is coded, from its settings: mode ('urq', 'dq'…, 'int' or 'raw'), step,
    slice size, dtype name, RD weight, flags, the scan orders to try and how zeros are coded
    (`zeros`: "flags", "runs" or "auto")."""

    mode: str
    step: float
    slice_size: int
    dtype: str
    lam: float = 0.0
    num_gt_flags: int = 0
    scans: tuple[str, ...] = ("rows",)
    zeros: str = "flags"

    def zero_codings(self, levels: np.ndarray) -> tuple[bool, ...]:
        """The codings of zeros to try on these levels, as `runs` flags: under "auto" runs as
        well when at least RUNS_MIN_ZERO_SHARE of them are zero, runs alone from
        RUNS_ONLY_ZERO_SHARE on if there are at least RUNS_ONLY_MIN_LEVELS."""
        if self.zeros != "auto":
            return (self.zeros == "runs",)
        zeros = levels.size - np.count_nonzero(levels)
        if levels.size >= RUNS_ONLY_MIN_LEVELS and zeros >= RUNS_ONLY_ZERO_SHARE * levels.size:
            return (True,)
        if levels.size and zeros >= RUNS_MIN_ZERO_SHARE * levels.size:
            return (False, True)
        return (False,)


def plan_tensor(x: np.ndarray, settings: CodingSettings, *, explicit: bool = False) -> TensorPlan:
    """The plan of tensor x under `settings`. A float tensor of two or more dimensions is coded at
    settings.step with its quantizer, λ and scan; one of at most one dimension at the small step
    (or raw, "lossless"), λ 0, in row order, unless its settings are `explicit` (a per-tensor entry,
    applied as given whatever the tensor's rank). Integer and bool tensors are coded losslessly
    (raw beyond ±(2^30 − 1))."""
    dtype = dtype_name(x)
    n = x.size
    size = max(1, n if settings.slice_size is None else min(settings.slice_size, n))
    if not is_float(dtype):
        wide = x.astype(np.int64) if dtype != "uint64" else x
        if n and (wide.max() > MAX_ABS_LEVEL or wide.min() < -MAX_ABS_LEVEL):
            return TensorPlan("raw", 0.0, 0, dtype)
        return TensorPlan("int", 1.0, size, dtype, num_gt_flags=settings.num_gt_flags, zeros=settings.zeros)
    step, lam, scans = settings.step, settings.lam, ("rows",)
    if x.ndim >= 2:
        scans = SCANS if settings.scan == "auto" else (settings.scan,)
    elif not explicit:
        if settings.small_step == "lossless":
            return TensorPlan("raw", 0.0, 0, dtype)
        step = settings.small_step if settings.small_step is not None else settings.step / SMALL_STEP_DIVISOR
        lam = 0.0
    return TensorPlan(settings.quantizer, float(np.float32(step)), size, dtype, lam, settings.num_gt_flags, scans, settings.zeros)
