"""Rate-distortion quantization in JAX (docs/design.md §4; docs/engine.md §2.2, §2.8, §3.2, §3.4, §3.5).

Per weight i of a slice (x_i = w_i / Δ, the weight in step units) the quantizer minimises

    F_i · (x_i − r_i)²  +  lam · R(r_i)          (in Δ² units; lam is "Δ² per bit")

where R is the cost in bits of the level's bins under the adaptive estimator's *current* context
states: BIT_COST of §2.8 for regular bins, one bit per bypass bin, and the states updated after
every decision with the exact integer update of the engine (§2.2). Every slice starts from the
tensor's signalled context initialisation, neighbour 0 and DQ state 0, as the coder does (docs/design.md §1).
In absolute units the objective is F·(w − rΔ)² + lam·Δ²·R; lam ≈ 0.12 is the high-rate slope
of a uniform quantizer (2 ln 2 · Δ²/12 per bit).

Both quantizers are one Viterbi search over the coder's state:

* URQ: one state; candidates round-half-away n, n − 1 (towards zero) and 0 — a greedy decision
  per weight (DeepCABAC/NNCodec RDOQ). With lam = 0 it returns rounding exactly (ties keep n).
* DQ: the trellis of §3.5 (NNC's 8 states, or one of gpucabac's larger ones, 16..256 states);
  from each state the two reconstruction indices of its quantizer around x and zero. Each survivor path carries its own copy of all context states and
  its own neighbour, as NNCodec does (without NNCodec's stale-neighbour quirk), so the rate of the
  surviving path is exactly the estimator's cost of the levels it chose.

`_lane` codes one slice at one (step, lam) as a `lax.scan` over positions; `rd_batch` vmaps it
over lam (L), steps (K) and slices (B) and is jitted once per shape: one function serves a single
setting (encode) and a whole sweep. Pure functions, frozen config, the same code on CPU and GPU.

On the CPU the same algorithm runs by default as a numba kernel (`quantization.rd_lanes`, one
thread per lane): it walks only the bins a candidate has instead of every context, prices the
two neighbouring candidates of a state in one walk, lets a survivor update its source's context
registers in place when it is their only continuation, and at lam = 0 finds the levels first and
prices the chosen path once. It reproduces `_lane` to the bit (levels, float32 bits and
distortions, including XLA's fused multiply-adds), checked in tests/test_rdquant.py; `kernel=`
chooses ("auto": numba where JAX's default backend is the CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .dtypes import is_float
from .errors import InputError
from .layout import GT, SIGN, num_contexts, used_contexts
from .modes import dq_states
from .tables import BIT_COST, CURVE, MAX_GT_FLAGS, PRESET_STATES, dq_next_table

ONE_BIT = 32768  # BIT_COST units (2^15) per bit
# |w/Δ| above this loses integer exactness in float32; the RD path refuses such steps.
MAX_RD_LEVEL = 1 << 22
MAX_LANE_BYTES = 4 << 30  # trace-back memory of one slice at one setting; beyond it a clear error


@dataclasses.dataclass(frozen=True)
class RDConfig:
    """Static settings of one compiled quantizer (hashable: a jit static argument)."""

    dq: int = 0  # trellis size (binarize.dq_states), 0 for URQ
    num_gt_flags: int = 11
    with_levels: bool = True  # False: rates and distortions only (sweeps), no backtracking

    def __post_init__(self):
        object.__setattr__(self, "dq", dq_states(self.dq))
        if not 0 <= self.num_gt_flags <= MAX_GT_FLAGS:
            raise InputError(f"num_gt_flags must be in 0..{MAX_GT_FLAGS}, got {self.num_gt_flags}")

    @property
    def num_states(self) -> int:
        return self.dq or 1


def _predecessors(dq: int) -> np.ndarray:
    """[states, 2] the two states a trellis state is reached from, in increasing order."""
    table = dq_next_table(dq)
    pred = np.zeros((dq, 2), np.int32)
    count = np.zeros(dq, np.int32)
    for s in range(dq):
        for d in table[s]:
            pred[d, count[d]] = s
            count[d] += 1
    assert (count == 2).all() and (pred[:, 0] < pred[:, 1]).all(), "a trellis state needs two distinct predecessors"
    return pred


def _jax():
    import jax  # noqa: PLC0415  (jax loads only when RD quantization is used)

    return jax


# ---------------------------------------------------------------------------------------------
# The estimator and the binarization, as dense per-context operations (no scatter): every context
# receives at most one bin per level, so a level is a (mask, bit) pair over all C contexts.


def _layout(n: int):
    """Static per-context arrays of the context layout in binarize.py."""
    c = np.arange(num_contexts(n), dtype=np.int32)
    region = np.select([c < SIGN, c < GT, c < GT + 2 * n], [0, 1, 2], 3).astype(np.int32)
    gt_j = ((c - GT) // 2 + 1).astype(np.int32)
    gt_neg = ((c - GT) % 2).astype(np.int32)
    eg_j = (c - (GT + 2 * n)).astype(np.int32)
    return c, region, gt_j, gt_neg, eg_j


def _bins(k, nb, state, n: int):
    """Regular bins of coded level k (int32, any shape [...]) with neighbour class nb and DQ state:
    (mask [..., C] bool, bit [..., C] int32), plus the number of bypass bins [...] (§1.1)."""
    jnp = _jax().numpy
    lax = _jax().lax
    c, region, gt_j, gt_neg, eg_j = (jnp.asarray(a) for a in _layout(n))
    k = k[..., None]
    nb = nb[..., None]
    state = state[..., None]
    a = jnp.abs(k)
    nz = k != 0
    neg = (k < 0).astype(jnp.int32)
    big = a > n
    rem1 = jnp.maximum(a - n, 1)  # rem + 1 = a - N
    m = 31 - lax.clz(rem1)  # floor(log2(rem + 1)): the Exp-Golomb prefix length
    mask = (
        ((region == 0) & (c == 3 * (state & 7) + nb))
        | ((region == 1) & nz & (c - SIGN == nb))
        | ((region == 2) & nz & (gt_neg == neg) & (gt_j <= a))
        | ((region == 3) & big & (eg_j <= m))
    )
    bit = jnp.where(
        region == 0, nz, jnp.where(region == 1, neg == 1, jnp.where(region == 2, a > gt_j, eg_j < m))
    ).astype(jnp.int32)
    bypass = jnp.where(big, m, 0)[..., 0]
    return mask, bit, bypass


def _costs(s0, s1):
    """BIT_COST of a 0 and of a 1 for every context state (§2.8), int32 in 2^15 units."""
    jnp = _jax().numpy
    table = jnp.asarray(BIT_COST.ravel())
    bucket = 512 + ((s1 + 16 * s0) >> 3)
    return table[2 * bucket], table[2 * bucket + 1]


def _update(s0, s1, sh0, sh1, mask, bit):
    """The CPU engine's context update (engines/cpu.py `_update`) on every context where mask holds."""
    jnp = _jax().numpy
    curve = jnp.asarray(CURVE)
    sigma = 2 * bit - 1
    a0, a1 = s0.astype(jnp.int32), s1.astype(jnp.int32)  # stored narrow, computed in int32
    n0 = a0 + sigma * (curve[16 + ((sigma * a0) >> 3)] >> sh0)
    n1 = a1 + sigma * (curve[16 + ((sigma * a1) >> 7)] >> sh1)
    return jnp.where(mask, n0, a0).astype(s0.dtype), jnp.where(mask, n1, a1).astype(s1.dtype)


def _neighbour_class(k):
    jnp = _jax().numpy
    return jnp.where(k == 0, 0, jnp.where(k < 0, 1, 2)).astype(jnp.int32)


def _candidates(x, states, dq: bool):
    """Reconstruction indices r [ns, 3] (float32) and coded levels k [ns, 3] (int32) per state."""
    jnp = _jax().numpy
    if dq:
        qid = (states & 1)[:, None].astype(x.dtype)
        lo = jnp.where(qid == 0, 2 * jnp.floor(x / 2), 2 * jnp.floor((x - 1) / 2) + 1)
        r = jnp.concatenate([lo, lo + 2, jnp.zeros_like(lo)], axis=1)
        ri = r.astype(jnp.int32)
        qi = (states & 1)[:, None]
        k = jnp.where(ri == 0, 0, (ri + jnp.sign(ri) * qi) // 2)
        return r, k
    a = jnp.abs(x)
    fl = jnp.floor(a)
    n = fl + (a - fl >= 0.5).astype(x.dtype)  # round half away from zero, exact in float
    s = jnp.where(x < 0, -1.0, 1.0).astype(x.dtype)
    r = jnp.stack([s * n, s * jnp.maximum(n - 1, 0), jnp.zeros_like(n)])[None, :]
    return r, r.astype(jnp.int32)


def _lane(w, f, n_valid, scale, lam, s0, s1, sh0, sh1, *, cfg: RDConfig):
    """One slice at one (scale = 1/Δ, lam): (bits, weighted distortion, distortion[, levels]).

    w, f [S] float32; n_valid: positions < n_valid are real (the rest is padding);
    s0, s1, sh0, sh1 [C] int32: the slice's initial context states and shifts.
    Distortions are in Δ² units; bits are the estimator's (regular bins + bypass bins).
    """
    jax = _jax()
    jnp, lax = jax.numpy, jax.lax
    ns = cfg.num_states
    n = cfg.num_gt_flags
    states = jnp.arange(ns, dtype=jnp.int32)
    nxt = jnp.asarray(dq_next_table(cfg.dq) if cfg.dq else np.zeros((1, 2), np.int32))
    # each destination's branches: the 3 candidates of each of its two source states, in
    # (source, candidate) order, so that the first cheapest is the one numba's trellis keeps
    pred = _predecessors(cfg.dq) if cfg.dq else np.zeros((1, 2), np.int32)
    inflow = jnp.asarray((3 * np.repeat(pred, 3, axis=1) + np.tile(np.arange(3), 2)).astype(np.int32))  # [ns, 6]
    inf = jnp.float32(jnp.inf)
    lam = jnp.asarray(lam, jnp.float32)
    x_all = (w * scale).astype(jnp.float32)
    valid_all = jnp.arange(w.shape[0]) < n_valid

    # Context states ride in the carry as int16 (|S0| <= 120, |S1| <= 1923, and every intermediate of
    # the update and the cost index fits): half the state traffic of int32, measured 17% faster for
    # URQ sweeps on the CPU, the same for DQ, identical results.
    carry0 = dict(
        J=jnp.where(states == 0, 0.0, inf).astype(jnp.float32),
        s0=jnp.broadcast_to(s0.astype(jnp.int16), (ns, s0.shape[0])), s1=jnp.broadcast_to(s1.astype(jnp.int16), (ns, s1.shape[0])),
        nb=jnp.zeros(ns, jnp.int32), bits=jnp.zeros(ns, jnp.float32),
        wd=jnp.zeros(ns, jnp.float32), d=jnp.zeros(ns, jnp.float32),
    )

    def step(carry, inp):
        x, fi, valid = inp
        c0, c1 = _costs(carry["s0"], carry["s1"])  # [ns, C]
        r, k = _candidates(x, states, cfg.dq)  # [ns, 3]
        mask, bit, bypass = _bins(k, jnp.broadcast_to(carry["nb"][:, None], k.shape),
                                  jnp.broadcast_to(states[:, None], k.shape), n)  # [ns, 3, C]
        rate = jnp.sum(jnp.where(mask, jnp.where(bit == 1, c1[:, None], c0[:, None]), 0), -1) + ONE_BIT * bypass
        dist = jnp.square(x - r)
        rbits = rate.astype(jnp.float32) * jnp.float32(1.0 / ONE_BIT)
        branch = carry["J"][:, None] + fi * dist + lam * rbits  # [ns, 3]
        dest = nxt[jnp.broadcast_to(states[:, None], k.shape), k & 1]
        flat = branch.reshape(-1)
        # per destination the first cheapest of the branches that reach it (the URQ "trellis" has
        # one state: its three candidates appear twice, and the first copy wins)
        masked = jnp.where(dest.reshape(-1)[inflow] == states[:, None], flat[inflow], inf)  # [ns, 6]
        pick = inflow[states, jnp.argmin(masked, axis=1)]
        src = (pick // 3).astype(jnp.int32)
        kk = k.reshape(-1)[pick]
        rr = r.reshape(-1)[pick]
        J = jnp.min(masked, axis=1)  # inf where no live branch reaches the state
        nb_src = carry["nb"][src]
        m2, b2, _ = _bins(kk, nb_src, src, n)
        ns0, ns1 = _update(carry["s0"][src], carry["s1"][src], sh0, sh1, m2, b2)
        new = dict(
            J=J - jnp.min(J), s0=ns0, s1=ns1, nb=_neighbour_class(kk),
            bits=carry["bits"][src] + rbits.reshape(-1)[pick],
            wd=carry["wd"][src] + fi * dist.reshape(-1)[pick],
            d=carry["d"][src] + dist.reshape(-1)[pick],
        )
        out = {key: jnp.where(valid, new[key], carry[key]) for key in carry}
        ys = None
        if cfg.with_levels:
            ys = (jnp.where(valid, src, states), jnp.where(valid, rr.astype(jnp.int32), 0))
        return out, ys

    carry, ys = lax.scan(step, carry0, (x_all, f.astype(jnp.float32), valid_all))
    best = jnp.argmin(carry["J"]).astype(jnp.int32)
    result = (carry["bits"][best], carry["wd"][best], carry["d"][best])
    if not cfg.with_levels:
        return result

    def back(s, y):
        src, rr = y
        return src[s], rr[s]

    _, levels = lax.scan(back, best, ys, reverse=True)
    return result + (levels,)


def _rd_batch_impl(w, f, n_valid, scales, lams, s0, s1, sh0, sh1, cfg: RDConfig):
    """Vectorised over slices B, steps K and lambdas L.

    w, f [B, S]; n_valid [B]; scales [B, K] (1/Δ per slice and step: per-tensor steps may differ);
    lams [L]; s0, s1, sh0, sh1 [B, K, C]. Returns bits, wdist, dist [B, K, L] (and levels
    [B, K, L, S] int32 when cfg.with_levels).
    """
    jax = _jax()
    lane = functools.partial(_lane, cfg=cfg)
    over_l = jax.vmap(lane, in_axes=(None, None, None, None, 0, None, None, None, None))
    over_k = jax.vmap(over_l, in_axes=(None, None, None, 0, None, 0, 0, 0, 0))
    over_b = jax.vmap(over_k, in_axes=(0, 0, 0, 0, None, 0, 0, 0, 0))
    return over_b(w, f, n_valid, scales, lams, s0, s1, sh0, sh1)


@functools.lru_cache(maxsize=None)
def _rd_batch_jit():
    return _jax().jit(_rd_batch_impl, static_argnames=("cfg",))


KERNELS = ("auto", "jax", "numba")


def _kernel_of(kernel: str, jit: bool) -> str:
    """The kernel a call runs: "jax" (jitted, or eager with jit=False) or "numba" (the CPU
    kernel, quantization.rd_lanes). "auto" is numba where JAX's default backend is the CPU, so
    that a GPU keeps running the JAX quantizer, and JAX for eager (jit=False) calls."""
    if kernel not in KERNELS:
        raise InputError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "numba" if jit and _jax().default_backend() == "cpu" else "jax"
    return kernel


def _rd_batch_numba(w, f, n_valid, scales, lams, s0, s1, sh0, sh1, cfg: RDConfig):
    from .quantization import rd_lanes  # noqa: PLC0415  (numba, loaded with the quantizer)

    b, k = np.shape(scales)
    nxt = dq_next_table(cfg.dq).astype(np.int32) if cfg.dq else np.zeros((1, 2), np.int32)
    pred = _predecessors(cfg.dq) if cfg.dq else np.zeros((1, 2), np.int32)
    lams = np.ascontiguousarray(lams, np.float32)
    levels = np.zeros((b, k, lams.size, np.shape(w)[1] if cfg.with_levels else 0), np.int32)
    c32 = [np.ascontiguousarray(a, np.int32) for a in (s0, s1, sh0, sh1)]
    out = rd_lanes(np.ascontiguousarray(w, np.float32), np.ascontiguousarray(f, np.float32),
                   np.ascontiguousarray(n_valid, np.int64), np.ascontiguousarray(scales, np.float32), lams,
                   *c32, cfg.num_gt_flags, nxt, pred, cfg.dq, levels)
    return (out[0], out[1], out[2]) + ((levels,) if cfg.with_levels else ())


def rd_batch(w, f, n_valid, scales, lams, s0, s1, sh0, sh1, cfg: RDConfig, *, jit: bool = True,
             kernel: str = "jax"):
    """The vectorised quantizer (see `_rd_batch_impl`); `jit=False` runs it eagerly. `kernel`:
    "jax" (this module's), "numba" (the same algorithm, compiled for the CPU: the same levels,
    bits and distortions), or "auto" (see `_kernel_of`)."""
    if _kernel_of(kernel, jit) == "numba":
        return _rd_batch_numba(w, f, n_valid, scales, lams, s0, s1, sh0, sh1, cfg)
    if jit:
        return _rd_batch_jit()(w, f, n_valid, scales, lams, s0, s1, sh0, sh1, cfg=cfg)
    with _jax().disable_jit():
        return _rd_batch_impl(w, f, n_valid, scales, lams, s0, s1, sh0, sh1, cfg)


# ---------------------------------------------------------------------------------------------
# Host side: slicing, context initialisation, chunking.


def _flat_float32(x) -> np.ndarray:
    w = np.ascontiguousarray(x).reshape(-1)
    if not is_float(w):
        raise InputError(f"RD quantization needs a floating-point tensor, got {w.dtype}")
    return w.astype(np.float32, copy=False)


def scale_of(step: float) -> np.float32:
    """1/Δ in float32, computed as quantization.quantize_levels does for float32 tensors."""
    return np.float32(1.0 / np.float32(np.float32(step)))


def context_arrays(ctx_init: np.ndarray, num_gt_flags: int, dq: bool):
    """(s0, s1, sh0, sh1) [C] int32 of a tensor's signalled init (preset per used context)."""
    c = num_contexts(num_gt_flags)
    pre = np.zeros(c, np.int64)
    pre[used_contexts(num_gt_flags, dq)] = np.asarray(ctx_init, np.int64)
    s0, s1, sh0, sh1 = PRESET_STATES[pre].T
    return tuple(a.astype(np.int32) for a in (s0, s1, sh0, sh1))


def initial_context(x: np.ndarray, step: float, *, dq: bool, slice_size: int, num_gt_flags: int) -> np.ndarray:
    """The tensor's context init chosen from its plain levels (rounding, or the distortion-only
    trellis), the way the encoder would choose it for them."""
    from .context_init import choose_context_init  # noqa: PLC0415  (the encoder's one definition)
    from .quantization import quantize_levels  # noqa: PLC0415

    levels = quantize_levels(x, step, dq=dq, slice_size=slice_size)
    return choose_context_init(levels, slice_size, dq, num_gt_flags)


def _check_range(w: np.ndarray, scales: np.ndarray) -> None:
    if not np.all(np.isfinite(w)):
        raise InputError("tensor has NaN or infinite values; they cannot be quantized")
    peak = float(np.max(np.abs(w))) * float(np.max(scales)) if w.size else 0.0
    if peak > MAX_RD_LEVEL:
        raise InputError(f"step too small for RD quantization: |w|/step reaches {peak:.3g} (limit {MAX_RD_LEVEL})")


def _pad_rows(b: int) -> int:
    """A batch of b slices rounded up to one of four sizes per octave (b itself up to 8): at most
    25% padding, and few enough distinct sizes that compilations stay bounded."""
    grain = 1 << max(0, (b - 1).bit_length() - 3)
    return -(-b // grain) * grain


@dataclasses.dataclass(frozen=True)
class RDResult:
    """Estimates per (step k, lam l) for one tensor; levels [K, L, numel] when requested."""

    bits: np.ndarray  # estimated bits (float64) [K, L]
    wdist: np.ndarray  # Σ F·(w − w')² in weight units² [K, L]
    dist: np.ndarray  # Σ (w − w')² [K, L]
    levels: np.ndarray | None
    ctx_init: np.ndarray  # [K, used contexts] the init each step started from


def rd_quantize_tensor(x, steps: Sequence[float], lams: Sequence[float], *, dq: bool = False,
                       slice_size: int = 8192, num_gt_flags: int = 11, importance=None,
                       ctx_init: np.ndarray | None = None, with_levels: bool = True,
                       max_lanes: int = 2048, level_bytes: int = 256 << 20, jit: bool = True,
                       kernel: str = "auto") -> RDResult:
    """RD-quantize one tensor at every (step, lam) of the grid in one vectorised computation
    (chunked over slices to bound memory). `importance` F has the tensor's shape (default 1).
    `ctx_init` [K, used] or [used] overrides the per-step init chosen from the plain levels."""
    return rd_quantize_tensors({"": x}, steps, lams, dq=dq, slice_size=slice_size, num_gt_flags=num_gt_flags,
                               importance=None if importance is None else {"": importance},
                               ctx_init=None if ctx_init is None else {"": ctx_init}, with_levels=with_levels,
                               max_lanes=max_lanes, level_bytes=level_bytes, jit=jit, kernel=kernel)[""]


def rd_quantize_tensors(tensors: Mapping, steps: Sequence[float] | Mapping, lams: Sequence[float], *,
                        dq: bool = False, slice_size: int = 8192, num_gt_flags: int = 11,
                        importance: Mapping | None = None, ctx_init: Mapping | None = None,
                        with_levels: bool = True, max_lanes: int = 2048, level_bytes: int = 256 << 20,
                        jit: bool = True, progress: Callable[[int], None] | None = None,
                        kernel: str = "auto") -> dict[str, RDResult]:
    """rd_quantize_tensor for several tensors at once: the slices of all of them form one stream,
    cut into equal batches of lanes (slices × steps × lambdas), so that small tensors share a
    batch instead of each padding its own (and one batch shape is compiled). `steps` is one grid
    for every tensor or a mapping name -> grid (all of the same length K); `importance` and
    `ctx_init` map names to what rd_quantize_tensor takes. A slice never spans two tensors, and
    every lane runs as it would alone: the results are those of one call per tensor. `progress`
    is called after every batch with the weight-settings it finished (weights × steps × lambdas).
    `kernel` is "auto", "jax" or "numba" (see `rd_batch`; all give the same results)."""
    names = list(tensors)
    lams = np.atleast_1d(np.asarray(lams, np.float32))
    if np.any(~np.isfinite(lams)) or np.any(lams < 0):
        raise InputError(f"lambdas must be finite and >= 0, got {lams}")
    kernel = _kernel_of(kernel, jit)
    if not names:
        return {}
    try:
        cfg = RDConfig(dq, int(num_gt_flags), bool(with_levels))
    except ValueError as e:
        raise InputError(str(e)) from None
    n_used = len(used_contexts(cfg.num_gt_flags, cfg.dq))
    flat = {n: _flat_float32(tensors[n]) for n in names}
    S = max(1, min(int(slice_size), max(max(w.size for w in flat.values()), 1)))
    # the backtracking keeps (source state, index) per weight, state and lane
    lane_bytes = S * 4 * (2 * cfg.num_states + 1)
    if with_levels and lane_bytes > MAX_LANE_BYTES:
        raise InputError(f"a {cfg.num_states}-state trellis over slices of {S} weights needs {lane_bytes / 2**30:.1f} GiB "
                         f"per setting to trace back; use a smaller slice size")
    grids, scales, inits, ctx, weights = {}, [], {}, [], []
    for name in names:
        # keys are tensor names, or (name, scan order) pairs from the codec
        what = f"tensor {name if isinstance(name, str) else name[0]!r}"
        w = flat[name]
        grid = np.atleast_1d(np.asarray(steps[name] if isinstance(steps, Mapping) else steps, np.float64))
        if np.any(~np.isfinite(grid)) or np.any(grid <= 0):
            raise InputError(f"{what}: steps must be positive and finite, got {grid}")
        if grids and grid.size != next(iter(grids.values())).size:
            raise InputError("every tensor needs the same number of steps")
        grids[name] = grid
        sc = np.array([scale_of(s) for s in grid], np.float32)
        try:
            _check_range(w, sc)
        except InputError as e:
            raise InputError(f"{what}: {e}") from None
        f = as_importance(importance, name)
        if f is not None:
            f = _flat_float32(f)
            if f.size != w.size or np.any(~np.isfinite(f)) or np.any(f < 0):
                raise InputError(f"{what}: importance must have the tensor's size, finite and >= 0")
        weights.append(f)
        given = None if ctx_init is None else ctx_init.get(name)
        if given is None:
            init = np.stack([initial_context(w, s, dq=cfg.dq, slice_size=min(S, max(w.size, 1)),
                                             num_gt_flags=cfg.num_gt_flags) for s in grid])
        else:
            init = np.broadcast_to(np.asarray(given, np.uint8), (grid.size, n_used))
        inits[name] = np.asarray(init)
        scales.append(sc)
        ctx.append([np.stack(c) for c in zip(*(context_arrays(i, cfg.num_gt_flags, cfg.dq) for i in init))])
    # Per tensor, not per slice: a batch gathers its slices' rows, steps and contexts when it runs,
    # so memory stays one batch beyond the tensors themselves.
    scales = np.stack(scales)  # [T, K]
    ctx = [np.stack([c[i] for c in ctx]) for i in range(4)]  # 4 x [T, K, C]
    counts = [max(1, -(-w.size // S)) for w in flat.values()]
    firsts = np.concatenate([[0], np.cumsum(counts)])  # tensor t owns rows firsts[t]:firsts[t + 1]
    owner = np.repeat(np.arange(len(names)), counts)
    nrows, k, l_ = int(firsts[-1]), next(iter(grids.values())).size, lams.size

    def spans(start, stop):  # (tensor, first, last) row ranges of the stream's rows start..stop
        for t in range(int(np.searchsorted(firsts, start, "right")) - 1, len(names)):
            a, b = max(start, firsts[t]), min(stop, firsts[t + 1])
            if a >= b:
                return
            yield t, int(a - firsts[t]), int(b - firsts[t])

    def batch_of(start, stop, size):  # weights, importance, valid counts, owners of rows start..stop
        w_rows = np.zeros((size, S), np.float32)
        f_rows = np.ones((size, S), np.float32)
        valid = np.zeros(size, np.int32)
        at = 0
        for t, i0, i1 in spans(start, stop):
            w, f = flat[names[t]], weights[t]
            seg = slice(i0 * S, min(i1 * S, w.size))
            w_rows[at : at + i1 - i0].reshape(-1)[: seg.stop - seg.start] = w[seg]
            if f is not None:
                f_rows[at : at + i1 - i0].reshape(-1)[: seg.stop - seg.start] = f[seg]
            valid[at : at + i1 - i0] = np.clip(w.size - S * np.arange(i0, i1), 0, S)
            at += i1 - i0
        w_rows[at:], f_rows[at:] = w_rows[0], f_rows[0]  # padding rows: copies of the first, scanning nothing
        who = np.full(size, owner[start])
        who[:at] = owner[start:stop]
        return w_rows, f_rows, valid, who

    per_slice = k * l_
    chunk = max(1, min(nrows, max_lanes // per_slice))
    if with_levels:
        chunk = max(1, min(chunk, level_bytes // max(1, per_slice * lane_bytes)))
    out_rows = [np.zeros((nrows, k, l_)) for _ in range(3)]  # bits, weighted distortion, distortion
    levels = {n: np.zeros((k, l_, c * S), np.int32) for n, c in zip(names, counts)} if with_levels else None
    for start in range(0, nrows, chunk):
        stop = min(nrows, start + chunk)
        # full batches of a long stream share one shape; a lone or last batch is rounded up (_pad_rows)
        batch = chunk if stop - start == chunk and nrows > chunk else _pad_rows(stop - start)
        rw, rf, rv, who = batch_of(start, stop, batch)
        out = rd_batch(rw, rf, rv, scales[who], lams, *(c[who] for c in ctx), cfg, jit=jit, kernel=kernel)
        for acc, o in zip(out_rows, out[:3]):
            acc[start:stop] = np.asarray(o, np.float64)[: stop - start]
        if progress is not None:
            progress(int(rv[: stop - start].sum()) * per_slice)
        if with_levels:
            lv = np.asarray(out[3])  # [batch, K, L, S]
            at = 0
            for t, i0, i1 in spans(start, stop):
                block = lv[at : at + i1 - i0].transpose(1, 2, 0, 3).reshape(k, l_, -1)
                levels[names[t]][:, :, i0 * S : i1 * S] = block
                at += i1 - i0
    results = {}
    for t, name in enumerate(names):
        part = slice(firsts[t], firsts[t + 1])
        step2 = np.square(np.float32(grids[name]).astype(np.float64))[:, None]
        bits, wd, d = (a[part].sum(0) for a in out_rows)
        lv = None if levels is None else levels[name][:, :, : flat[name].size]
        results[name] = RDResult(bits, wd * step2, d * step2, lv, inits[name])
    return results


def rd_levels(x, step: float, lam: float, *, dq: bool = False, slice_size: int = 8192,
              num_gt_flags: int = 11, importance=None, iterations: int = 1) -> np.ndarray:
    """Integer levels (reconstruction indices, flat, scan order) of one tensor at (step, lam):
    greedy RDOQ (URQ) or the rate-aware trellis (DQ, `dq` states; True: 8). The context init starts from the
    plain levels' choice; each further iteration re-chooses it from the RD levels and requantizes."""
    res = rd_quantize_tensor(x, [step], [lam], dq=dq, slice_size=slice_size, num_gt_flags=num_gt_flags,
                             importance=importance)
    for _ in range(max(0, int(iterations) - 1)):
        from .context_init import choose_context_init  # noqa: PLC0415

        S = max(1, min(int(slice_size), max(np.size(x), 1)))
        init = choose_context_init(res.levels[0, 0], S, dq, num_gt_flags)
        res = rd_quantize_tensor(x, [step], [lam], dq=dq, slice_size=slice_size, num_gt_flags=num_gt_flags,
                                 importance=importance, ctx_init=init)
    return res.levels[0, 0]


# ---------------------------------------------------------------------------------------------
# Importance weights


def fisher_diagonal(loss_fn: Callable, params, batch, *, normalize: bool = False):
    """Diagonal (empirical) Fisher estimate of a JAX model: the mean over the batch's examples of
    the squared per-example gradient of `loss_fn(params, example)`. `batch` is a pytree whose
    leaves have the examples along axis 0. Returns a pytree shaped like `params`; `normalize`
    scales each leaf to mean 1 (so that lam keeps its meaning per tensor)."""
    jax = _jax()
    jnp = jax.numpy
    grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)
    fisher = jax.tree_util.tree_map(lambda g: jnp.mean(jnp.square(g), axis=0), grads)
    if normalize:
        fisher = jax.tree_util.tree_map(lambda a: a / jnp.maximum(jnp.mean(a), jnp.finfo(a.dtype).tiny), fisher)
    return fisher


def output_sensitivity(apply_fn: Callable, params, batch, *, probes: int = 16, chunk: int = 4, seed: int = 0):
    """Diagonal Gauss-Newton sensitivity of a JAX model's outputs to each parameter:
    F = diag(J^T J) summed over the batch's outputs, so that sum F * dparams^2 estimates
    |apply_fn(params + dparams, batch) - apply_fn(params, batch)|^2 for small changes: the
    importance to give the quantizer when the outputs (not a loss) should stay put. Estimated
    with `probes` Rademacher vectors v (E[(J^T v)^2] = diag(J^T J)) through `fisher_diagonal`,
    `chunk` probes per vectorised backward pass. Returns a pytree shaped like `params` (float32)."""
    jax = _jax()
    jnp = jax.numpy
    if probes < 1 or chunk < 1:
        raise InputError(f"probes and chunk must be >= 1, got {probes} and {chunk}")
    shape = jax.eval_shape(apply_fn, params, batch)

    def probe_loss(p, v):
        return jnp.sum(apply_fn(p, batch) * v)

    rng = np.random.default_rng(seed)
    total = None
    for start in range(0, probes, chunk):
        n = min(chunk, probes - start)
        v = rng.choice(np.array([-1.0, 1.0], np.float32), size=(n, *shape.shape))
        part = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64) * n, fisher_diagonal(probe_loss, params, jnp.asarray(v)))
        total = part if total is None else jax.tree_util.tree_map(np.add, total, part)
    return jax.tree_util.tree_map(lambda a: (a / probes).astype(np.float32), total)


def smooth_importance(fisher, *, floor: float = 0.25, min_rows_seen: float = 0.5):
    """A per-weight importance array for the RD quantizer from a noisy diagonal-Fisher estimate of
    one tensor, or None (uniform) where it carries no usable shape.

    A 2-D estimate is replaced by the outer product of its row and column means (the shape the
    Fisher of a linear layer has when its input and output-gradient statistics are independent),
    which averages the probe noise away; the result is scaled to mean 1 and floored at `floor` so
    that no weight is treated as free. Tensors whose estimate is all zero, or that have fewer than
    `min_rows_seen` of their rows touched (an embedding table sees only the calibration's tokens,
    and that set does not carry over to other inputs), get None."""
    f = np.asarray(fisher, np.float64)
    if not np.isfinite(f).all() or (f < 0).any():
        raise InputError("importance estimate must be finite and non-negative")
    mean = f.mean() if f.size else 0.0
    if mean <= 0:
        return None
    if f.ndim == 2:
        if np.count_nonzero(f.sum(axis=1)) < min_rows_seen * f.shape[0]:
            return None
        f = np.outer(f.mean(axis=1), f.mean(axis=0)) / mean
    return np.maximum(f / f.mean(), floor).astype(np.float32)


def importance_shapes(importance: Mapping, *, floor: float = 0.25) -> dict:
    """smooth_importance of every array of a name -> estimate mapping, leaving out those without a
    usable shape (they stay uniform): the per-weight importance to give the quantizer."""
    return {k: f for k, a in importance.items() if (f := smooth_importance(a, floor=floor)) is not None}


def _importance_means(importance: Mapping) -> tuple[dict[str, float], float | None]:
    """Mean importance F_t of every array of two or more dimensions, and log F_ref: the
    numel-weighted mean of log F_t over the positive ones (None when none is positive)."""
    means, sizes = {}, {}
    for name, a in importance.items():
        a = np.asarray(a)
        if a.ndim < 2:
            continue
        if a.size and (not np.isfinite(a).all() or (a < 0).any()):
            raise InputError(f"importance of {name!r} must be finite and non-negative")
        means[name] = float(a.mean(dtype=np.float64)) if a.size else 0.0
        sizes[name] = a.size
    positive = [n for n in means if means[n] > 0]
    if not positive:
        return means, None
    return means, sum(sizes[n] * math.log(means[n]) for n in positive) / sum(sizes[n] for n in positive)


def _check_max_ratio(max_ratio: float) -> None:
    if not max_ratio >= 1:
        raise InputError(f"max_ratio must be >= 1, got {max_ratio}")


def steps_from_importance(importance: Mapping, step: float, *, max_ratio: float = 16.0) -> dict[str, float]:
    """Per-tensor steps that spend bits where the importance is: step_t = step * (F_t / F_ref)^(-1/2)
    for every importance array of two or more dimensions, F_t its mean. This equalises the
    importance-weighted distortion per weight at high rate, where it is the optimal split for a
    weighted-MSE objective. F_ref is the numel-weighted geometric mean of the positive F_t, so
    that the average log-step (and so, roughly, the rate) stays that of `step`. Ratios are
    clamped to [1/max_ratio, max_ratio]; a tensor with zero importance gets step * max_ratio."""
    if not (math.isfinite(step) and step > 0):
        raise InputError(f"step must be a positive number, got {step}")
    _check_max_ratio(max_ratio)
    means, log_ref = _importance_means(importance)
    if log_ref is None:
        return {n: float(np.float32(step * max_ratio)) for n in means}
    out = {}
    for name, f in means.items():
        ratio = max_ratio if f <= 0 else min(max_ratio, max(1.0 / max_ratio, math.exp(-0.5 * (math.log(f) - log_ref))))
        out[name] = float(np.float32(step * ratio))
    return out


def importance_scales(importance: Mapping, *, max_ratio: float = 16.0) -> dict[str, float]:
    """How much each tensor's error counts against the others': F_t / F_ref (F_t the mean of its
    importance array, F_ref as in steps_from_importance) for every array of two or more
    dimensions, clamped to [1/max_ratio², max_ratio²] (a tensor with zero importance gets the
    smallest). The same clamp as steps_from_importance: that rule's step is step * scale^(-1/2).
    A sweep multiplies each tensor's weighted error by its scale (`sweep(tensor_weights=)`), so
    that the per-tensor choice of an operating point spends bits where the importance is."""
    _check_max_ratio(max_ratio)
    means, log_ref = _importance_means(importance)
    lo, hi = max_ratio ** -2, max_ratio ** 2
    if log_ref is None:
        return {n: lo for n in means}
    return {n: lo if f <= 0 else min(hi, max(lo, math.exp(math.log(f) - log_ref))) for n, f in means.items()}


def as_importance(importance: Mapping | None, name: str):
    """The importance array of one tensor from a name -> array mapping (None: uniform)."""
    if importance is None:
        return None
    a = importance.get(name)
    return None if a is None else np.asarray(a)
