"""`gpucabac demo`: encode, decode and verify a real model at a few settings, and report."""

from __future__ import annotations

from collections.abc import Mapping

import click
import numpy as np

import gpucabac as api

from .. import io as gio
from ..errors import GpucabacError
from ..metrics import bits_per_weight, tensors_snr_db
from ._common import (Failure, count, fmt_snr, noting_compiles, progress_bar, rate, raw_bytes, table, threads_option,
                      timed, weights)


def demo_settings(default_slice_size: int) -> list[tuple[str, api.CodingSettings]]:
    """The demo's settings, labelled (slice_size None: one slice per tensor)."""
    s = f"S={default_slice_size}"
    urq, dq = api.CodingSettings(slice_size=default_slice_size), api.CodingSettings(quantizer="dq", slice_size=default_slice_size)
    return [
        (f"URQ QP -32 {s}", urq.replace(qp=-32)),
        (f"URQ QP -38 {s}", urq.replace(qp=-38)),
        (f"DQ QP -36 {s}", dq.replace(qp=-36)),
        (f"DQ QP -32 {s}", dq.replace(qp=-32)),
        ("URQ QP -32 whole tensors", urq.replace(qp=-32, slice_size=None)),
    ]


def mismatches(expected: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]) -> list[str]:
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


@click.command(name="demo")
@click.option("--model", default="minilm", show_default=True,
              help="Packaged model name or model file to run the demo on.")
@threads_option
def command(model, threads):
    """Encode and decode a real model at a few settings, verify every tensor, and report."""
    tensors = gio.read_model(model)
    n_weights = weights(tensors)
    raw = raw_bytes(tensors)
    click.echo(f"model {model}: {count(len(tensors), 'tensor')}, {count(n_weights, 'weight')}, {raw:,} bytes")

    # Warm-up: compile and load the engine's kernels, so that no timing below includes it.
    warm = {"w": np.linspace(-1, 1, 2 * api.DEFAULT_SLICE_SIZE, dtype=np.float32).reshape(2, -1)}
    with noting_compiles():
        for quantizer in ("urq", "dq"):
            api.decode(api.encode(warm, api.CodingSettings(quantizer=quantizer), threads=threads), threads=threads)

    rows, failed = [], []
    for label, settings in demo_settings(api.DEFAULT_SLICE_SIZE):
        with timed(n_weights, f"{label}: encode") as coding:
            data = api.encode(tensors, settings, threads=threads, progress=coding.progress)
        t_enc = coding.seconds
        try:
            with timed(n_weights, f"{label}: decode") as decoding:
                decoded = api.decode(data, threads=threads, progress=decoding.progress)
        except GpucabacError as e:  # its own stream failing to decode is a failed verification
            failed.append(f"{label} (decode failed: {e})")
            rows.append([label, f"{bits_per_weight(len(data), n_weights):.3f}", f"{raw / max(len(data), 1):.2f}",
                         "-", f"{rate(n_weights, t_enc):.2f}", "-", "no"])
            continue
        t_dec = decoding.seconds
        with progress_bar(len(tensors), f"{label}: verify") as progress:
            expected = {}
            for name, x in tensors.items():  # tensor by tensor, so that the check reports progress
                expected |= api.quantize({name: x}, settings, threads=threads)
                progress(1)
        bad = mismatches(expected, decoded)
        if bad:
            failed.append(f"{label} ({len(bad)} tensors, first {bad[0]!r})")
        rows.append([
            label, f"{bits_per_weight(len(data), n_weights):.3f}", f"{raw / max(len(data), 1):.2f}",
            fmt_snr(tensors_snr_db(tensors, decoded)), f"{rate(n_weights, t_enc):.2f}",
            f"{rate(n_weights, t_dec):.2f}", "no" if bad else "yes",
        ])
    headers = ["setting", "bits/weight", "ratio", "SNR dB", "enc Mw/s", "dec Mw/s", "verified"]
    click.echo(table(headers, rows, right={1, 2, 3, 4, 5}))
    if failed:
        raise Failure("decoded tensors differ from gpucabac.quantize for: " + "; ".join(failed))
