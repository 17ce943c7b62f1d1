"""The quantizers and scan orders gpucabac codes with, defined once.

A quantizer is named by its coding mode: "urq" (uniform reconstruction, rounding or RDOQ), "dq"
(NNC's 8-state dependent quantization) or "dq16" … "dq256" (gpucabac's larger trellises, format
version 2). Inside the codec a quantizer is its trellis size: 0 for "urq", else 8 … 256 (the
engines index their tables with it). A scan order says how a tensor's values are laid out in its
slices: "rows" (row-major) or "columns" (the transpose of the tensor viewed as [shape[0], rest],
format version 2); "auto" asks the encoder to pick the smaller per tensor. Zeros are coded as
flags or as runs (ZERO_CODINGS). A quantizer's step
size is given directly or by NNC's QP (`step_from_qp`).
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .tables import DQ_STATE_COUNTS

# mode name -> trellis size; "urq" first, then NNC's "dq", then the larger trellises
QUANTIZER_STATES = {"urq": 0, "dq": 8, **{f"dq{s}": s for s in DQ_STATE_COUNTS[1:]}}
QUANTIZERS = tuple(QUANTIZER_STATES)
DQ_MODES = {m: s for m, s in QUANTIZER_STATES.items() if s}

SCANS = ("rows", "columns")  # the orders a container records (docs/format.md §3)
SCAN_CHOICES = (*SCANS, "auto")  # what an encoder may be asked for

# How zeros are coded: a sig bin per level ("flags"), or runs of zeros before the non-zero levels
# ("runs", format version 3); "auto" codes a tensor both ways when most of its levels are zero
# and keeps the smaller.
ZERO_CODINGS = ("flags", "runs")
ZERO_CHOICES = (*ZERO_CODINGS, "auto")


def dq_states(dq) -> int:
    """The trellis size a `dq` argument means: False/0/None → 0 (off), True → NNC's 8 states, or
    one of 8, 16, ..., 256; anything else is a ValueError."""
    if isinstance(dq, (bool, np.bool_)) or dq is None:
        return 8 if dq else 0
    try:
        states = int(dq)
    except (TypeError, ValueError):
        states = -1
    if states != dq or (states != 0 and states not in DQ_STATE_COUNTS):
        raise ValueError(f"dq must be a bool or a trellis size {DQ_STATE_COUNTS}, got {dq!r}")
    return states


def mode_dq(mode: str) -> int:
    """The trellis size of a coding mode: 0 unless it is dependent quantization."""
    return DQ_MODES.get(mode, 0)


def dq_mode(dq) -> str:
    """The mode name of a `dq` argument (dq_states): 'urq' when off."""
    states = dq_states(dq)
    return next(m for m, s in QUANTIZER_STATES.items() if s == states)


def step_from_qp(qp: int, qp_density: int = 2) -> float:
    """NNC's QP -> step size (§3.3): (1 + (qp mod k)/k) * 2^floor(qp/k), k = 2^qp_density."""
    if not 0 <= qp_density <= 7:
        raise InputError(f"qp_density must be in 0..7, got {qp_density}")
    k = 1 << qp_density
    return float((k + (qp & (k - 1))) * 2.0 ** ((qp >> qp_density) - qp_density))
