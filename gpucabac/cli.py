"""The `gpucabac` command: encode, decode, info, demo, sweep and plot.

Every problem with the user's files or settings (a GpucabacError or OSError) ends the command with
`gpucabac: error: ...` on stderr and exit code 1; click's own usage errors keep exit code 2.
Progress bars go to stderr, and only on a terminal for work that takes more than a moment.
"""

from __future__ import annotations

import math
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import click
import numpy as np

import gpucabac as api  # the public surface (tests patch it); the package never imports cli

from . import io as gio
from .codec import SMALL_STEP_DIVISOR
from .errors import GpucabacError

# Float dtypes whose reconstruction error the SNR measures (integer tensors are coded losslessly).
_FLOAT_KINDS = "f"
_PROGRESS_DELAY_S = 0.5


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpucabac")
    except PackageNotFoundError:
        return "unknown (not installed)"


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit code 1


class _Failure(click.ClickException):
    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"gpucabac: error: {self.format_message()}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (GpucabacError, OSError) as e:
            raise _Failure(_describe(e)) from e


def _describe(e: BaseException) -> str:
    if isinstance(e, GpucabacError):
        return str(e)
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Option types


class _SliceSize(click.ParamType):
    """A positive number of weights per slice, or 'whole' for one slice per tensor (None)."""

    name = "S|whole"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).lower() == "whole":
            return None
        try:
            size = int(value)
        except ValueError:
            self.fail(f"{value!r} is neither a number of weights nor 'whole'", param, ctx)
        if size <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return size


class _SmallStep(click.ParamType):
    """The step for small tensors (biases, norms): a positive number or 'lossless'."""

    name = "X|lossless"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, float):
            return value
        if str(value).lower() == "lossless":
            return "lossless"
        try:
            step = float(value)
        except ValueError:
            self.fail(f"{value!r} is neither a step size nor 'lossless'", param, ctx)
        if not (step > 0 and math.isfinite(step)):
            self.fail(f"{value!r} must be a positive finite number", param, ctx)
        return step


def _model_output(ctx, param, value):
    """-o of decode: check the extension before spending time on decoding."""
    try:
        gio.model_format(value)
    except GpucabacError as e:
        raise click.BadParameter(str(e), ctx, param) from e
    return value


def _threads_option(f):
    return click.option(
        "--threads", "-t", type=click.IntRange(min=1), default=None,
        help="Worker threads (default: all cores).",
    )(f)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _weights(tensors: Mapping[str, np.ndarray]) -> int:
    return sum(int(t.size) for t in tensors.values())


def _raw_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    return sum(int(t.nbytes) for t in tensors.values())


def snr_db(original: Mapping[str, np.ndarray], reconstructed: Mapping[str, np.ndarray]) -> float:
    """10·log10(Σw² / Σ(w−ŵ)²) over the float tensors, in float64; inf when lossless, nan if none."""
    signal = noise = 0.0
    seen = False
    for name, w in original.items():
        if w.dtype.kind not in _FLOAT_KINDS and w.dtype.name != "bfloat16":
            continue
        seen = True
        w64 = np.asarray(w, dtype=np.float64)
        err = w64 - np.asarray(reconstructed[name], dtype=np.float64)
        signal += float(np.dot(w64.ravel(), w64.ravel()))
        noise += float(np.dot(err.ravel(), err.ravel()))
    if not seen:
        return math.nan
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _fmt_snr(snr: float) -> str:
    if math.isnan(snr):
        return "n/a"
    if math.isinf(snr):
        return "inf" if snr > 0 else "-inf"
    return f"{snr:.2f}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _rate(weights: int, seconds: float) -> float:
    """Millions of weights per second."""
    return weights / max(seconds, 1e-9) / 1e6


@contextmanager
def _progress(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """A tqdm bar over weights on stderr, shown only on a terminal and after a short delay."""
    from tqdm import tqdm

    with tqdm(
        total=total, desc=desc, unit="w", unit_scale=True, leave=False,
        disable=None, delay=_PROGRESS_DELAY_S, dynamic_ncols=True,
    ) as bar:
        yield bar.update


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    """Columns two spaces apart; those in `right` right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Commands


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="gpucabac")
def main() -> None:
    """Slice-parallel DeepCABAC coding of neural-network weights (.gcb files)."""


def _read_importance(path: pathlib.Path, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of an importance file (float64). Every array must name a tensor of the model
    and have its shape (tensors that are not quantized, such as integer ones, ignore theirs)."""
    importance = gio.read_model(path)
    for name, a in importance.items():
        if name not in tensors:
            raise api.InputError(f"importance file: {name!r} is not a tensor of the model")
        a, x = np.asarray(a), np.asarray(tensors[name])
        if a.shape != x.shape:
            raise api.InputError(f"importance file: {name!r} has shape {a.shape}, the tensor {x.shape}")
    return {k: np.asarray(a, np.float64) for k, a in importance.items()}


def _importance_settings(importance: Mapping[str, np.ndarray], step: float, weighted: bool) -> dict:
    """encode() settings from an importance file's arrays: per-tensor steps, and per-weight
    importance when `weighted`."""
    coded = {k: a for k, a in importance.items() if a.ndim >= 2}
    if not coded:
        raise api.InputError("importance file: no array of two or more dimensions, nothing to set steps from")
    out: dict = {"tensor_steps": api.steps_from_importance(coded, step)}
    if weighted:
        out["importance"] = api.importance_shapes(coded)
    return out


def _sweep_importance(importance: Mapping[str, np.ndarray], names: list[str]) -> tuple[dict, dict]:
    """What a sweep with an importance file weights: each swept tensor's per-weight shape (mean 1,
    in the quantizer and the weighted error) and its scale against the other swept tensors (the
    weighted error only; importance_scales)."""
    missing = [n for n in names if n not in importance]
    if missing:
        raise api.InputError(f"importance file: no array for the swept tensor(s) {', '.join(map(repr, missing))}")
    arrays = {n: importance[n] for n in names}
    return api.importance_shapes(arrays), api.importance_scales(arrays)


def _file_digest(path: pathlib.Path) -> str:
    import hashlib  # noqa: PLC0415

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _explicit(name: str) -> bool:
    """Whether the user gave option `name` on the command line (not its default)."""
    return click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def _operating_point(path: pathlib.Path, tensors: Mapping[str, np.ndarray], targets: dict, method: str | None,
                     per_tensor: bool, importance: pathlib.Path | None) -> tuple[api.OperatingPoint, dict, dict]:
    """The sweep's best setting for the target, checked against the model and importance file it
    was run with; returns it, the encode() settings that reproduce it, and the sweep's settings."""
    from .sweep import signal_of  # noqa: PLC0415

    res = api.SweepResult.from_json(path)
    st = res.settings
    first_rows = {}
    for r in res.rows:
        first_rows.setdefault(r["tensor"], r)
    for name in st.get("tensors", []):
        row = first_rows.get(name)
        x = tensors.get(name)
        if x is None or row is None:
            raise api.InputError(f"{path}: the sweep's tensor {name!r} is not in the model")
        if x.size != row["numel"] or not math.isclose(signal_of(x), row["signal"], rel_tol=1e-9):
            raise api.InputError(f"{path}: the sweep was run on other weights for {name!r} than the model's")
    recorded = st.get("importance_file")
    if st.get("importance") and not recorded:
        raise api.InputError(f"{path}: the sweep was weighted by importance arrays from Python; "
                             "encode its operating point from Python (gpucabac.encode) with the same arrays")
    if recorded and importance is None:
        raise click.UsageError(f"the sweep was run with --importance {recorded['path']}; give the same file")
    if importance is not None and not recorded:
        raise click.UsageError("the sweep was run without --importance; drop --importance or sweep again with it")
    if importance is not None and _file_digest(importance) != recorded["sha256"]:
        raise api.InputError(f"{importance}: not the importance file the sweep was run with ({recorded['path']})")
    methods = [method] if method else list(st.get("methods", []))
    if method and method not in st.get("methods", []):
        raise api.InputError(f"{path}: the sweep has no {method} settings (it has {', '.join(st.get('methods', []))})")
    candidates = []
    for m in methods:
        try:
            candidates.append(api.choose_operating_point(res, m, per_tensor=per_tensor, **targets))
        except api.InputError:
            continue
    if not candidates:
        raise api.InputError(f"{path}: no setting of the sweep ({', '.join(methods)}) meets the target; "
                             "sweep a wider step or lambda grid")
    rate_target = "target_bpw" in targets
    point = min(candidates, key=lambda op: (op.wsse, op.bits) if rate_target else (op.bits, op.wsse))
    missing = [k for k in ("slice_size", "num_gt_flags") if not isinstance(st.get(k), int)]
    if missing:
        raise api.InputError(f"{path}: the sweep does not record its {' and '.join(missing)}")
    settings = dict(dq=point.dq, tensor_steps=point.steps, lam=point.lams,
                    slice_size=st["slice_size"], num_gt_flags=st["num_gt_flags"])
    if importance is not None:
        shapes, _ = _sweep_importance(_read_importance(importance, tensors), list(point.steps))
        settings["importance"] = shapes
    return point, settings, st


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="The .gcb file to write (atomically).")
@click.option("--qp", type=int, default=None,
              help="NNC quantization parameter: step = (1 + (QP mod k)/k) * 2^floor(QP/k), about "
                   f"2^(QP/k), with k = 2^density  [default: {api.DEFAULT_QP}]")
@click.option("--step", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Quantization step instead of --qp.")
@click.option("--qp-density", type=click.IntRange(0, 7), default=2, show_default=True,
              help="QPs per doubling of the step are 2^density.")
@click.option("--dq/--no-dq", default=False, show_default=True, help="Dependent (trellis) quantization.")
@click.option("--trellis", type=click.Choice([str(s) for s in api.DQ_STATE_COUNTS]), default="8", show_default=True,
              help="States of the DQ trellis (implies --dq): 8 is NNC's; larger ones come closer to the "
                   "rate-distortion bound at the same decoding speed, encode slower, and need format version 2.")
@click.option("--slice-size", type=_SliceSize(), default=api.DEFAULT_SLICE_SIZE, show_default=True,
              help="Weights per independently coded slice, or 'whole' for one slice per tensor.")
@click.option("--scan", type=click.Choice(["rows", "columns", "auto"]), default="rows", show_default=True,
              help="Order of the values of 2-D+ float tensors: row-major, transposed (format version 2), "
                   "or per tensor whichever codes smaller (twice the work).")
@click.option("--gt-flags", type=click.IntRange(min=0), default=api.DEFAULT_GT_FLAGS, show_default=True,
              help="Greater-than flags before the Exp-Golomb remainder.")
@click.option("--small-step", type=_SmallStep(), default=None,
              help="Step for tensors of at most one dimension (biases, norms), or 'lossless'  "
                   f"[default: the step / {SMALL_STEP_DIVISOR}]")
@click.option("--lam", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Rate-distortion quantization: weight of the rate, in step² per bit (0: plain quantizer).")
@click.option("--importance", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), default=None,
              help="Importance of every weight (e.g. a diagonal Fisher estimate): a .safetensors/.npz/.pt "
                   "file of arrays named and shaped like MODEL's tensors. Each named tensor of two or more "
                   "dimensions gets its own step, the step times (its mean importance / their "
                   "geometric mean)^(-1/2), clamped to 1/16..16 times. With --sweep: the file the sweep "
                   "was run with (the sweep's choice sets the steps; the importance weights the quantizer "
                   "as it did in the sweep).")
@click.option("--weighted/--no-weighted", default=False, show_default=True,
              help="With --importance: also weight each weight's error in the quantizer by its "
                   "(smoothed) importance; runs the JAX rate-distortion quantizer.")
@click.option("--sweep", "sweep_path", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path),
              default=None,
              help="Code the swept tensors at the operating point this `gpucabac sweep` file finds for "
                   "the --target-* given: each tensor its own (step, lambda) from the sweep, the sweep's "
                   "slice size and flags; the method is the one that meets the target best unless "
                   "--dq/--no-dq is given. Other tensors follow --qp/--step as usual.")
@click.option("--target-bpw", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --sweep: at most this many bits per swept weight, least (weighted) error.")
@click.option("--target-snr", type=float, default=None,
              help="With --sweep: at least this SNR (dB) over the swept tensors, fewest bits.")
@click.option("--target-mse", type=click.FloatRange(min=0), default=None,
              help="With --sweep: at most this MSE over the swept tensors, fewest bits.")
@click.option("--one-setting", is_flag=True,
              help="With --sweep: one (step, lambda) for all swept tensors instead of one per tensor.")
@_threads_option
def encode(model, output, qp, step, qp_density, dq, trellis, slice_size, scan, gt_flags, small_step, lam, importance,
           weighted, sweep_path, target_bpw, target_snr, target_mse, one_setting, threads):
    """Compress MODEL (a .safetensors/.npz/.pt file or a packaged model name) into a .gcb file."""
    if qp is not None and step is not None:
        raise click.UsageError("give --qp or --step, not both")
    if _explicit("trellis"):
        if _explicit("dq") and not dq:
            raise click.UsageError("--trellis is a DQ setting; it contradicts --no-dq")
        dq = True
    dq = int(trellis) if dq else 0
    if weighted and importance is None:
        raise click.UsageError("--weighted needs --importance")
    targets = {k: v for k, v in (("target_bpw", target_bpw), ("target_snr_db", target_snr),
                                 ("target_mse", target_mse)) if v is not None}
    if sweep_path is None and (targets or one_setting):
        raise click.UsageError("--target-bpw, --target-snr, --target-mse and --one-setting need --sweep")
    if sweep_path is not None:
        if len(targets) != 1:
            raise click.UsageError("--sweep needs exactly one of --target-bpw, --target-snr, --target-mse")
        clashing = [f"--{o.replace('_', '-')}" for o in ("lam", "weighted", "slice_size", "gt_flags") if _explicit(o)]
        if clashing:
            raise click.UsageError(f"--sweep sets {', '.join(clashing)} from the sweep; "
                                   f"do not give {'it' if len(clashing) == 1 else 'them'}")
    tensors = gio.read_model(model)
    weights = _weights(tensors)
    settings = dict(step=step, qp=qp, qp_density=qp_density, dq=dq, slice_size=slice_size,
                    num_gt_flags=gt_flags, small_step=small_step, threads=threads, lam=lam, scan=scan)
    point = None
    if sweep_path is not None:
        method = api.dq_mode(dq) if _explicit("dq") or _explicit("trellis") else None
        point, chosen, swept = _operating_point(sweep_path, tensors, targets, method, not one_setting, importance)
        settings.update(chosen)
        steps = sorted(point.steps.values())
        click.echo(f"operating point from {sweep_path}: {point.method.upper()}, "
                   f"{_count(len(steps), 'tensor')} at steps {steps[0]:.6g}..{steps[-1]:.6g}, "
                   f"lambda {', '.join(f'{v:g}' for v in sorted(set(point.lams.values())))}; "
                   f"predicted {point.bpw:.3f} bits/weight ({'exact' if swept.get('exact') else 'estimated'}), "
                   f"SNR {_fmt_snr(point.snr_db)} dB over the swept tensors")
    elif importance is not None:
        base = step if step is not None else api.step_from_qp(api.DEFAULT_QP if qp is None else qp, qp_density)
        settings.update(_importance_settings(_read_importance(importance, tensors), base, weighted))

    start = time.perf_counter()
    with _progress(weights, "encode") as progress:
        data = api.encode(tensors, **settings, progress=progress)
    seconds = time.perf_counter() - start
    gio.atomic_write_bytes(output, data)

    # the SNR of what was written: decoding is far cheaper than quantizing again (the RD trellis)
    expected = api.decode(data, threads=threads)
    click.echo(
        f"{output}: {_count(weights, 'weight')} in {_count(len(tensors), 'tensor')} "
        f"-> {len(data):,} bytes, "
        f"{8 * len(data) / max(weights, 1):.3f} bits/weight, "
        f"ratio {_raw_bytes(tensors) / max(len(data), 1):.2f}x, "
        f"SNR {_fmt_snr(snr_db(tensors, expected))} dB, "
        f"{seconds:.2f} s ({_rate(weights, seconds):.2f} M weights/s)"
    )
    if point is not None:
        coded = {t.name: 8 * (t.coded_bytes + t.header_bytes) for t in api.info(data).tensors if t.name in point.steps}
        swept_snr = snr_db({n: tensors[n] for n in coded}, {n: expected[n] for n in coded})
        click.echo(f"swept tensors: {sum(coded.values()) / point.numel:.3f} bits/weight, "
                   f"SNR {_fmt_snr(swept_snr)} dB (predicted {point.bpw:.3f}, {_fmt_snr(point.snr_db)} dB)")


@main.command()
@click.argument("input", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("-o", "--output", required=True, callback=_model_output,
              type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Model file to write: .safetensors, .npz, .pt or .pth.")
@click.option("--names", default=None, help="Comma-separated tensor names to decode (default: all).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Dtype of decoded float tensors (default: each tensor's original dtype).")
@click.option("--device", type=click.Choice(["cpu", "gpu", "auto"]), default="cpu", show_default=True,
              help="Decoding engine: CPU (numba), GPU (CUDA through CuPy; an error if there is none), "
                   "or auto (the GPU when CuPy sees one).")
@_threads_option
def decode(input, output, names, dtype, threads, device):
    """Decode a .gcb file INPUT into a model file."""
    info = api.info(input)  # reads the header only
    selected = None if names is None else [n.strip() for n in names.split(",") if n.strip()]
    if selected is not None:
        known = {t.name for t in info.tensors}
        missing = [n for n in selected if n not in known]
        if missing:
            raise _Failure(f"{input}: no tensor named {', '.join(map(repr, missing))}")
    wanted = info.tensors if selected is None else [t for t in info.tensors if t.name in set(selected)]
    total = sum(math.prod(t.shape) for t in wanted)

    start = time.perf_counter()
    with _progress(total, "decode") as progress:
        # load reads only the selected tensors' bytes
        tensors = api.load(input, selected, dtype=dtype, threads=threads, progress=progress, device=device)
    seconds = time.perf_counter() - start  # on the GPU: up to the copy of the error codes, which syncs
    on_gpu = any(not isinstance(t, np.ndarray) for t in tensors.values())
    if on_gpu:
        from .engine_gpu import to_numpy

        kinds = {t.name: (dtype if dtype and t.dtype in ("float32", "float16", "bfloat16", "float64") else t.dtype)
                 for t in wanted}
        tensors = {k: to_numpy(v, kinds.get(k)) for k, v in tensors.items()}
    gio.write_model(output, tensors)
    weights = _weights(tensors)
    click.echo(
        f"{output}: {_count(len(tensors), 'tensor')}, {_count(weights, 'weight')} decoded in {seconds:.2f} s "
        f"({_rate(weights, seconds):.2f} M weights/s) on the {'GPU' if on_gpu else 'CPU'}"
    )


@main.command()
@click.argument("input", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
def info(input):
    """List the tensors of a .gcb file INPUT: coding mode, step, slices and size."""
    meta = api.info(input)  # reads the header only
    rows = []
    total_weights = total_coded = 0
    for t in meta.tensors:
        n = math.prod(t.shape)
        coded = t.coded_bytes
        total_weights += n
        total_coded += coded
        step = f"{t.step:.6g}" if t.mode not in ("int", "raw") else "-"
        rows.append([
            t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", t.mode, step,
            str(t.num_slices), f"{coded:,}", f"{8 * coded / n:.3f}" if n else "-",
        ])
    headers = ["name", "dtype", "shape", "mode", "step", "slices", "bytes", "bits/weight"]
    click.echo(_table(headers, rows, right={4, 5, 6, 7}))
    click.echo(
        f"{input}: format version {meta.version}, {_count(len(meta.tensors), 'tensor')}, "
        f"{_count(total_weights, 'weight')}, "
        f"{meta.total_bytes:,} bytes in all ({total_coded:,} coded), "
        f"{8 * meta.total_bytes / max(total_weights, 1):.3f} bits/weight"
    )


# The demo's settings: (label, encode keyword arguments). None for slice_size: one slice per tensor.
def _demo_settings(default_slice_size: int) -> list[tuple[str, dict]]:
    s = f"S={default_slice_size}"
    return [
        (f"URQ QP -32 {s}", dict(qp=-32, dq=False)),
        (f"URQ QP -38 {s}", dict(qp=-38, dq=False)),
        (f"DQ QP -36 {s}", dict(qp=-36, dq=True)),
        (f"DQ QP -32 {s}", dict(qp=-32, dq=True)),
        ("URQ QP -32 whole tensors", dict(qp=-32, dq=False, slice_size=None)),
    ]


def _mismatches(expected: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]) -> list[str]:
    """Names whose decoded tensor is not exactly the quantizer's output (dtype, shape and values)."""
    bad = [n for n in expected if n not in decoded]
    bad += [n for n in decoded if n not in expected]
    for name, want in expected.items():
        got = decoded.get(name)
        if got is None:
            continue
        if got.dtype != want.dtype or got.shape != want.shape or not np.array_equal(got, want):
            bad.append(name)
    return bad


@main.command()
@click.option("--model", default="minilm", show_default=True,
              help="Packaged model name or model file to run the demo on.")
@_threads_option
def demo(model, threads):
    """Encode and decode a real model at a few settings, verify every tensor, and report."""
    tensors = gio.read_model(model)
    weights = _weights(tensors)
    raw = _raw_bytes(tensors)
    click.echo(f"model {model}: {_count(len(tensors), 'tensor')}, {_count(weights, 'weight')}, {raw:,} bytes")

    # Warm-up: compile and load the engine's kernels, so that no timing below includes it.
    warm = {"w": np.linspace(-1, 1, 2 * api.DEFAULT_SLICE_SIZE, dtype=np.float32).reshape(2, -1)}
    for dq in (False, True):
        api.decode(api.encode(warm, qp=-32, dq=dq, threads=threads), threads=threads)

    rows, failed = [], []
    for label, kwargs in _demo_settings(api.DEFAULT_SLICE_SIZE):
        kwargs.setdefault("slice_size", api.DEFAULT_SLICE_SIZE)
        start = time.perf_counter()
        with _progress(weights, f"{label}: encode") as progress:
            data = api.encode(tensors, **kwargs, threads=threads, progress=progress)
        t_enc = time.perf_counter() - start
        start = time.perf_counter()
        try:
            with _progress(weights, f"{label}: decode") as progress:
                decoded = api.decode(data, threads=threads, progress=progress)
        except GpucabacError as e:  # its own stream failing to decode is a failed verification
            failed.append(f"{label} (decode failed: {e})")
            rows.append([label, f"{8 * len(data) / max(weights, 1):.3f}", f"{raw / max(len(data), 1):.2f}",
                         "-", f"{_rate(weights, t_enc):.2f}", "-", "no"])
            continue
        t_dec = time.perf_counter() - start
        expected = api.quantize(tensors, **kwargs, threads=threads)
        bad = _mismatches(expected, decoded)
        if bad:
            failed.append(f"{label} ({len(bad)} tensors, first {bad[0]!r})")
        rows.append([
            label, f"{8 * len(data) / max(weights, 1):.3f}", f"{raw / max(len(data), 1):.2f}",
            _fmt_snr(snr_db(tensors, decoded)), f"{_rate(weights, t_enc):.2f}",
            f"{_rate(weights, t_dec):.2f}", "no" if bad else "yes",
        ])
    headers = ["setting", "bits/weight", "ratio", "SNR dB", "enc Mw/s", "dec Mw/s", "verified"]
    click.echo(_table(headers, rows, right={1, 2, 3, 4, 5}))
    if failed:
        raise _Failure("decoded tensors differ from gpucabac.quantize for: " + "; ".join(failed))


def _import_task(spec: str) -> Callable[[dict], float]:
    """FUNC of MODULE:FUNC, imported with the current directory on the path."""
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415

    module, _, func = spec.partition(":")
    if not module or not func:
        raise click.BadParameter(f"--task: {spec!r} is not MODULE:FUNC")
    if "" not in sys.path and str(pathlib.Path.cwd()) not in sys.path:
        sys.path.insert(0, str(pathlib.Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as e:
        raise _Failure(f"--task {spec}: cannot import it ({type(e).__name__}: {e})") from e
    if not callable(fn):
        raise _Failure(f"--task {spec}: {func!r} is not callable")
    return fn


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise click.BadParameter(f"{what}: {text!r} is not a comma-separated list of numbers") from e


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="JSON file for the results (per tensor and per model).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Also write the rows as CSV.")
@click.option("--qp-range", default="-40:-26", show_default=True,
              help="Steps from NNC QPs A:B (inclusive, step 1) at --qp-density.")
@click.option("--steps", default=None, help="Comma-separated step sizes instead of --qp-range.")
@click.option("--qp-density", type=click.IntRange(0, 7), default=2, show_default=True)
@click.option("--lams", default="0,0.05,0.1,0.2", show_default=True,
              help="Comma-separated lambdas, in step² per bit (0: plain quantizer).")
@click.option("--methods", default="urq,dq", show_default=True,
              help="Comma-separated: urq, dq (NNC's 8-state trellis), dq16, dq32, dq64, dq128, dq256 (larger trellises).")
@click.option("--slice-size", type=click.IntRange(min=1), default=api.DEFAULT_SLICE_SIZE, show_default=True)
@click.option("--gt-flags", type=click.IntRange(0, 20), default=api.DEFAULT_GT_FLAGS, show_default=True)
@click.option("--tensors", "only", default=None, help="Comma-separated tensor names (default: all 2-D+ float tensors).")
@click.option("--exact/--no-exact", default=True, show_default=True,
              help="Also run the real coder on every setting's levels (exact rates).")
@click.option("--task", "task_spec", default=None, metavar="MODULE:FUNC",
              help="Also score every setting with FUNC(model) -> float, imported from MODULE (the current "
                   "directory is searched); model maps every tensor name to its array, the swept ones "
                   "quantized at the setting.")
@click.option("--task-label", default="task metric", show_default=True, help="Name of the task metric in plots.")
@click.option("--task-lower-is-better", is_flag=True, help="The task metric is a loss (default: higher is better).")
@click.option("--importance", type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path), default=None,
              help="Importance of every weight (as for encode), one array per swept tensor: each weight's "
                   "error is weighted by its smoothed importance (mean 1 per tensor, so lambda means the same "
                   "in every tensor), and each tensor's weighted error by its mean importance relative to "
                   "the others', so that `encode --sweep` gives the important tensors the bits.")
def sweep(model, output, csv_path, qp_range, steps, qp_density, lams, methods, slice_size, gt_flags, only, exact,
          task_spec, task_label, task_lower_is_better, importance):
    """RD sweep of MODEL over steps x lambdas x methods: estimated and exact rate, MSE, SNR."""
    task = None if task_spec is None else _import_task(task_spec)
    tensors = gio.read_model(model)
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        missing = [n for n in names if n not in tensors]
        if missing:
            raise _Failure(f"{model}: no tensor named {', '.join(map(repr, missing))}")
        tensors = {n: tensors[n] for n in names}
    if steps:
        step_list = _floats(steps, "--steps")
    else:
        try:
            a, b = (int(v) for v in qp_range.split(":"))
        except ValueError as e:
            raise click.BadParameter(f"--qp-range: {qp_range!r} is not A:B") from e
        step_list = [api.step_from_qp(q, qp_density) for q in range(min(a, b), max(a, b) + 1)]
    lam_list = _floats(lams, "--lams")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    swept = {n: t for n, t in tensors.items() if t.ndim >= 2 and t.dtype.kind == "f"}
    weighting: dict = {}
    if importance is not None:
        shapes, scales = _sweep_importance(_read_importance(importance, tensors), list(swept))
        weighting = dict(importance=shapes, tensor_weights=scales)
    total = _weights(swept) * len(step_list) * len(lam_list) * len(method_list)
    start = time.perf_counter()
    with _progress(total, "sweep") as progress:
        res = api.sweep(swept, step_list, lam_list, methods=method_list, slice_size=slice_size,
                        num_gt_flags=gt_flags, exact=exact, progress=progress, **weighting)
    if importance is not None:
        res.settings["importance_file"] = dict(path=str(importance), sha256=_file_digest(importance))
    if task is not None:
        from .sweep import evaluate_task  # noqa: PLC0415

        with _progress(len(res.model), "task") as progress:
            evaluate_task(res, tensors, task, label=task_label, higher_is_better=not task_lower_is_better,
                          importance=weighting.get("importance"), progress=progress)
    res.settings["model"] = str(model)
    res.settings["seconds"] = time.perf_counter() - start
    res.to_json(output)
    if csv_path is not None:
        res.to_csv(csv_path)
    key = "exact_bpw" if exact else "est_bpw"
    rows = [[m["method"], "per tensor" if m["step"] is None else f"{m['step']:.6g}", f"{m['lam']:g}", f"{m['est_bpw']:.4f}",
             f"{m.get('exact_bpw', float('nan')):.4f}", _fmt_snr(m["snr_db"])] + ([f"{m['task']:.6g}"] if task else [])
            for m in sorted(res.model, key=lambda m: (m["method"], m[key]))]
    headers = ["method", "step", "lam", "est bpw", "exact bpw", "SNR dB"] + ([task_label] if task else [])
    click.echo(_table(headers, rows, right=set(range(1, len(headers)))))
    click.echo(f"{output}: {len(res.model)} settings over {_count(len(swept), 'tensor')} in {res.settings['seconds']:.1f} s")


@main.command()
@click.argument("sweeps", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=pathlib.Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Image file (.png, .pdf, .svg).")
@click.option("--rate", type=click.Choice(["exact", "est"]), default="exact", show_default=True)
@click.option("--metric", type=click.Choice(["snr", "task"]), default="snr", show_default=True,
              help="Vertical axis: SNR, or the task metric of `gpucabac sweep --task`.")
@click.option("--title", default=None)
def plot(sweeps, output, rate, metric, title):
    """RD curves (bits/weight vs SNR or a task metric) of one or more SWEEP JSON files on one figure
    (needs matplotlib)."""
    from .sweep import plot_sweeps  # noqa: PLC0415

    plot_sweeps(list(sweeps), output, rate=rate, title=title, metric=metric)
    click.echo(f"{output}: written")


if __name__ == "__main__":
    main(prog_name="gpucabac")
