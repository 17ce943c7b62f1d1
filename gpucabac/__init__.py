"""gpucabac: slice-parallel DeepCABAC compression of neural-network weights.

    >>> import numpy as np, gpucabac
    >>> w = {"fc.weight": np.linspace(-0.1, 0.1, 600, dtype=np.float32).reshape(20, 30)}
    >>> data = gpucabac.encode(w, qp=-32)
    >>> out = gpucabac.decode(data)
    >>> bool(np.array_equal(out["fc.weight"], gpucabac.quantize(w, qp=-32)["fc.weight"]))
    True
"""

from . import threads as _threads  # noqa: F401  (first: numba's fork-safe threading layer)
from .codec import (
    DEFAULT_GT_FLAGS as DEFAULT_GT_FLAGS,
    DEFAULT_QP as DEFAULT_QP,
    DEFAULT_SLICE_SIZE as DEFAULT_SLICE_SIZE,
    ContainerInfo as ContainerInfo,
    TensorInfo as TensorInfo,
    decode as decode,
    encode as encode,
    info as info,
    load as load,
    quantize as quantize,
)
from .engines import available_engines as available_engines
from .modes import dq_mode as dq_mode
from .errors import (
    FormatError as FormatError,
    GpucabacError as GpucabacError,
    GpuUnavailableError as GpuUnavailableError,
    InputError as InputError,
    ModelFileError as ModelFileError,
    TensorNotFoundError as TensorNotFoundError,
)
from .quantization import quantize_levels as quantize_levels, step_from_qp as step_from_qp
from .settings import CodingSettings as CodingSettings
from .tables import DQ_STATE_COUNTS as DQ_STATE_COUNTS
from .rdquant import (
    fisher_diagonal as fisher_diagonal,
    importance_scales as importance_scales,
    importance_shapes as importance_shapes,
    output_sensitivity as output_sensitivity,
    rd_levels as rd_levels,
    smooth_importance as smooth_importance,
    steps_from_importance as steps_from_importance,
)
from .sweeps import (
    OperatingPoint as OperatingPoint,
    SweepResult as SweepResult,
    choose_operating_point as choose_operating_point,
    evaluate_task as evaluate_task,
    point_from_sweep as point_from_sweep,
    sweep as sweep,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_GT_FLAGS", "DEFAULT_QP", "DEFAULT_SLICE_SIZE", "DQ_STATE_COUNTS", "CodingSettings", "ContainerInfo",
    "TensorInfo", "available_engines", "dq_mode",
    "decode", "encode", "info", "load", "quantize", "quantize_levels", "step_from_qp",
    "OperatingPoint", "SweepResult", "choose_operating_point", "evaluate_task", "fisher_diagonal",
    "importance_scales", "importance_shapes",
    "output_sensitivity", "point_from_sweep", "rd_levels", "smooth_importance", "steps_from_importance", "sweep",
    "FormatError", "GpucabacError", "GpuUnavailableError", "InputError", "ModelFileError", "TensorNotFoundError",
]
