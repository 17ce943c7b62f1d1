"""The dtypes gpucabac codes (gpucabac.dtypes): names, "is float", and the float conversion rule of
decode(..., dtype=...) that both engines follow."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import gpucabac
from gpucabac import dtypes
from gpucabac.errors import InputError

BF16 = np.dtype(ml_dtypes.bfloat16)


def test_names_and_float_kinds():
    assert dtypes.dtype_name(np.zeros(2, BF16)) == "bfloat16"
    assert dtypes.dtype_name(np.float16) == "float16" and dtypes.dtype_name("uint64") == "uint64"
    assert [d for d in dtypes.DTYPES if dtypes.is_float(d)] == list(dtypes.FLOAT_DTYPES)
    assert dtypes.is_float(BF16) and dtypes.is_float(np.zeros(1, np.float64)) and not dtypes.is_float(np.int8)
    assert not dtypes.is_float(np.float128 if hasattr(np, "float128") else np.complex64)
    for name in dtypes.DTYPES:
        assert dtypes.dtype_name(dtypes.numpy_dtype(name)) == name
        assert dtypes.numpy_dtype(name).itemsize == dtypes.ITEMSIZE[name]
    with pytest.raises(InputError, match="unsupported dtype complex64"):
        dtypes.dtype_name(np.complex64)


def test_float64_to_bfloat16_rounds_through_float32():
    # 1 + 2^-8 + 2^-30: just above the bfloat16 tie at 1 + 2^-8, so a direct rounding goes up to
    # 1 + 2^-7; float32 drops the 2^-30 first, lands on the tie, and ties-to-even gives 1.0.
    x = np.array([1 + 2.0**-8 + 2.0**-30, -(1 + 2.0**-8 + 2.0**-30), 3.0, np.inf], np.float64)
    got = dtypes.cast_float(x, "bfloat16")
    assert got.dtype == BF16
    assert got.astype(np.float64).tolist() == [1.0, -1.0, 3.0, np.inf]
    assert np.array_equal(got.view(np.uint16), x.astype(np.float32).astype(BF16).view(np.uint16))
    # every other conversion is NumPy's one rounding
    assert dtypes.cast_float(x, "float16").tobytes() == x.astype(np.float16).tobytes()
    assert dtypes.cast_float(x.astype(np.float32), "bfloat16").tobytes() == x.astype(np.float32).astype(BF16).tobytes()
    same = np.ones(3, np.float32)
    assert dtypes.cast_float(same, "float32") is same


def test_decode_float64_tensor_as_bfloat16_follows_the_rule():
    # Levels L = 2^29 + 2^21 + d at step 2^-29 reconstruct to 1 + 2^-8 + d·2^-29 in float64: the
    # bfloat16 tie plus a bit that float32 drops, so the rule and a direct rounding differ.
    step = 2.0**-29
    levels = np.array([[2**29 + 2**21 + 1, -(2**29 + 2**21 + 1), 2**29 + 2**21 + 3, 5]], np.int64)
    w = {"w": levels.astype(np.float64) * step}
    data = gpucabac.encode(w, step=step, slice_size=None)
    full = gpucabac.decode(data)["w"]
    assert np.array_equal(full, w["w"])
    got = gpucabac.decode(data, dtype="bfloat16")["w"]
    assert got.tobytes() == full.astype(np.float32).astype(BF16).tobytes()
    assert got.astype(np.float64)[0, :3].tolist() == [1.0, -1.0, 1.0]
