"""The tensor dtypes gpucabac codes, defined once: their names, item sizes, which are floats, and
how a decoded float value is converted to another float dtype (the same rule on every engine).

bfloat16 is NumPy's through ml_dtypes, imported only when a bfloat16 dtype is asked for: its
extension takes most of `import gpucabac`'s time otherwise (0.4-1.3 s), and an array that has the
dtype already brought it in. A name here is the format's name of the dtype; its code in a
container is its index in DTYPES (docs/format.md §3).
"""

from __future__ import annotations

import functools

import numpy as np

from .errors import InputError

# dtype name -> item size in bytes, in the order of the format's dtype codes (0, 1, 2, ...).
ITEMSIZE = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "int16": 2, "int32": 4,
    "int64": 8, "uint8": 1, "bool": 1, "uint16": 2, "uint32": 4, "uint64": 8,
}
DTYPES = tuple(ITEMSIZE)
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


@functools.cache
def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 as a NumPy dtype."""
    import ml_dtypes  # noqa: PLC0415  (see the module docstring)

    return np.dtype(ml_dtypes.bfloat16)


def _as_dtype(dtype) -> np.dtype:
    """The dtype of an array, or a dtype given as a NumPy dtype or scalar type; InputError for
    anything NumPy does not read as a dtype."""
    if isinstance(dtype, np.ndarray):
        return dtype.dtype
    try:
        return np.dtype(dtype)
    except (TypeError, ValueError) as e:
        raise InputError(f"not a dtype: {dtype!r}") from e


def dtype_name(dtype) -> str:
    """The format's name of a NumPy dtype (or of an array's dtype, or of a name); InputError if
    gpucabac cannot code it."""
    if isinstance(dtype, str):
        name = dtype
    else:
        dt = _as_dtype(dtype)
        name = dt.name  # ml_dtypes' bfloat16 is named "bfloat16"
    if name not in ITEMSIZE:
        raise InputError(f"unsupported dtype {name}; supported: {', '.join(DTYPES)}")
    return name


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of a dtype name of the format (bfloat16 from ml_dtypes)."""
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def is_float(dtype) -> bool:
    """Whether a dtype (a NumPy dtype, an array or a name) is one of the float dtypes gpucabac
    quantizes: float32, float16, bfloat16, float64. Integers and bools are coded losslessly."""
    if isinstance(dtype, str):
        return dtype in FLOAT_DTYPES
    dt = _as_dtype(dtype)
    return dt.name in FLOAT_DTYPES and (dt.kind == "f" or dt == bfloat16())


def cast_float(x: np.ndarray, name: str) -> np.ndarray:
    """x (a float array) in the float dtype `name`, by the rule both decoders follow for
    `decode(..., dtype=...)`: one IEEE round-to-nearest-even conversion, except float64 ->
    bfloat16, which rounds through float32 (as kernels/dequant.cuh does). ml_dtypes' own
    float64 -> bfloat16 `astype` changed from that to a direct rounding in 0.7; the rule here
    does not depend on the installed version."""
    target = numpy_dtype(name)
    if x.dtype == target:
        return x
    if name == "bfloat16" and x.dtype == np.float64:
        return x.astype(np.float32).astype(target)
    return x.astype(target)
