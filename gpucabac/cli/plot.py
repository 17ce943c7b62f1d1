"""`gpucabac plot`: RD curves of sweep files (needs matplotlib)."""

from __future__ import annotations

import pathlib

import click

from ._common import check_output, force_option


@click.command(name="plot")
@click.argument("sweeps", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Image file (.png, .pdf, .svg).")
@click.option("--rate", type=click.Choice(["exact", "est"]), default="exact", show_default=True,
              help="Horizontal axis: the exact rate of the real coder, or the quantizer's estimate.")
@click.option("--metric", type=click.Choice(["snr", "task"]), default="snr", show_default=True,
              help="Vertical axis: SNR, or the task metric of `gpucabac sweep --task`.")
@click.option("--title", default=None, help="Figure title.")
@force_option
def command(sweeps, output, rate, metric, title, force):
    """RD curves (bits/weight vs SNR or a task metric) of one or more SWEEP JSON files on one figure
    (needs matplotlib)."""
    check_output(output, list(sweeps), force)
    from ..plotting import plot_sweeps  # noqa: PLC0415  (matplotlib loads only here)

    plot_sweeps(list(sweeps), output, rate=rate, title=title, metric=metric)
    click.echo(f"{output}: written")
