"""`gpucabac plot`: RD curves of sweep files (needs matplotlib)."""

from __future__ import annotations

import pathlib

import click

from ._common import check_output, force_option


@click.command(name="plot")
@click.argument("sweeps", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Image file; its extension picks the format (.png, .pdf, .svg).")
@click.option("--rate", type=click.Choice(["exact", "est"]), default="exact", show_default=True,
              help="Horizontal axis: the exact rate of the real coder, or the quantizer's estimate.")
@click.option("--metric", type=click.Choice(["snr", "task"]), default="snr", show_default=True,
              help="Vertical axis: SNR, or the task metric of `gpucabac sweep --task`.")
@click.option("--title", default=None,
              help="Figure title (default: the model name(s) the sweep files record, else their file names).")
@force_option
def command(sweeps, output, rate, metric, title, force):
    """RD curves (bits/weight vs SNR or a task metric) of one or more SWEEPS (JSON files written by
    `gpucabac sweep`) on one figure (needs matplotlib).

    Per method a fixed colour (the same in every file), per file a marker and its model name in
    the legend: the Pareto front over all (step, lambda) settings as a solid line, the lambda=0
    settings as a thin dotted line, every setting as a faint dot; NNCodec's points in black."""
    check_output(output, list(sweeps), force)
    from ..plotting import plot_sweeps  # noqa: PLC0415  (matplotlib loads only here)

    plot_sweeps(list(sweeps), output, rate=rate, title=title, metric=metric)
    click.echo(f"{output}: written")
