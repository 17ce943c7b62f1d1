"""gpucabac: slice-parallel DeepCABAC compression of neural-network weights.

    >>> import numpy as np, gpucabac
    >>> w = {"fc.weight": np.linspace(-0.1, 0.1, 600, dtype=np.float32).reshape(20, 30)}
    >>> data = gpucabac.encode(w, qp=-32)
    >>> out = gpucabac.decode(data)
    >>> bool(np.array_equal(out["fc.weight"], gpucabac.quantize(w, qp=-32)["fc.weight"]))
    True

The public names load with the module that defines them, on first use (PEP 562): `import
gpucabac` and `gpucabac info` pay for numpy alone, not for numba's compiler or ml_dtypes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    FormatError as FormatError,
    GpucabacError as GpucabacError,
    GpuUnavailableError as GpuUnavailableError,
    InputError as InputError,
    ModelFileError as ModelFileError,
    SweepTaskError as SweepTaskError,
    TensorNotFoundError as TensorNotFoundError,
)

__version__ = "0.1.0"

# public name -> the module that defines it
_SOURCES = {
    **dict.fromkeys(("DEFAULT_GT_FLAGS", "DEFAULT_QP", "DEFAULT_SLICE_SIZE", "CodingSettings"), "settings"),
    **dict.fromkeys(("ContainerInfo", "TensorInfo", "info"), "summary"),
    **dict.fromkeys(("decode", "encode", "load", "quantize"), "codec"),
    "available_engines": "engines",
    **dict.fromkeys(("dq_mode", "step_from_qp"), "modes"),
    "quantize_levels": "quantization",
    "DQ_STATE_COUNTS": "tables",
    **dict.fromkeys(("fisher_diagonal", "importance_scales", "importance_shapes", "output_sensitivity", "rd_levels",
                     "smooth_importance", "steps_from_importance"), "rdquant"),
    **dict.fromkeys(("LocalExecutor", "OperatingPoint", "SweepResult", "SweepTask", "choose_operating_point",
                     "evaluate_task", "point_from_sweep", "sweep", "sweep_models"), "sweeps"),
    "RayExecutor": "ray_sweeps",  # ray itself loads when a run starts
}


def __getattr__(name: str):
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'gpucabac' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{source}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .codec import decode as decode, encode as encode, load as load, quantize as quantize
    from .engines import available_engines as available_engines
    from .modes import dq_mode as dq_mode, step_from_qp as step_from_qp
    from .quantization import quantize_levels as quantize_levels
    from .rdquant import (
        fisher_diagonal as fisher_diagonal,
        importance_scales as importance_scales,
        importance_shapes as importance_shapes,
        output_sensitivity as output_sensitivity,
        rd_levels as rd_levels,
        smooth_importance as smooth_importance,
        steps_from_importance as steps_from_importance,
    )
    from .settings import (
        DEFAULT_GT_FLAGS as DEFAULT_GT_FLAGS,
        DEFAULT_QP as DEFAULT_QP,
        DEFAULT_SLICE_SIZE as DEFAULT_SLICE_SIZE,
        CodingSettings as CodingSettings,
    )
    from .summary import ContainerInfo as ContainerInfo, TensorInfo as TensorInfo, info as info
    from .ray_sweeps import RayExecutor as RayExecutor
    from .sweeps import (
        LocalExecutor as LocalExecutor,
        OperatingPoint as OperatingPoint,
        SweepResult as SweepResult,
        SweepTask as SweepTask,
        choose_operating_point as choose_operating_point,
        evaluate_task as evaluate_task,
        point_from_sweep as point_from_sweep,
        sweep as sweep,
        sweep_models as sweep_models,
    )
    from .tables import DQ_STATE_COUNTS as DQ_STATE_COUNTS

__all__ = [
    "DEFAULT_GT_FLAGS", "DEFAULT_QP", "DEFAULT_SLICE_SIZE", "DQ_STATE_COUNTS", "CodingSettings", "ContainerInfo",
    "TensorInfo", "available_engines", "dq_mode",
    "decode", "encode", "info", "load", "quantize", "quantize_levels", "step_from_qp",
    "OperatingPoint", "SweepResult", "choose_operating_point", "evaluate_task", "fisher_diagonal",
    "importance_scales", "importance_shapes",
    "output_sensitivity", "point_from_sweep", "rd_levels", "smooth_importance", "steps_from_importance", "sweep",
    "LocalExecutor", "RayExecutor", "SweepTask", "sweep_models",
    "FormatError", "GpucabacError", "GpuUnavailableError", "InputError", "ModelFileError", "SweepTaskError",
    "TensorNotFoundError",
]
