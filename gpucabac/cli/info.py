"""`gpucabac info`: the tensor table of a .gcb file (only its header is read)."""

from __future__ import annotations

import pathlib

import click

import gpucabac as api

from ._common import count, table


@click.command(name="info")
@click.argument("input", type=click.Path(dir_okay=False, path_type=pathlib.Path))
def command(input):
    """List the tensors of a .gcb file INPUT: coding mode, scan, zeros, step, slices and size.

    bits/weight counts a tensor's payload and its header record (TensorInfo.bits_per_weight); the
    total counts the whole file."""
    meta = api.info(input)
    rows = []
    total_coded = 0
    for t in meta.tensors:
        total_coded += t.coded_bytes
        step = f"{t.step:.6g}" if t.mode not in ("int", "raw") else "-"
        rows.append([
            t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", t.mode, t.scan, t.zeros, step,
            str(t.num_slices), f"{t.coded_bytes:,}", f"{t.bits_per_weight:.3f}" if t.numel else "-",
        ])
    headers = ["name", "dtype", "shape", "mode", "scan", "zeros", "step", "slices", "bytes", "bits/weight"]
    click.echo(table(headers, rows, right={6, 7, 8, 9}))
    click.echo(
        f"{input}: format version {meta.version}, {count(len(meta.tensors), 'tensor')}, "
        f"{count(meta.numel, 'weight')}, "
        f"{meta.total_bytes:,} bytes in all ({total_coded:,} coded, "
        f"{meta.total_bytes - total_coded:,} of header: {100 * (meta.total_bytes - total_coded) / max(meta.total_bytes, 1):.2f}%), "
        f"{meta.bits_per_weight:.3f} bits/weight"
    )
