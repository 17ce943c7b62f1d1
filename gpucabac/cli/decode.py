"""`gpucabac decode`: a .gcb file into a model file."""

from __future__ import annotations

import math
import pathlib

import click
import numpy as np

import gpucabac as api

from .. import io as gio
from ..dtypes import FLOAT_DTYPES
from ..errors import GpucabacError
from ._common import Failure, check_output, count, device_option, force_option, threads_option, timed, weights


def _model_output(ctx, param, value):
    """-o: check the extension before spending time on decoding."""
    try:
        gio.model_format(value)
    except GpucabacError as e:
        raise click.BadParameter(str(e), ctx, param) from e
    return value


@click.command(name="decode")
@click.argument("input", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("-o", "--output", required=True, callback=_model_output,
              type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Model file to write: .safetensors, .npz, .pt or .pth.")
@click.option("--names", default=None, help="Comma-separated tensor names to decode (default: all).")
@click.option("--dtype", type=click.Choice(list(FLOAT_DTYPES)), default=None,
              help="Dtype of decoded float tensors (default: each tensor's original dtype).")
@device_option("Decoding")
@threads_option
@force_option
def command(input, output, names, dtype, threads, device, force):
    """Decode a .gcb file INPUT into a model file."""
    check_output(output, [input], force, model_file=True)
    info = api.info(input)  # reads the header only
    selected = None if names is None else [n.strip() for n in names.split(",") if n.strip()]
    if selected is not None and not selected:
        raise Failure(f"--names {names!r}: no tensor names given (leave out --names to decode every tensor)")
    if selected is not None:
        known = {t.name for t in info.tensors}
        missing = [n for n in selected if n not in known]
        if missing:
            raise Failure(f"{input}: no tensor named {', '.join(map(repr, missing))}")
    wanted = info.tensors if selected is None else [t for t in info.tensors if t.name in set(selected)]
    total = sum(math.prod(t.shape) for t in wanted)

    with timed(total, "decode") as decoding:  # on the GPU: up to the copy of the error codes, which syncs
        # load reads only the selected tensors' bytes
        tensors = api.load(input, selected, dtype=dtype, threads=threads, progress=decoding.progress, device=device)
    on_gpu = any(not isinstance(t, np.ndarray) for t in tensors.values())
    if on_gpu:
        from ..engines.gpu import to_numpy  # noqa: PLC0415

        kinds = {t.name: (dtype if dtype and t.dtype in FLOAT_DTYPES else t.dtype) for t in wanted}
        tensors = {k: to_numpy(v, kinds.get(k)) for k, v in tensors.items()}
    gio.write_model(output, tensors)
    n = weights(tensors)
    click.echo(
        f"{output}: {count(len(tensors), 'tensor')}, {count(n, 'weight')} decoded in {decoding.throughput(n)} "
        f"on the {'GPU' if on_gpu else 'CPU'}"
    )
