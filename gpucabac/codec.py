"""The public encode / decode / info / quantize / load functions: tensors <-> container bytes.

Pipeline per tensor: plan (settings.plan_tensor) -> quantize (plain, or the JAX RD quantizer for
all tensors that share its settings) -> check the levels and choose the context initialisation
(slices, context_init) -> the engine codes the slices -> container. Decoding runs the stages
backwards: the container's slice table goes to the engine in one call. The engine is whatever
`engines.get_engine` returns for the `device` argument; nothing here depends on which.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import numpy as np

from . import container
from .context_init import choose_context_init
from .container import TensorRecord, check_int_range, mode_dq, raw_values
from .dtypes import FLOAT_DTYPES, ITEMSIZE, cast_float, dtype_name, numpy_dtype
from .engines import Engine, EncodeJob, SliceTable, TensorOutput, get_engine
from .errors import FormatError, InputError, TensorNotFoundError
from .layout import full_context_init, used_contexts
from .modes import dq_states
from .quantization import dequantize, fit_dtype_range, quantize_levels
from .settings import (
    DEFAULT_GT_FLAGS as DEFAULT_GT_FLAGS,
    DEFAULT_QP as DEFAULT_QP,
    DEFAULT_SLICE_SIZE as DEFAULT_SLICE_SIZE,
    SMALL_STEP_DIVISOR as SMALL_STEP_DIVISOR,
    CodingSettings,
    TensorPlan,
    plan_tensor,
)
from .slices import check_levels, raise_slice_errors
from .summary import ContainerInfo as ContainerInfo, TensorInfo as TensorInfo, info as info
from .threads import numba_threads

Progress = Callable[[int], None]


# --- settings in -------------------------------------------------------------------------------

_KEYWORDS = ("step", "qp", "qp_density", "dq", "slice_size", "num_gt_flags", "small_step", "lam", "scan", "zeros",
             "tensor_steps")


def _settings_of(settings: CodingSettings | None, keywords: dict, tensors: Mapping, what: str):
    """(CodingSettings, per-tensor settings) of an encode/quantize call: `settings`, or the keyword
    spelling, which builds one (a `lam` mapping and `tensor_steps` become per-tensor settings)."""
    unknown = set(keywords) - set(_KEYWORDS)
    if unknown:
        raise TypeError(f"{what}() got unexpected keyword arguments {', '.join(sorted(unknown))}")
    if settings is not None:
        if not isinstance(settings, CodingSettings):
            raise InputError(f"settings must be a gpucabac.CodingSettings, got {type(settings).__name__}")
        if keywords:
            raise InputError(f"give settings or the keywords {', '.join(sorted(keywords))}, not both")
        return settings, {}
    lam = keywords.pop("lam", 0.0)
    tensor_steps = keywords.pop("tensor_steps", None)
    lam_map = lam if isinstance(lam, Mapping) else None
    base = CodingSettings.from_keywords(**keywords, lam=0.0 if lam_map is not None else lam)
    if tensor_steps is None and lam_map is None:
        return base, {}
    warnings.warn(f"{what}(tensor_steps=..., lam={{...}}) is deprecated: give per_tensor={{name: CodingSettings}} "
                  "(e.g. OperatingPoint.per_tensor(settings))", DeprecationWarning, stacklevel=3)
    per_tensor = {}
    for name in set(tensor_steps or ()) | set(lam_map or ()):
        if name not in tensors:
            continue  # these spellings ignored names that are not tensors
        x = np.asarray(tensors[name])
        plan = plan_tensor(x, base)
        if plan.mode in ("int", "raw"):
            continue
        step = float(tensor_steps[name]) if tensor_steps is not None and name in tensor_steps else plan.step
        lam_t = lam_map.get(name, 0.0) if lam_map is not None else (base.lam if x.ndim >= 2 else 0.0)
        try:
            per_tensor[name] = base.replace(step=step, lam=lam_t)
        except InputError as e:
            raise InputError(f"tensor {name!r}: {e}") from None
    return base, per_tensor


def _check_per_tensor(per_tensor, tensors: Mapping) -> dict:
    if per_tensor is None:
        return {}
    if not isinstance(per_tensor, Mapping):
        raise InputError(f"per_tensor must map tensor names to CodingSettings, got {type(per_tensor).__name__}")
    for name, s in per_tensor.items():
        if name not in tensors:
            raise InputError(f"per_tensor names {name!r}, which is not one of the tensors")
        if not isinstance(s, CodingSettings):
            raise InputError(f"per_tensor[{name!r}] must be a gpucabac.CodingSettings, got {type(s).__name__}")
    return dict(per_tensor)


def _as_array(name, x) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise InputError(f"tensor names must be non-empty strings, got {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InputError(f"tensor name {name!r} is not valid Unicode text (a lone surrogate?); it cannot be stored") from None
    if size > 0xFFFF:
        raise InputError(f"tensor name {name[:40]!r}... is {size} bytes of UTF-8; at most 65535 can be stored")
    a = np.asarray(x)
    if a.ndim > container.MAX_NDIM:
        raise InputError(f"tensor {name!r} has {a.ndim} dimensions, at most {container.MAX_NDIM} are supported")
    return a


class _Job(NamedTuple):
    """Validated inputs of one encode/quantize call."""

    arrays: dict  # name -> array
    plans: dict  # name -> TensorPlan
    slice_settings: dict  # name -> the slice size its settings ask for (None: one slice per tensor)
    importance: dict  # name -> array of the tensor's shape (or a scalar)


def _prepare(tensors, settings, per_tensor, importance, keywords, what) -> _Job:
    settings, shim_per_tensor = _settings_of(settings, keywords, tensors, what)
    per_tensor = {**shim_per_tensor, **_check_per_tensor(per_tensor, tensors)}
    arrays = {name: _as_array(name, x) for name, x in tensors.items()}
    plans, slice_settings = {}, {}
    for name, x in arrays.items():
        s = per_tensor.get(name, settings)
        try:
            plans[name] = plan_tensor(x, s, explicit=name in per_tensor)
        except InputError as e:
            raise InputError(f"tensor {name!r}: {e}") from None
        slice_settings[name] = s.slice_size
    imp = {}
    for name, f in (importance or {}).items():
        if name in arrays and f is not None:
            if np.shape(f) not in ((), arrays[name].shape):
                raise InputError(f"importance weights of shape {np.shape(f)} do not match the tensor's {arrays[name].shape} ({name!r})")
            imp[name] = f
    return _Job(arrays, plans, slice_settings, imp)


# --- levels -------------------------------------------------------------------------------------

def _levels(x: np.ndarray, plan: TensorPlan) -> np.ndarray:
    """Levels of a tensor that the plain quantizer codes (rounding or the distortion-only trellis)."""
    if plan.mode == "int":
        return np.ascontiguousarray(x, dtype=np.int64).reshape(-1).astype(np.int32)
    dq = mode_dq(plan.mode)
    levels = quantize_levels(x, plan.step, dq=dq, slice_size=plan.slice_size)
    return fit_dtype_range(levels, plan.step, numpy_dtype(plan.dtype), dq=dq)


def _rd_levels(views: Mapping, plans: Mapping, slice_settings: Mapping, importance: Mapping,
               progress: Progress | None = None) -> dict:
    """Levels of every view whose plan asks for the rate-distortion quantizer (lam > 0, or
    importance weights): the JAX quantizer over the slices of all views that share a method, lam,
    flags and slice size as one stream (rdquant.rd_quantize_tensors; the same levels as one
    rd_levels call each). The mappings are keyed by (name, scan). `progress` gets the weights
    quantized."""
    groups: dict = {}
    for key, plan in plans.items():
        if plan.mode not in ("raw", "int") and (plan.lam > 0 or key in importance):
            # one slice per tensor: slice sizes differ, so such tensors cannot share a stream
            size = slice_settings[key[0]]
            group = (plan.mode, plan.lam, plan.num_gt_flags, plan.slice_size if size is None else size)
            groups.setdefault(group, []).append(key)
    if not groups:
        return {}
    from .rdquant import rd_quantize_tensors  # noqa: PLC0415  (jax loads only when used)

    out = {}
    for (mode, lam, ngt, _), keys in groups.items():
        res = rd_quantize_tensors({k: views[k] for k in keys}, {k: [plans[k].step] for k in keys}, [lam],
                                  dq=mode_dq(mode), slice_size=max(plans[k].slice_size for k in keys),
                                  num_gt_flags=ngt, importance={k: importance[k] for k in keys if k in importance} or None,
                                  progress=progress)
        for k in keys:
            out[k] = fit_dtype_range(res[k].levels[0, 0], plans[k].step, numpy_dtype(plans[k].dtype), dq=mode_dq(mode))
    return out


class _Coded(NamedTuple):
    """One tensor as coded: what its record and payload need, and its levels (in scan order)."""

    ctx_init: np.ndarray | None
    payload: np.ndarray | None  # None: not coded (quantize with a single candidate order)
    slice_lengths: np.ndarray | None
    slice_crcs: np.ndarray | None
    scan: str
    levels: np.ndarray | None  # None for raw tensors
    runs: bool = False  # zeros coded as runs (format version 3)


def code_levels(levels: np.ndarray, slice_size: int, dq: int, num_gt_flags: int, engine: Engine,
                ctx_init: np.ndarray | None = None, progress: Progress | None = None, runs: bool = False):
    """(ctx_init, payload, slice lengths, slice CRCs) of one tensor's int32 levels on `engine`,
    its zeros coded as runs or not: the levels are checked, the context initialisation chosen
    (unless given), then coded."""
    levels = np.ascontiguousarray(levels, dtype=np.int32).reshape(-1)
    if levels.size == 0:
        empty = np.zeros(0, np.uint32)
        return np.zeros(len(used_contexts(num_gt_flags, dq, runs)), np.uint8), np.zeros(0, np.uint8), empty, empty
    bound = check_levels(levels, slice_size, dq, num_gt_flags, runs)
    if ctx_init is None:
        ctx_init = choose_context_init(levels, slice_size, dq, num_gt_flags, runs=runs)
    job = EncodeJob(levels, slice_size, dq, num_gt_flags, full_context_init(ctx_init, num_gt_flags, dq, runs), bound,
                    bool(runs))
    coded = engine.encode([job], progress)[0]
    return ctx_init, coded.payload, coded.lengths, coded.crcs


def _code_tensors(job: _Job, engine: Engine, progress: Progress | None, *, need_bytes: bool):
    """Per tensor, in order: (name, array, plan, _Coded). The RD quantizer runs first over all
    tensors that need it (_rd_levels); a tensor with two scan orders to try is coded both ways
    and the smaller kept. Without `need_bytes` (quantize) a tensor with one order is not coded."""
    views, view_plans, view_importance = {}, {}, {}
    for name, x in job.arrays.items():
        imp = job.importance.get(name)
        for order in job.plans[name].scans:
            views[name, order] = container.scan_view(x, order)
            view_plans[name, order] = job.plans[name]
            if imp is not None:
                view_importance[name, order] = container.scan_view(np.broadcast_to(imp, x.shape), order)
    # the RD quantizer's share of the work dominates: its tensors advance `progress` as they are
    # quantized (unless each is tried in two orders), the others as they are coded
    single = all(len(p.scans) == 1 for p in job.plans.values())
    rd = _rd_levels(views, view_plans, job.slice_settings, view_importance, progress if single else None)
    for name, x in job.arrays.items():
        plan = job.plans[name]
        if plan.mode == "raw":
            data = np.frombuffer(np.ascontiguousarray(x).astype(x.dtype.newbyteorder("<")).tobytes(), np.uint8)
            coded = _Coded(np.zeros(0, np.uint8), data, np.array([data.size], np.uint32),
                           np.array([zlib.crc32(data)], np.uint32), "rows", None)
        else:
            candidates = []
            for order in plan.scans:
                key = (name, order)
                try:
                    levels = rd[key] if key in rd else _levels(views[key], plan)
                except InputError as e:
                    raise InputError(f"tensor {name!r}: {e}") from None
                if not need_bytes and len(plan.scans) == 1:
                    candidates.append(_Coded(None, None, None, None, order, levels))
                    continue
                codings = plan.zero_codings(levels)
                quiet = key in rd or not single or len(codings) > 1
                for runs in codings:
                    parts = code_levels(levels, plan.slice_size, mode_dq(plan.mode), plan.num_gt_flags, engine,
                                        progress=None if quiet else progress, runs=runs)
                    candidates.append(_Coded(*parts, order, levels, runs))
                if len(codings) > 1 and single and key not in rd and progress is not None:
                    progress(x.size)  # once for the tensor, however many codings were tried
            # the fewer bytes (payload and context-init nibbles, the record's only part that
            # differs); of equal ones the first (rows, flags)
            coded = min(candidates, key=lambda c: 0 if c.payload is None
                        else c.payload.size + container.ctx_init_bytes(c.ctx_init.size))
        if progress is not None and (plan.mode == "raw" or not single):
            progress(x.size)
        yield name, x, plan, coded


# --- encoding -----------------------------------------------------------------------------------

def encode(tensors: Mapping[str, np.ndarray], settings: CodingSettings | None = None, *,
           per_tensor: Mapping[str, CodingSettings] | None = None, importance: Mapping[str, np.ndarray] | None = None,
           device: str | Engine = "cpu", threads: int | None = None, progress: Progress | None = None,
           **keywords) -> bytes:
    """Compress named tensors into one gpucabac container (bytes).

    `settings` (a CodingSettings; default QP -32, rounding, slices of 8192) says how every tensor
    is coded: tensors of two or more dimensions at its step with its quantizer, λ and scan;
    tensors of at most one dimension (biases, norms) at its small step (default step/16, or
    'lossless'), λ 0; integer and bool tensors losslessly. `per_tensor` gives named tensors
    settings of their own, applied as given whatever the tensor's rank (an operating point chosen
    from a sweep is such a mapping: OperatingPoint.per_tensor). `importance` maps names to
    per-weight weights F of the RD quantizer's error (shaped like the tensor; default 1).

    Instead of `settings` the keywords of CodingSettings.from_keywords may be given (step, qp,
    qp_density, dq, lam, scan, slice_size, num_gt_flags, small_step), e.g.
    `encode(t, qp=-32, dq=True)`.

    How it runs: `device` "cpu" (numba), "gpu" (the CUDA engine through CuPy: the same bytes;
    quantization and the context-init choice stay on the CPU), "auto" (the GPU when CuPy sees
    one), or an engine; `threads` numba's CPU threads; `progress` is called with the number of
    weights finished since the last call.
    """
    job = _prepare(tensors, settings, per_tensor, importance, keywords, "encode")
    engine = get_engine(device, "encode")
    records, payloads, offset = [], [], 0
    with numba_threads(threads):
        for name, x, plan, coded in _code_tensors(job, engine, progress, need_bytes=True):
            records.append(TensorRecord(name, plan.dtype, tuple(int(d) for d in x.shape), plan.mode, plan.step,
                                        plan.num_gt_flags, plan.slice_size, coded.ctx_init, offset,
                                        coded.slice_lengths, coded.slice_crcs, coded.scan, coded.runs))
            payloads.append(coded.payload)
            offset += coded.payload.size
    return container.write(records, payloads)  # joined once, into the result


def _reconstruct(levels: np.ndarray, plan: TensorPlan, shape, scan: str = "rows") -> np.ndarray:
    if plan.mode == "int":
        return levels.astype(numpy_dtype(plan.dtype)).reshape(shape)
    return container.unscan(dequantize(levels, plan.step, (levels.size,), numpy_dtype(plan.dtype)), tuple(shape), scan)


def quantize(tensors: Mapping[str, np.ndarray], settings: CodingSettings | None = None, *,
             per_tensor: Mapping[str, CodingSettings] | None = None, importance: Mapping[str, np.ndarray] | None = None,
             threads: int | None = None, **keywords) -> dict[str, np.ndarray]:
    """The tensors exactly as `decode(encode(tensors, same settings))` returns them (with
    scan="auto" the tensors are coded, to make the same choice)."""
    job = _prepare(tensors, settings, per_tensor, importance, keywords, "quantize")
    out = {}
    with numba_threads(threads):
        for name, x, plan, coded in _code_tensors(job, get_engine("cpu"), None, need_bytes=False):
            out[name] = x.copy() if plan.mode == "raw" else _reconstruct(coded.levels, plan, x.shape, coded.scan)
    return out


def encode_levels(levels: np.ndarray, slice_size: int, dq: bool | int, num_gt_flags: int,
                  ctx_init: np.ndarray | None = None, progress: Progress | None = None, device: str | Engine = "cpu",
                  runs: bool = False):
    """Code int32 levels in slices (`dq`: a bool, or the trellis size 8..256; `runs`: zeros as
    runs) as `encode` codes a tensor's levels. Returns (ctx_init, payload, slice lengths);
    InputError for a level that cannot be coded."""
    try:
        dq = dq_states(dq)
    except ValueError as e:
        raise InputError(str(e)) from None
    ctx_init, payload, lengths, _ = code_levels(levels, int(slice_size), dq, int(num_gt_flags),
                                                get_engine(device, "encode_levels"), ctx_init, progress, bool(runs))
    return ctx_init, payload, lengths


# --- decoding -----------------------------------------------------------------------------------

def _float_target(dtype) -> str | None:
    """The float dtype name a `decode(dtype=...)` argument asks for (None: each tensor's own);
    checked whether or not the container has float tensors."""
    if dtype is None:
        return None
    name = dtype_name(dtype)
    if name not in FLOAT_DTYPES:
        raise InputError(f"decode(dtype=...) converts float tensors to {', '.join(FLOAT_DTYPES)}, not {name}")
    return name


# decode/load refuse a container whose selected tensors need more than this, before allocating
DEFAULT_MAX_OUTPUT_BYTES = 64 << 30
# exponent range of the float dtypes: a decoded value is finite in its own dtype and in any as wide
_RANGE = {"float16": 0, "bfloat16": 1, "float32": 1, "float64": 2}
# `load` reads and decodes the coded tensors in groups of at most this many payload bytes (a
# tensor larger than that is a group of its own): the file's bytes are held one group at a time.
# An engine whose arrays stay on a device decodes a group per launch, so it gets larger groups.
LOAD_GROUP_BYTES = 32 << 20
LOAD_GROUP_BYTES_DEVICE = 1 << 30
# `iter_decode` hands out tensors in groups of at most this many output bytes (or one tensor)
ITER_GROUP_BYTES = 64 << 20
# the finiteness check of decoded values looks at this many values at a time (no full-size mask)
FINITE_CHUNK = 1 << 20


def _all_finite(xp, x) -> bool:
    """Whether every value of the flat float array x (of `xp`) is finite, checked in chunks of
    FINITE_CHUNK values so that the check allocates no mask as large as x."""
    for i in range(0, x.size, FINITE_CHUNK):
        if not bool(xp.isfinite(x[i : i + FINITE_CHUNK]).all()):
            return False
    return True


def _targets(records: list[TensorRecord], dtype, max_output_bytes: int | None) -> dict:
    """name -> the dtype name each record decodes to; InputError (before anything is allocated)
    when the selection needs more than `max_output_bytes`."""
    want = _float_target(dtype)
    targets = {rec.name: want if want and rec.dtype in FLOAT_DTYPES else rec.dtype for rec in records}
    limit = DEFAULT_MAX_OUTPUT_BYTES if max_output_bytes is None else int(max_output_bytes)
    need = sum(rec.numel * ITEMSIZE[targets[rec.name]] for rec in records)
    if need > limit:
        raise InputError(f"the selected tensors decode to {need / 2**30:.2f} GiB, more than max_output_bytes "
                         f"({limit / 2**30:.2f} GiB); pass a larger max_output_bytes if that is intended")
    return targets


def _is_coded(rec: TensorRecord) -> bool:
    return rec.mode != "raw" and rec.numel > 0


def _groups(records: list[TensorRecord], targets: Mapping, payload_budget: int | None,
            output_budget: int | None) -> Iterable[list[TensorRecord]]:
    """Consecutive runs of records, in record order, each within both budgets (the coded payload
    bytes it reads, the output bytes it decodes to) or a single record; None: no bound."""
    group, pay, out = [], 0, 0
    for rec in records:
        p = rec.payload_length if _is_coded(rec) else 0
        o = rec.numel * ITEMSIZE[targets[rec.name]]
        if group and ((payload_budget is not None and pay + p > payload_budget)
                      or (output_budget is not None and out + o > output_budget)):
            yield group
            group, pay, out = [], 0, 0
        group.append(rec)
        pay += p
        out += o
    if group:
        yield group


class _BufferPayloads:
    """The payloads of a container held in memory: slice tables over a zero-copy view of its
    payload area (a device engine gets a compact copy when the selected tensors are a sparse
    part of the area, so that it does not upload the rest)."""

    def __init__(self, buf: memoryview, header: container.Header, engine: Engine):
        self.area = (np.frombuffer(buf, np.uint8, count=header.payload_size, offset=header.payload_start)
                     if header.payload_size else np.zeros(0, np.uint8))
        self.engine = engine

    def table(self, coded: list[TensorRecord]) -> SliceTable:
        lo = min(r.offset for r in coded)
        hi = max(r.offset + r.payload_length for r in coded)
        need = sum(r.payload_length for r in coded)
        if self.engine.xp is not np and hi - lo > 2 * need:
            return SliceTable.from_records(coded, [self.raw(r) for r in coded])
        return SliceTable.over_payload(coded, self.area[lo:hi], [r.offset - lo for r in coded])

    def raw(self, rec: TensorRecord) -> np.ndarray:
        return self.area[rec.offset : rec.offset + rec.payload_length]


class _FilePayloads:
    """The payloads of a container file, read when a group of tensors is decoded: each group's
    coded payloads into one buffer (readinto, no intermediate bytes), raw ones per tensor."""

    def __init__(self, f, header: container.Header):
        self.f, self.header = f, header

    def _read_into(self, rec: TensorRecord, out: np.ndarray) -> None:
        self.f.seek(self.header.payload_start + rec.offset)
        view = memoryview(out)
        done = 0
        while done < out.size:
            n = self.f.readinto(view[done:])
            if not n:
                raise FormatError(f"tensor {rec.name!r}: file truncated inside its payload")
            done += n

    def table(self, coded: list[TensorRecord]) -> SliceTable:
        buf = np.empty(sum(r.payload_length for r in coded), np.uint8)
        starts, pos = [], 0
        for rec in coded:
            self._read_into(rec, buf[pos : pos + rec.payload_length])
            starts.append(pos)
            pos += rec.payload_length
        return SliceTable.over_payload(coded, buf, starts)

    def raw(self, rec: TensorRecord) -> np.ndarray:
        out = np.empty(rec.payload_length, np.uint8)
        self._read_into(rec, out)
        return out


def _decode_records(records: list[TensorRecord], payloads, targets: Mapping, engine: Engine,
                    progress: Progress | None, groups: Iterable[list[TensorRecord]], threads: int | None = None):
    """(name, array of engine.xp) for every record, in record order, decoding one group of
    records at a time (`groups`: consecutive runs of `records`): the group's coded slices in one
    engine call, then errors raised for its first bad tensor in record order (FormatError naming
    it), so the first bad tensor of the selection raises. `payloads` gives the slice table of a
    group's coded records and the bytes of a raw one (_BufferPayloads, _FilePayloads)."""
    need = sum(rec.numel * ITEMSIZE[targets[rec.name]] for rec in records)
    for group in groups:
        coded = [r for r in group if _is_coded(r)]
        arrays, errors, index = [], None, {}  # the last group's arrays are the caller's alone now
        if coded:
            table = payloads.table(coded)
            outputs = [TensorOutput("int32") if r.mode == "int" else TensorOutput(targets[r.name], r.dtype, r.step)
                       for r in coded]
            try:
                with numba_threads(threads):
                    arrays, errors = engine.decode(table, outputs, progress)
            except MemoryError as e:  # the limit passed, the machine has less
                raise InputError(f"the selected tensors decode to {need / 2**30:.2f} GiB, and this process could not "
                                 "allocate that; decode fewer tensors at a time (names=...)") from e
            index = {r.name: t for t, r in enumerate(coded)}
            slices_of = [table.slices_of(t) for t in range(len(coded))]
            table = None  # the group's payload bytes go before the next group's are read
        for rec in group:
            target = targets[rec.name]
            if rec.mode == "raw":
                x = engine.upload(cast_float(raw_values(rec, np.ascontiguousarray(payloads.raw(rec), np.uint8)), target))
            elif rec.numel == 0:
                x = engine.upload(np.zeros(0, numpy_dtype(target)))
            else:
                t = index[rec.name]
                raise_slice_errors(rec.name, errors[slices_of[t]])
                x = arrays[t]
                if rec.mode == "int":
                    check_int_range(rec, int(x.min()), int(x.max()))
                    x = x.astype(numpy_dtype(rec.dtype), copy=False)
                elif _RANGE[target] >= _RANGE[rec.dtype] and not _all_finite(engine.xp, x):
                    # the writer keeps every level x step finite in the tensor's dtype (fit_dtype_range)
                    raise FormatError(f"tensor {rec.name!r}: decoded values overflow {rec.dtype} (level x step is not "
                                      "finite): the levels or the step are corrupt")
            x = container.unscan(x.reshape(-1), rec.shape, rec.scan, engine.xp)
            if progress is not None and (rec.mode == "raw" or rec.numel == 0):
                progress(rec.numel)
            yield rec.name, x


def decode_levels(rec: TensorRecord, payload: np.ndarray, device: str | Engine = "cpu") -> np.ndarray:
    """The int32 levels of one coded tensor from its payload bytes (FormatError for a bad slice)."""
    if rec.numel == 0:
        return np.zeros(0, np.int32)
    table = SliceTable.from_records([rec], [payload])
    engine = get_engine(device, "decode_levels")
    (levels,), errors = engine.decode(table, [TensorOutput("int32")])
    raise_slice_errors(rec.name, errors)
    return engine.to_host(levels)


def _select(header: container.Header, names) -> list[TensorRecord]:
    if names is None:
        return header.records
    names = [names] if isinstance(names, str) else list(names)
    known = {r.name: r for r in header.records}
    missing = [n for n in names if n not in known]
    if missing:
        raise TensorNotFoundError(f"no tensor named {', '.join(map(repr, missing))} in this container")
    return [known[n] for n in names]


def decode(data: bytes | bytearray | memoryview, names: Iterable[str] | None = None, *, dtype=None,
           threads: int | None = None, progress: Progress | None = None, device: str | Engine = "cpu",
           max_output_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Decompress a container (bytes) into named numpy arrays of their original dtype (or
    `dtype` for floating-point tensors). `names` selects tensors; only their slices are read.

    Memory: each output is allocated once and filled slice batch by slice batch (a column-scanned
    tensor is transposed at the end, one more copy of it); the slices are read from `data` in
    place, not copied. A container whose selected tensors need more than `max_output_bytes`
    (default 64 GiB) is refused before anything is allocated.

    `device="gpu"` decodes all selected slices in one CUDA launch and returns CuPy arrays that
    stay on the device (hand them to PyTorch or JAX with DLPack: `torch.from_dlpack(a)`);
    "auto" takes the GPU when CuPy sees one (logged on the "gpucabac" logger). Same values either way."""
    return dict(_iter_decode(data, names, dtype, threads, progress, device, max_output_bytes, None))


def iter_decode(data: bytes | bytearray | memoryview, names: Iterable[str] | None = None, *, dtype=None,
                threads: int | None = None, progress: Progress | None = None, device: str | Engine = "cpu",
                max_output_bytes: int | None = None, group_bytes: int | None = None):
    """`decode`, tensor by tensor: an iterator of (name, array) in container order (or the order
    of `names`), the same arrays and the same errors as `decode`. The tensors are decoded in
    groups of at most `group_bytes` output bytes (default ITER_GROUP_BYTES, 64 MiB) or of one
    tensor, so that a caller who drops each tensor when done with it holds one group at a time
    (`gpucabac encode` checks what it wrote so). The container is parsed, `threads` checked and
    `max_output_bytes` applied when this is called, before the first tensor."""
    return _iter_decode(data, names, dtype, threads, progress, device, max_output_bytes,
                        ITER_GROUP_BYTES if group_bytes is None else int(group_bytes))


def _iter_decode(data, names, dtype, threads, progress, device, max_output_bytes, group_bytes: int | None):
    """decode / iter_decode: the checks now, then an iterator over groups of at most
    `group_bytes` output bytes (None: one group, one engine call)."""
    buf = memoryview(data).cast("B")
    header = container.parse_container(buf)
    engine = get_engine(device, "decode")
    with numba_threads(threads):  # checks `threads` now, not at the first tensor
        pass
    records = _select(header, names)
    targets = _targets(records, dtype, max_output_bytes)
    groups = _groups(records, targets, None, group_bytes)
    return _decode_records(records, _BufferPayloads(buf, header, engine), targets, engine, progress, groups, threads)


def load(path, names: Iterable[str] | None = None, *, dtype=None, threads: int | None = None,
         progress: Progress | None = None, device: str | Engine = "cpu",
         max_output_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Decode tensors from a .gcb file, reading only the header and the selected tensors' bytes.
    `device` and `max_output_bytes` as for `decode`. The payloads are read and decoded in groups
    of tensors of at most LOAD_GROUP_BYTES (32 MiB; LOAD_GROUP_BYTES_DEVICE on a GPU), so
    memory stays the outputs plus one group's bytes."""
    engine = get_engine(device, "load")
    with container.open_file(path) as f:
        header = container.read_header_file(f)
        with numba_threads(threads):
            records = _select(header, names)
            targets = _targets(records, dtype, max_output_bytes)
            budget = LOAD_GROUP_BYTES if engine.xp is np else LOAD_GROUP_BYTES_DEVICE
            groups = _groups(records, targets, budget, None)
            return dict(_decode_records(records, _FilePayloads(f, header), targets, engine, progress, groups))


__all__ = ["CodingSettings", "ContainerInfo", "TensorInfo", "code_levels", "decode", "decode_levels", "encode",
           "encode_levels", "info", "iter_decode", "load", "quantize"]
