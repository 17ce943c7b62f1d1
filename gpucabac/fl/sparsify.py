"""Sparsifiers for differential updates: a mapping name -> float array of deltas in, the same
mapping with most deltas set to zero out (NumPy only).

Methods (`sparsify(update, method, ...)`, or the functions of the same names):

- "topk"         magnitude top-k per tensor: in every eligible tensor keep exactly
                 k = ⌊density·n + ½⌋ values (n its size; density rounded to the nearest count,
                 halves up) of largest |x|.
- "global_topk"  the same k rule over all eligible tensors together (n their total size): the
                 k largest |x| of the whole update, wherever they are.
- "stats"        NNCodec 2's statistics-based threshold (methods_spec §3.10, step 1) followed by
                 its filter-wise structured pass (step 2, unless struct_factor = 0).
- "random"       random-k per tensor, a control: k as for "topk", positions drawn without
                 replacement by a seeded numpy Generator.

Ties (top-k): among equal |x| the lower flat index is kept (global: the earlier tensor in the
mapping's order, then the lower flat index), so the kept count is exactly k whatever the ties,
and the result depends on nothing but the input. +0.0 and -0.0 tie.

Eligible tensors: those with ndim >= min_ndim (default 2, as NNCodec: biases and norms are
never sparsified) whose name is not exempt. `exempt` is a callable name -> bool or a tuple of
suffixes; a suffix matches the whole name or its end after one of ". / _ : -" (so the default
("weight_scaling", "scale") exempts "conv1.weight_scaling", "bn/scale", "kernel_scale", not
"upscale"). The default is for the filter-wise scales (NNCodec's LSA `*.weight_scaling`,
gpucabac.fl.scaling's per-filter scales), which an update carries and must never lose.
Ineligible tensors are returned as given (the same array objects, not copies); sparsified ones
are new arrays of the input's dtype and shape.

Filters (structured pass): a filter is one slice along `filter_axis`. NNCodec works on PyTorch
layouts, where the output channel is the first dimension (conv (out, in, kh, kw), linear
(out, in)); the updates here come from Flax, where conv kernels are (kh, kw, in, out) and dense
kernels (in, out): the output filter is the LAST axis, so the default is filter_axis=-1. Pass
filter_axis=0 for PyTorch-layout tensors.

Every bad argument raises gpucabac.errors.InputError naming the tensor or the field: a density or
sparsity outside [0, 1] (or both or neither given), an unknown method, a non-float tensor, a NaN
or infinite value, a bad step, seed, filter axis or exemption.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping

import numpy as np

from ..dtypes import is_float
from ..errors import InputError

METHODS = ("topk", "global_topk", "stats", "random")
DEFAULT_EXEMPT = ("weight_scaling", "scale")
_SEPARATORS = "./_:-"
DEFAULT_STRUCT_FACTOR = 0.9  # NNCodec's struct_spars_factor (methods_spec §3.10, §6.1)
STATS_DELTA_START = 0.25  # §3.10: the δ search restarts from here
STATS_MAX_ITERATIONS = 500  # §3.10: at most this many raises of δ

Exempt = Callable[[str], bool] | tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SparsifyResult:
    """What a sparsifier did.

    masks: per sparsified (eligible) tensor, a bool array of its shape, True where the value was
        kept (top-k and random-k: exactly k True; a kept value may itself be 0 when the tensor
        has fewer than k non-zeros). Ineligible tensors have no mask.
    kept: the number of True entries over all masks.
    eligible: the number of values in the eligible tensors.
    zero_fraction: the fraction of zeros in the returned update, counted over ALL its values
        (eligible or not), as NNCodec's target is.
    thresholds: "stats" only: per eligible tensor the final τ (values with |w| < τ were zeroed).
    delta: "stats" only: the final δ (None when the Δ/2 pass alone reached the target).
    iterations: "stats" only: how many times δ was raised.
    filters_zeroed: structured pass only: per eligible tensor the number of filters set to zero.
    """

    masks: dict[str, np.ndarray]
    kept: int
    eligible: int
    zero_fraction: float
    thresholds: dict[str, float] | None = None
    delta: float | None = None
    iterations: int = 0
    filters_zeroed: dict[str, int] | None = None


# --- validation ---------------------------------------------------------------------------------

def _check_update(update) -> dict[str, np.ndarray]:
    if not isinstance(update, Mapping):
        raise InputError(f"update must be a mapping of names to float arrays, got {type(update).__name__}")
    out = {}
    for name, x in update.items():
        if not isinstance(name, str):
            raise InputError(f"update: tensor names must be strings, got {name!r}")
        try:
            a = np.asarray(x)
        except Exception as e:  # noqa: BLE001  (anything NumPy cannot read as an array)
            raise InputError(f"tensor {name!r}: not an array ({type(x).__name__})") from e
        if not _is_float_dtype(a.dtype):
            raise InputError(f"tensor {name!r}: a differential update must be float, got dtype {a.dtype}")
        if a.size and not bool(np.isfinite(_wide(a)).all()):
            raise InputError(f"tensor {name!r}: has NaN or infinite values")
        out[name] = a
    return out


def _is_float_dtype(dt: np.dtype) -> bool:
    try:
        return is_float(dt)
    except InputError:  # a dtype gpucabac has no name for (complex, object, strings...)
        return False


def _wide(a: np.ndarray) -> np.ndarray:
    """a as float32 when narrower (float16, bfloat16: exact and order-preserving), else itself."""
    return a if a.dtype.itemsize >= 4 and a.dtype.kind == "f" else a.astype(np.float32)


def _fraction(value, field: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(f"{field} must be a number in [0, 1], got {value!r}")
    v = float(value)
    if not 0.0 <= v <= 1.0:  # NaN fails too
        raise InputError(f"{field} must be in [0, 1], got {value!r}")
    return v


def _one_of(density, sparsity) -> tuple[float | None, float | None]:
    """(density, sparsity), exactly one of them given and checked (density = 1 − sparsity)."""
    if (density is None) == (sparsity is None):
        raise InputError("give exactly one of density (the kept fraction) or sparsity (the zeroed fraction)")
    if density is not None:
        return _fraction(density, "density"), None
    return None, _fraction(sparsity, "sparsity")


def _density(density, sparsity) -> float:
    """The kept fraction, as given or from the sparsity."""
    d, s = _one_of(density, sparsity)
    return 1.0 - s if d is None else d


def _target_sparsity(density, sparsity) -> float:
    """The zeroed fraction, as given or from the density."""
    d, s = _one_of(density, sparsity)
    return 1.0 - d if s is None else s


def keep_count(density: float, n: int) -> int:
    """k = ⌊density·n + ½⌋ (the nearest count, halves up), clipped to 0..n: the count every
    top-k and random-k sparsifier keeps. Rounding, not flooring, so that a density written in
    decimal keeps the count it says (0.29·100 is 28.999…96 in binary, and keeps 29)."""
    return min(n, max(0, math.floor(density * n + 0.5)))


def _exempt_fn(exempt) -> Callable[[str], bool]:
    if callable(exempt):
        return exempt
    if isinstance(exempt, str):
        exempt = (exempt,)
    if not isinstance(exempt, (tuple, list, frozenset, set)) or not all(isinstance(s, str) and s for s in exempt):
        raise InputError(f"exempt must be a callable name -> bool or a tuple of non-empty name suffixes, got {exempt!r}")
    suffixes = tuple(exempt)

    def matches(name: str) -> bool:
        for s in suffixes:
            if name == s or (name.endswith(s) and name[-len(s) - 1] in _SEPARATORS):
                return True
        return False

    return matches


def _eligible(tensors: Mapping[str, np.ndarray], exempt, min_ndim) -> list[str]:
    if isinstance(min_ndim, (bool, np.bool_)) or not isinstance(min_ndim, numbers.Integral) or min_ndim < 0:
        raise InputError(f"min_ndim must be a non-negative integer, got {min_ndim!r}")
    is_exempt = _exempt_fn(exempt)
    names = []
    for name, a in tensors.items():
        if a.ndim >= min_ndim and not bool(is_exempt(name)):
            names.append(name)
    return names


def _zero_fraction(tensors: Mapping[str, np.ndarray]) -> float:
    total = sum(a.size for a in tensors.values())
    zeros = sum(a.size - int(np.count_nonzero(a)) for a in tensors.values())
    return zeros / total if total else 0.0


def _result(out, masks, eligible_size, **extra) -> tuple[dict[str, np.ndarray], SparsifyResult]:
    kept = sum(int(np.count_nonzero(m)) for m in masks.values())
    return out, SparsifyResult(masks, kept, eligible_size, _zero_fraction(out), **extra)


def _apply(a: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, a, np.zeros((), a.dtype)).astype(a.dtype, copy=False)


# --- top-k --------------------------------------------------------------------------------------

def _topk_flat(mag: np.ndarray, k: int) -> np.ndarray:
    """Flat bool mask of the k largest entries of mag (1-D, no NaN), ties to the lower index."""
    n = mag.size
    mask = np.zeros(n, bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    v = np.partition(mag, n - k)[n - k]  # the k-th largest value
    mask = mag > v
    need = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(mag == v)[:need]] = True
    return mask


def topk(update: Mapping[str, np.ndarray], *, density: float | None = None, sparsity: float | None = None,
         exempt: Exempt = DEFAULT_EXEMPT, min_ndim: int = 2) -> tuple[dict[str, np.ndarray], SparsifyResult]:
    """Magnitude top-k per tensor: each eligible tensor keeps exactly keep_count(density, size)
    values of largest |x| (ties: lower flat index), the rest become 0."""
    tensors = _check_update(update)
    d = _density(density, sparsity)
    names = _eligible(tensors, exempt, min_ndim)
    out, masks = dict(tensors), {}
    for name in names:
        a = tensors[name]
        m = _topk_flat(np.abs(_wide(a)).ravel(), keep_count(d, a.size)).reshape(a.shape)
        masks[name] = m
        out[name] = _apply(a, m)
    return _result(out, masks, sum(tensors[n].size for n in names))


def global_topk(update: Mapping[str, np.ndarray], *, density: float | None = None, sparsity: float | None = None,
                exempt: Exempt = DEFAULT_EXEMPT, min_ndim: int = 2) -> tuple[dict[str, np.ndarray], SparsifyResult]:
    """Magnitude top-k over all eligible tensors together: exactly keep_count(density, total
    eligible size) values of largest |x| are kept (ties: the earlier tensor in the mapping's
    order, then the lower flat index)."""
    tensors = _check_update(update)
    d = _density(density, sparsity)
    names = _eligible(tensors, exempt, min_ndim)
    out, masks = dict(tensors), {}
    if not names:
        return _result(out, masks, 0)
    wide = [_wide(tensors[n]) for n in names]
    dtype = np.result_type(*(w.dtype for w in wide))  # float32 or float64: exact for every input
    mag = np.concatenate([np.abs(w.astype(dtype, copy=False)).ravel() for w in wide])
    flat = _topk_flat(mag, keep_count(d, mag.size))
    start = 0
    for name in names:
        a = tensors[name]
        m = flat[start:start + a.size].reshape(a.shape)
        start += a.size
        masks[name] = m
        out[name] = _apply(a, m)
    return _result(out, masks, mag.size)


# --- random-k -----------------------------------------------------------------------------------

def random_k(update: Mapping[str, np.ndarray], *, density: float | None = None, sparsity: float | None = None,
             seed: int | np.random.Generator | None = None, exempt: Exempt = DEFAULT_EXEMPT,
             min_ndim: int = 2) -> tuple[dict[str, np.ndarray], SparsifyResult]:
    """Random-k per tensor (a control for top-k): each eligible tensor keeps exactly
    keep_count(density, size) positions drawn without replacement, the tensors in the mapping's
    order from one numpy Generator (`seed`: an int, a Generator, or None for fresh OS entropy).
    The same seed and update give the same masks."""
    tensors = _check_update(update)
    d = _density(density, sparsity)
    names = _eligible(tensors, exempt, min_ndim)
    rng = _generator(seed)
    out, masks = dict(tensors), {}
    for name in names:
        a = tensors[name]
        flat = np.zeros(a.size, bool)
        flat[rng.choice(a.size, keep_count(d, a.size), replace=False)] = True
        m = flat.reshape(a.shape)
        masks[name] = m
        out[name] = _apply(a, m)
    return _result(out, masks, sum(tensors[n].size for n in names))


def _generator(seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, a numpy Generator or None, got {seed!r}")
    return np.random.default_rng(int(seed))


# --- NNCodec's statistics-based threshold and structured pass (methods_spec §3.10) ----------------

def _steps(step, names) -> dict[str, float]:
    """Δ per eligible tensor: one positive float for all, or a mapping naming every one."""
    def check(v, field):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)) or v <= 0:
            raise InputError(f"{field} must be a positive finite number (the quantizer's step Δ), got {v!r}")
        return float(v)

    if step is None:
        raise InputError("step is needed by the statistics-based sparsifier (τ is never below Δ/2): give the "
                         "quantizer's step, e.g. gpucabac.step_from_qp(qp)")
    if isinstance(step, Mapping):
        missing = [n for n in names if n not in step]
        if missing:
            raise InputError(f"step: no step for tensor {missing[0]!r}")
        return {n: check(step[n], f"step[{n!r}]") for n in names}
    s = check(step, "step")
    return dict.fromkeys(names, s)


def _stats_threshold(a: np.ndarray, delta: float | None, half_step: float) -> float:
    """τ = max(|μ − δσ|, |μ + δσ|), never below Δ/2; δ None: Δ/2 alone (the QP-induced pass)."""
    if delta is None:
        return half_step
    w = a.astype(np.float64).ravel()
    mu, sigma = float(w.mean()), float(w.std())
    return max(abs(mu - delta * sigma), abs(mu + delta * sigma), half_step)


def _delta_increment(gap: float, previous: float) -> float:
    """§3.10: the step of δ shrinks as the gap to the target closes (kept while the gap is ≥ 0.30)."""
    if gap < 0.05:
        return 0.01
    if gap < 0.10:
        return 0.05
    if gap < 0.30:
        return 0.10
    return previous


def stats_threshold(update: Mapping[str, np.ndarray], *, sparsity: float | None = None, density: float | None = None,
                    step: float | Mapping[str, float] | None = None, exempt: Exempt = DEFAULT_EXEMPT, min_ndim: int = 2,
                    max_iterations: int = STATS_MAX_ITERATIONS) -> tuple[dict[str, np.ndarray], SparsifyResult]:
    """NNCodec 2's statistics-based sparsification (methods_spec §3.10, step 1).

    Every eligible tensor loses the values with |w| < τ, τ = max(|μ − δσ|, |μ + δσ|) but never
    below Δ/2 (`step` = Δ, the quantizer's step: one float, or a mapping naming every eligible
    tensor). First pass: τ = Δ/2 alone (what the quantizer would zero anyway). While the fraction
    of zeros over ALL values of the update (eligible or not, zeros already there included) is
    below the target `sparsity`, δ restarts from 0.25 and is raised by 0.2 while the gap to the
    target is ≥ 0.30, then 0.1 (gap < 0.30), 0.05 (< 0.10), 0.01 (< 0.05), at most
    `max_iterations` times; each raise recomputes every τ from the first pass's tensors (μ and σ
    are those of the tensor after the Δ/2 pass, zeros included, as NNCodec computes them). The
    first δ tried is 0.25 + the first increment, as in NNCodec. The target may be missed when
    the iterations run out or when ineligible tensors hold too many of the values."""
    tensors = _check_update(update)
    target = _target_sparsity(density, sparsity)
    if isinstance(max_iterations, (bool, np.bool_)) or not isinstance(max_iterations, numbers.Integral) or max_iterations < 0:
        raise InputError(f"max_iterations must be a non-negative integer, got {max_iterations!r}")
    names = _eligible(tensors, exempt, min_ndim)
    half = {n: s / 2 for n, s in _steps(step, names).items()}

    def cut(source, delta):
        out, masks, taus = dict(tensors), {}, {}
        for n in names:
            a = source[n]
            tau = _stats_threshold(a, delta, half[n]) if a.size and a.any() else half[n]
            m = np.abs(a.astype(np.float64)) >= tau  # in float64, as NNCodec compares with its float64 τ
            masks[n], taus[n] = m, tau
            out[n] = _apply(a, m)
        return out, masks, taus

    first, masks, taus = cut(tensors, None)
    out, delta, inc, iterations = first, None, 0.2, 0
    d = STATS_DELTA_START
    while iterations < max_iterations:
        frac = _zero_fraction(out)
        if frac >= target:
            break
        inc = _delta_increment(target - frac, inc)
        d += inc
        iterations += 1
        out, masks, taus = cut(first, d)  # |0| < τ: what the first pass zeroed stays zero
        delta = d
    return _result(out, masks, sum(tensors[n].size for n in names), thresholds=taus, delta=delta, iterations=iterations)


def _filter_means(a: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(i for i in range(a.ndim) if i != axis)
    return np.abs(a.astype(np.float64)).mean(axis=other)


def _axis(a: np.ndarray, filter_axis, name: str) -> int:
    if isinstance(filter_axis, (bool, np.bool_)) or not isinstance(filter_axis, numbers.Integral):
        raise InputError(f"filter_axis must be an integer, got {filter_axis!r}")
    if not -a.ndim <= filter_axis < a.ndim:
        raise InputError(f"tensor {name!r}: filter_axis {filter_axis} is out of range for shape {a.shape}")
    return int(filter_axis) % a.ndim


def structured(update: Mapping[str, np.ndarray], *, factor: float = DEFAULT_STRUCT_FACTOR, filter_axis: int = -1,
               exempt: Exempt = DEFAULT_EXEMPT, min_ndim: int = 2) -> tuple[dict[str, np.ndarray], SparsifyResult]:
    """NNCodec 2's filter-wise structured sparsification (methods_spec §3.10, step 2).

    Per eligible tensor with a non-zero value: m_f = mean |w| of every filter f (the slice along
    `filter_axis`; default -1, the output filter of Flax kernels, see the module docstring),
    p = the fraction of filters with m_f < factor · mean(m), and the ⌊p·F⌋ filters of smallest
    m_f (F filters; ties: lower filter index) are set to zero. p·F is that count exactly (NNCodec
    computes int(p·F) in floats, which can come out one lower). factor 0 changes nothing."""
    tensors = _check_update(update)
    f = float(factor) if isinstance(factor, numbers.Real) and not isinstance(factor, (bool, np.bool_)) else math.nan
    if not (math.isfinite(f) and f >= 0):
        raise InputError(f"factor (struct_factor) must be a non-negative number, got {factor!r}")
    names = [n for n in _eligible(tensors, exempt, min_ndim) if tensors[n].ndim >= 1]  # a scalar has no filters
    out, masks, zeroed = dict(tensors), {}, {}
    for name in names:
        a = tensors[name]
        axis = _axis(a, filter_axis, name)
        keep = np.ones(a.shape[axis], bool)
        count = 0
        if a.size and f > 0 and a.any():
            means = _filter_means(a, axis)
            count = int(np.count_nonzero(means < f * means.mean()))  # = ⌊p·F⌋ exactly
            keep[np.argsort(means, kind="stable")[:count]] = False
        shape = [1] * a.ndim
        shape[axis] = a.shape[axis]
        m = np.broadcast_to(keep.reshape(shape), a.shape).copy()
        masks[name] = m
        zeroed[name] = count
        out[name] = _apply(a, m) if count else a.copy()
    return _result(out, masks, sum(tensors[n].size for n in names), filters_zeroed=zeroed)


def stats(update: Mapping[str, np.ndarray], *, sparsity: float | None = None, density: float | None = None,
          step: float | Mapping[str, float] | None = None, struct_factor: float = DEFAULT_STRUCT_FACTOR,
          filter_axis: int = -1, exempt: Exempt = DEFAULT_EXEMPT, min_ndim: int = 2,
          max_iterations: int = STATS_MAX_ITERATIONS) -> tuple[dict[str, np.ndarray], SparsifyResult]:
    """NNCodec 2's sparsification of an update (nncodec.fl's encode, methods_spec §3.10): the
    statistics-based threshold (stats_threshold) to the target sparsity, then, when
    struct_factor > 0, the filter-wise structured pass (structured) on its result. The masks
    are the positions both passes kept."""
    out, first = stats_threshold(update, sparsity=sparsity, density=density, step=step, exempt=exempt,
                                 min_ndim=min_ndim, max_iterations=max_iterations)
    if isinstance(struct_factor, (bool, np.bool_)) or not isinstance(struct_factor, numbers.Real) \
            or not math.isfinite(float(struct_factor)) or struct_factor < 0:
        raise InputError(f"struct_factor must be a non-negative number, got {struct_factor!r}")
    if struct_factor == 0:
        return out, first
    out2, second = structured(out, factor=struct_factor, filter_axis=filter_axis, exempt=exempt, min_ndim=min_ndim)
    masks = {n: first.masks[n] & second.masks[n] for n in first.masks}
    return _result(out2, masks, first.eligible, thresholds=first.thresholds, delta=first.delta,
                   iterations=first.iterations, filters_zeroed=second.filters_zeroed)


# --- one entry point ----------------------------------------------------------------------------

def sparsify(update: Mapping[str, np.ndarray], method: str = "topk", *, density: float | None = None,
             sparsity: float | None = None, step: float | Mapping[str, float] | None = None,
             seed: int | np.random.Generator | None = None, exempt: Exempt = DEFAULT_EXEMPT, filter_axis: int = -1,
             struct_factor: float = DEFAULT_STRUCT_FACTOR, min_ndim: int = 2) -> tuple[dict[str, np.ndarray], SparsifyResult]:
    """Sparsify a differential update by `method` (METHODS: "topk", "global_topk", "stats",
    "random"), keeping `density` or zeroing `sparsity` (exactly one; for "stats" the target
    fraction of zeros over all values). `step` (Δ) is needed by "stats" only, `seed` by
    "random" only, `filter_axis` and `struct_factor` concern "stats"' structured pass. Returns
    (the sparse update, a SparsifyResult with the masks and what was done)."""
    if method == "topk":
        return topk(update, density=density, sparsity=sparsity, exempt=exempt, min_ndim=min_ndim)
    if method == "global_topk":
        return global_topk(update, density=density, sparsity=sparsity, exempt=exempt, min_ndim=min_ndim)
    if method == "random":
        return random_k(update, density=density, sparsity=sparsity, seed=seed, exempt=exempt, min_ndim=min_ndim)
    if method == "stats":
        return stats(update, sparsity=sparsity, density=density, step=step, struct_factor=struct_factor,
                     filter_axis=filter_axis, exempt=exempt, min_ndim=min_ndim)
    raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


__all__ = ["DEFAULT_EXEMPT", "METHODS", "SparsifyResult", "global_topk", "keep_count", "random_k", "sparsify", "stats",
           "stats_threshold", "structured", "topk"]
