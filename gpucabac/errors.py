"""Errors raised by gpucabac. Every problem with user data raises one of these, never a bare assert."""


class GpucabacError(Exception):
    """Base class of every error gpucabac raises on purpose."""


class FormatError(GpucabacError, ValueError):
    """A bitstream or container is malformed: bad magic, unknown version, a field out of range,
    a truncated payload or a checksum mismatch. The message names the field or slice."""


class InputError(GpucabacError, ValueError):
    """Tensors or parameters given to the encoder are unusable (wrong dtype, shape, step, ...)."""


class ModelFileError(GpucabacError, OSError):
    """A model file is missing, of an unknown kind, or unreadable."""


class TensorNotFoundError(GpucabacError, KeyError):
    """A tensor name asked of a container is not in it."""


class GpuUnavailableError(GpucabacError, RuntimeError):
    """device="gpu" was asked for, but CuPy is not installed or sees no CUDA device."""


class SweepTaskError(GpucabacError, RuntimeError):
    """A task of a sweep failed on every attempt its executor allows (a worker crashed, a node was
    lost, or the task raised something other than a GpucabacError), or an executor returned no
    or incomplete rows for one: the message names the task (method, tensors, grid indices)."""
