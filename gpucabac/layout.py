"""How a tensor's levels are laid out for coding, with no coder attached: which context each bin
uses, and where the slices lie. The format reader, the quantizers and both engines share it; it
imports no numba, so reading a container's header stays fast.

Context layout of one tensor (a compact renumbering of NNC's, without TCA/HDSP/row skipping):

  ====================  =================================  =========================
  bins                  context index                      selected by
  ====================  =================================  =========================
  sig                   SIG + 3*(s & 7) + nb               DQ state s, neighbour nb
  sign                  SIGN + nb                          neighbour nb
  g_j (j = 1..N)        GT + 2*(j-1) + (q < 0)             flag position, own sign
  EG prefix bin j       GT + 2*N + j   (j = 0..30)         position in the prefix
  ====================  =================================  =========================

With zero runs (format version 3) a tensor codes no sig bins: before every non-zero level, and
once at a slice's end if it ends in zeros, the number of zeros since the previous non-zero comes
as an order-0 Exp-Golomb code whose prefix bin j uses context RUN + min(j, 23) — the 24 places
the sig contexts have in the other modes — and whose suffix bins are bypass bins.

nb is 0, 1, 2 for a previous level (in the slice) that is zero, negative, positive. The trellises
larger than NNC's 8 states (format version 2) share the 8 sets of sig contexts by s & 7 (s & 1 is
the state's quantizer in every trellis).

Slices: a tensor of `numel` levels in scan order is cut into slices of `slice_size` levels (the
last one may be shorter), each coded with its contexts reset (docs/design.md §1).
"""

from __future__ import annotations

import numpy as np

from .tables import EG_PREFIX_BINS, MAX_GT_FLAGS

SIG = 0
RUN = 0  # zero-run prefix contexts; runs and sig bins never share a tensor
RUN_CONTEXTS = 24
# A run is at most a slice's length (< 2^32), so its prefix has at most 33 bins (m <= 32).
RUN_PREFIX_BINS = 33
SIGN = 24
GT = 27
MAX_CONTEXTS = GT + 2 * MAX_GT_FLAGS + EG_PREFIX_BINS
# Regular bins of one level at most: sig, sign, N flags, EG prefix.
MAX_REGULAR_BINS = 2 + MAX_GT_FLAGS + EG_PREFIX_BINS


def num_contexts(num_gt_flags: int) -> int:
    return GT + 2 * num_gt_flags + EG_PREFIX_BINS


def used_contexts(num_gt_flags: int, dq, runs: bool = False) -> np.ndarray:
    """Indices of the contexts a tensor can use; only these carry a signalled initialisation."""
    sig = np.arange(RUN, RUN + RUN_CONTEXTS) if runs else np.arange(SIG, SIG + (24 if dq else 3))
    rest = np.arange(SIGN, num_contexts(num_gt_flags))
    return np.concatenate([sig, rest]).astype(np.int32)


def full_context_init(ctx_init: np.ndarray, num_gt_flags: int, dq: bool, runs: bool = False) -> np.ndarray:
    """The engines' per-context preset table (MAX_CONTEXTS entries) from a tensor's used-context choice."""
    init = np.zeros(MAX_CONTEXTS, np.int32)
    init[used_contexts(num_gt_flags, dq, runs)] = ctx_init
    return init


def slice_offsets(lengths: np.ndarray) -> np.ndarray:
    """int64 start of every slice when the slices of `lengths` bytes lie back to back."""
    lengths = np.asarray(lengths, np.int64)
    out = np.zeros(lengths.size, np.int64)
    np.cumsum(lengths[:-1], out=out[1:])
    return out


def num_slices(numel: int, slice_size: int) -> int:
    return -(-int(numel) // int(slice_size))


def slice_counts(numel: int, slice_size: int) -> np.ndarray:
    """int64 number of values in every slice (the last one may be shorter)."""
    first = np.arange(num_slices(numel, slice_size), dtype=np.int64) * slice_size
    return np.minimum(slice_size, numel - first)
