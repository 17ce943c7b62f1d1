"""`gpucabac encode`: a model file (or a packaged model) into a .gcb file."""

from __future__ import annotations

import pathlib

import click
import numpy as np

import gpucabac as api  # the public surface (tests patch it); the package never imports the CLI

from .. import io as gio
from ..dtypes import is_float
from ..importance import importance_settings, read_importance
from ..metrics import SnrSum, bits_per_weight
from ..modes import SCAN_CHOICES, ZERO_CHOICES
from ..settings import SMALL_STEP_DIVISOR
from ..tables import MAX_GT_FLAGS
from ._common import (SliceSize, SmallStep, check_output, count, device_option, explicit, fmt_snr, force_option,
                      raw_bytes, threads_option, timed, weights)


@click.command(name="encode")
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
@click.option("--slice-size", type=SliceSize(), default=api.DEFAULT_SLICE_SIZE, show_default=True,
              help="Weights per independently coded slice, or 'whole' for one slice per tensor.")
@click.option("--scan", type=click.Choice(list(SCAN_CHOICES)), default="rows", show_default=True,
              help="Order of the values of 2-D+ float tensors: row-major, transposed (format version 2), "
                   "or per tensor whichever codes smaller (twice the work).")
@click.option("--zeros", type=click.Choice(list(ZERO_CHOICES)), default="auto", show_default=True,
              help="How zero levels are coded: a flag each, runs of zeros (format version 3, far smaller for "
                   "sparse tensors), or per tensor both ways when at least 75% of its levels are zero, the smaller kept "
                   "(runs alone for tensors of 2^18 levels or more that are at least 95% zero).")
@click.option("--gt-flags", type=click.IntRange(0, MAX_GT_FLAGS), default=api.DEFAULT_GT_FLAGS, show_default=True,
              help="Greater-than flags before the Exp-Golomb remainder.")
@click.option("--small-step", type=SmallStep(), default=None,
              help="Step for tensors of at most one dimension (biases, norms), or 'lossless'  "
                   f"[default: the step / {SMALL_STEP_DIVISOR}]")
@click.option("--lam", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Rate-distortion quantization: weight of the rate, in step² per bit (0: plain quantizer).")
@click.option("--importance", type=click.Path(dir_okay=False, path_type=pathlib.Path), default=None,
              help="Importance of every weight (e.g. a diagonal Fisher estimate): a .safetensors/.npz/.pt "
                   "file of arrays named and shaped like MODEL's tensors. Each named tensor of two or more "
                   "dimensions gets its own step, the step times (its mean importance / their "
                   "geometric mean)^(-1/2), clamped to 1/16..16 times. With --sweep: the file the sweep "
                   "was run with (the sweep's choice sets the steps; the importance weights the quantizer "
                   "as it did in the sweep).")
@click.option("--weighted/--no-weighted", default=False, show_default=True,
              help="With --importance: also weight each weight's error in the quantizer by its "
                   "(smoothed) importance; runs the JAX rate-distortion quantizer.")
@click.option("--sweep", "sweep_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
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
@device_option("Coding")
@threads_option
@force_option
def command(model, output, qp, step, qp_density, dq, trellis, slice_size, scan, zeros, gt_flags, small_step, lam, importance,
            weighted, sweep_path, target_bpw, target_snr, target_mse, one_setting, device, threads, force):
    """Compress MODEL (a .safetensors/.npz/.pt file or a packaged model name) into a .gcb file."""
    if qp is not None and step is not None:
        raise click.UsageError("give --qp or --step, not both")
    if explicit("trellis"):
        if explicit("dq") and not dq:
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
        clashing = [f"--{o.replace('_', '-')}" for o in ("lam", "weighted", "slice_size", "gt_flags") if explicit(o)]
        if clashing:
            raise click.UsageError(f"--sweep sets {', '.join(clashing)} from the sweep; "
                                   f"do not give {'it' if len(clashing) == 1 else 'them'}")
    check_output(output, [model, importance, sweep_path], force)
    settings = api.CodingSettings.from_keywords(step=step, qp=qp, qp_density=qp_density, dq=dq, slice_size=slice_size,
                                                num_gt_flags=gt_flags, small_step=small_step, lam=lam, scan=scan,
                                                zeros=zeros)
    tensors = gio.read_model(model)
    n_weights = weights(tensors)
    per_tensor, weighting, point = None, None, None
    if sweep_path is not None:
        method = api.dq_mode(dq) if explicit("dq") or explicit("trellis") else None
        point, weighting = api.point_from_sweep(sweep_path, tensors, method=method, per_tensor=not one_setting,
                                                importance_file=importance, **targets)
        settings, per_tensor = point.coding_settings(settings), point.per_tensor(settings)
        steps = sorted(point.steps.values())
        click.echo(f"operating point from {sweep_path}: {point.method.upper()}, "
                   f"{count(len(steps), 'tensor')} at steps {steps[0]:.6g}..{steps[-1]:.6g}, "
                   f"lambda {', '.join(f'{v:g}' for v in sorted(set(point.lams.values())))}; "
                   f"predicted {point.bpw:.3f} bits/weight ({'exact' if point.exact else 'estimated'}), "
                   f"SNR {fmt_snr(point.snr_db)} dB over the swept tensors")
    elif importance is not None:
        per_tensor, weighting = importance_settings(read_importance(importance, tensors), settings, weighted=weighted)

    with timed(n_weights, "encode") as coding:
        data = api.encode(tensors, settings, per_tensor=per_tensor, importance=weighting, device=device,
                          threads=threads, progress=coding.progress)
    gio.atomic_write_bytes(output, data)

    # the SNR of what was written: decoding is far cheaper than quantizing again (the RD trellis);
    # tensor by tensor, compared as each comes, so that no second model is ever held
    swept = None
    if point is not None:
        coded = {t.name: 8 * (t.coded_bytes + t.header_bytes) for t in api.info(data).tensors if t.name in point.steps}
        swept = SnrSum()
    total = SnrSum()
    all_zero, any_weight = True, False  # of the non-empty float tensors: decoded all zero; any weight non-zero
    with timed(n_weights, "check (decode)") as check:
        from ..codec import iter_decode  # noqa: PLC0415  (loads the coder: not for --help)

        for name, decoded in iter_decode(data, threads=threads, progress=check.progress):
            original = tensors[name]
            total.add(original, decoded)
            if swept is not None and name in coded:
                swept.add(original, decoded)
            if is_float(original) and np.size(original):
                all_zero = all_zero and not np.any(decoded)
                any_weight = any_weight or bool(np.any(original))
            del decoded
    snr = total.snr_db()
    click.echo(
        f"{output}: {count(n_weights, 'weight')} in {count(len(tensors), 'tensor')} "
        f"-> {len(data):,} bytes, "
        f"{bits_per_weight(len(data), n_weights):.3f} bits/weight, "
        f"ratio {raw_bytes(tensors) / max(len(data), 1):.2f}x, "
        f"SNR {fmt_snr(snr)} dB, "
        f"{coding.throughput(n_weights)}"
    )
    _warn_if_destroyed(all_zero and any_weight, snr)
    if point is not None:
        click.echo(f"swept tensors: {sum(coded.values()) / point.numel:.3f} bits/weight, "
                   f"SNR {fmt_snr(swept.snr_db())} dB (predicted {point.bpw:.3f}, {fmt_snr(point.snr_db)} dB)")


# Below this SNR a coded model keeps almost nothing of its weights.
DESTROYED_SNR_DB = 1.0


def _warn_if_destroyed(zeroed: bool, snr: float) -> None:
    """A loud warning when the settings wiped the weights out (`zeroed`: every float weight coded
    as zero, though some were not; or an SNR near 0 dB): the command did what it was told, but
    hardly anyone means that. No float weights (SNR nan): no warning."""
    if zeroed:
        click.echo("gpucabac: warning: every float weight was coded as zero: the step is far too large for this "
                   "model; use a smaller --step or a lower --qp", err=True)
    elif snr < DESTROYED_SNR_DB:
        click.echo(f"gpucabac: warning: SNR {fmt_snr(snr)} dB: the coded model keeps almost nothing of its weights; "
                   "use a smaller --step or a lower --qp", err=True)
