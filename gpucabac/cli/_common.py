"""What the commands share: one-line errors, option types, progress bars, tables and numbers."""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import click
import numpy as np

from ..engines import DEVICES
from ..errors import GpucabacError
from ..jit import watch_compiles

PROGRESS_DELAY_S = 0.5


class Failure(click.ClickException):
    """`gpucabac: error: ...` on stderr, exit status 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"gpucabac: error: {self.format_message()}", err=True)


class Group(click.Group):
    """Turns every GpucabacError and OSError of a command into a Failure."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (GpucabacError, OSError) as e:
            raise Failure(describe(e)) from e


def describe(e: BaseException) -> str:
    if isinstance(e, GpucabacError):
        return str(e)
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


class SliceSize(click.ParamType):
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


class SmallStep(click.ParamType):
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


def threads_option(f):
    return click.option(
        "--threads", "-t", type=click.IntRange(min=1), default=None,
        help="Worker threads (default: all cores).",
    )(f)


def device_option(verb: str):
    def add(f):
        return click.option(
            "--device", type=click.Choice(list(DEVICES)), default="cpu", show_default=True,
            help=f"{verb} engine: CPU (numba), GPU (CUDA through CuPy; an error if there is none), "
                 "or auto (the GPU when CuPy sees one).",
        )(f)

    return add


def force_option(f):
    return click.option("--force", "-f", is_flag=True,
                        help="Overwrite an existing output file (never the input itself).")(f)


def check_output(output: pathlib.Path, inputs: Sequence, force: bool, *, model_file: bool = False) -> None:
    """Before any work: the output must not be one of the inputs (also through links), must not
    exist unless `force`, and its folder must exist and be writable; a model-file output needs a
    known extension and, for .pt/.pth, PyTorch. A Failure (status 1) otherwise."""
    output = pathlib.Path(output)
    for source in inputs:
        if source is not None and pathlib.Path(source).exists() and output.exists() and os.path.samefile(source, output):
            raise Failure(f"{output}: refusing to overwrite the input file {source}")
    if output.exists() or output.is_symlink():
        if output.is_dir():
            raise Failure(f"{output}: is a directory")
        if not force:
            raise Failure(f"{output} already exists; give --force (-f) to overwrite it")
    folder = output.parent
    if not folder.is_dir():
        raise Failure(f"{output}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise Failure(f"{output}: the folder {folder} is not writable")
    if model_file:
        from .. import io as gio  # noqa: PLC0415

        if gio.model_format(output) == "torch" and importlib.util.find_spec("torch") is None:
            raise Failure(f"{output}: writing .pt/.pth files needs PyTorch: pip install 'gpucabac[torch]'")


def explicit(name: str) -> bool:
    """Whether the user gave option `name` on the command line (not its default)."""
    return click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def weights(tensors: Mapping[str, np.ndarray]) -> int:
    return sum(int(t.size) for t in tensors.values())


def raw_bytes(tensors: Mapping[str, np.ndarray]) -> int:
    return sum(int(t.nbytes) for t in tensors.values())


def fmt_snr(snr: float) -> str:
    if math.isnan(snr):
        return "n/a"
    if math.isinf(snr):
        return "inf" if snr > 0 else "-inf"
    return f"{snr:.2f}"


def count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def rate(n_weights: int, seconds: float) -> float:
    """Millions of weights per second."""
    return n_weights / max(seconds, 1e-9) / 1e6


# Without a terminal, long work reports plain lines to stderr: after this long, then this often.
PLAIN_FIRST_S = 2.0
PLAIN_EVERY_S = 10.0


def quiet() -> bool:
    """Whether `gpucabac --quiet` was given (no progress at all)."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("quiet"))


class _PlainProgress:
    """Progress as rate-limited lines, for logs and pipes where a bar cannot redraw itself. A
    ticker thread calls `tick` so that a stage without updates (a compilation, a long first
    chunk) still reports that it is alive."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = max(int(total), 1), desc, 0
        self.start = self.last = time.monotonic()
        self.printed = False
        self.lock = threading.Lock()

    def update(self, n: int) -> None:
        with self.lock:
            self.done += int(n)
            self._maybe_line()

    def tick(self) -> None:
        with self.lock:
            self._maybe_line()

    def _maybe_line(self) -> None:
        now = time.monotonic()
        if now - self.start >= PLAIN_FIRST_S and (not self.printed or now - self.last >= PLAIN_EVERY_S):
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self.start
        frac = min(1.0, self.done / self.total)
        eta = f", about {elapsed * (1 - frac) / frac:.0f} s left" if 0 < frac < 1 else ""
        click.echo(f"gpucabac: {self.desc}: {100 * frac:.0f}% ({self.done:,} of {self.total:,}) after {elapsed:.0f} s{eta}",
                   err=True)
        self.last, self.printed = now, True

    def close(self) -> None:
        with self.lock:
            if self.printed:  # the work was long enough to report: say that it ended
                self._line(time.monotonic())


@contextmanager
def _ticking(fn: Callable[[], None], every_s: float) -> Iterator[None]:
    """Call `fn` every `every_s` seconds from a daemon thread while the body runs."""
    stop = threading.Event()

    def run():
        while not stop.wait(every_s):
            fn()

    thread = threading.Thread(target=run, name="gpucabac-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[int], None]]:
    """Progress over weights on stderr: a tqdm bar on a terminal (after a short delay), plain
    rate-limited lines otherwise; nothing with --quiet. Either keeps reporting (elapsed time) while
    no update comes."""
    if quiet():
        yield lambda n: None
        return
    if not sys.stderr.isatty():
        plain = _PlainProgress(total, desc)
        with _ticking(plain.tick, 1.0):
            yield plain.update
        plain.close()
        return
    from tqdm import tqdm  # noqa: PLC0415

    with tqdm(
        total=total, desc=desc, unit="w", unit_scale=True, leave=False,
        delay=PROGRESS_DELAY_S, dynamic_ncols=True,
    ) as bar, _ticking(bar.refresh, 1.0):
        yield bar.update


def note(text: str) -> None:
    """`gpucabac: text` on stderr (unless --quiet), above any progress bar on the terminal."""
    if quiet():
        return
    if "tqdm" in sys.modules and sys.stderr.isatty():
        from tqdm import tqdm  # noqa: PLC0415

        with tqdm.external_write_mode(file=sys.stderr):
            click.echo(f"gpucabac: {text}", err=True)
    else:
        click.echo(f"gpucabac: {text}", err=True)


COMPILING_NOTE = ("compiling gpucabac's coder with numba (the first run after an install; cached for later runs, "
                  "and not counted in the throughput)")


_compiling_noted = False


def _note_compiling() -> None:
    global _compiling_noted
    if not _compiling_noted:  # once per process: encode and its check compile different functions
        _compiling_noted = True
        note(COMPILING_NOTE)


class Timed:
    """A timed stage of a command: `progress` to hand to the library; after the stage, `seconds`
    of work (numba's compilations left out) and `compile_seconds`."""

    progress: Callable[[int], None]
    seconds: float = 0.0
    compile_seconds: float = 0.0

    def throughput(self, n_weights: int) -> str:
        """'2.21 s (10.26 M weights/s)', plus the compile time when there was one."""
        text = f"{self.seconds:.2f} s ({rate(n_weights, self.seconds):.2f} M weights/s)"
        return text + (f", plus {self.compile_seconds:.1f} s compiling" if self.compile_seconds else "")


@contextmanager
def noting_compiles() -> Iterator[Any]:
    """Say so (once per process) when numba starts compiling in the body; yields the CompileWatch."""
    with watch_compiles(on_first=_note_compiling) as watch:
        yield watch


@contextmanager
def timed(total: int, desc: str) -> Iterator[Timed]:
    """A progress bar over `total` weights, timed, with numba's compilations watched: the first
    one says so (COMPILING_NOTE), and their time is kept out of `seconds`."""
    stage = Timed()
    start = time.perf_counter()
    with noting_compiles() as watch, progress_bar(total, desc) as update:
        stage.progress = update
        yield stage
    stage.compile_seconds = watch.seconds
    stage.seconds = max(time.perf_counter() - start - watch.seconds, 0.0)


def table(headers: list[str], rows: list[list[str]], right: set[int]) -> str:
    """Columns two spaces apart; those in `right` right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        padded = (c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)
