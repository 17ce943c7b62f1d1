"""`gpucabac fl simulate|deploy`: federated learning with coded updates, in Flower's simulation
engine or as a real deployment on this machine (needs the fl extra)."""

from __future__ import annotations

import dataclasses
import pathlib

import click

from ..fl.config import DATASETS, DOWNSTREAM, METHODS, PLACEMENTS, SPARSIFIERS, FLConfig
from ._common import check_output, force_option

_DEFAULT = FLConfig()
_HELP = {
    "method": "dense: float32 FedAvg (the baseline); coded: dense differences coded at the QP; sparse: sparsified, "
              "coded updates; scaled: sparse plus one trained scale per output filter; stc: sparse ternary "
              "compression (Sattler et al. 2019).",
    "sparsifier": "How updates are sparsified: magnitude top-k per tensor or global, NNCodec's statistics threshold, "
                  "or random-k (a control).",
    "density": "The fraction of an update's entries kept (1% = 99% sparsity).",
    "error_feedback": "Keep what an update left out for the next one (clients and server).",
    "placement": "Where scales act: delta = w + s*dw (the differential filter), filter = s*(w + dw) (NNCodec's LSA).",
    "scale_steps": "Adam steps that train the scales on the client's data.",
    "qp": "QP of the coded differences (step 2^(QP/4)).",
    "dq": "Dependent (trellis) quantization of the differences.",
    "slice_size": "Values per slice of a coded difference (default: one slice per tensor, the cheapest for "
                  "sparse updates).",
    "downstream": "coded: the server codes its update to the clients as the method codes uploads; dense: it sends "
                  "float32.",
    "downstream_density": "The fraction of the server's update it sends (default: density x clients per round).",
    "layers": "Comma-separated name prefixes of the tensors trained and sent (a partial update; default all).",
    "model": "The client model (Flax NNX).",
    "model_size": "tiny (tests) or small (runs; VGG small has 1.0 M parameters).",
    "dataset": "The image data (scripts/fetch_fl_data.sh fetches it).",
    "alpha": "Dirichlet alpha of a non-IID split (default: IID).",
    "samples_per_client": "At most this many training samples per client (default: its whole partition).",
    "test_samples": "Evaluate on the first N test images (default: all 10,000).",
    "epochs": "Local epochs per round.",
    "batch_size": "Local batch size.",
    "lr": "Local learning rate (Adam).",
    "num_rounds": "Federated rounds.",
    "num_clients": "Clients (partitions of the data; one SuperNode each).",
    "fraction_train": "The fraction of the clients that train in a round (a seeded sample).",
    "seed": "Seed of the model, the split, the sampling and the local training.",
}
_CHOICES = {"method": METHODS, "sparsifier": SPARSIFIERS, "placement": PLACEMENTS, "downstream": DOWNSTREAM,
            "dataset": DATASETS, "model": ("vgg", "resnet", "mobilenet"), "model_size": ("tiny", "small")}


def _fl_options(fn):
    """One option per FLConfig field, its default shown."""
    for field in reversed(dataclasses.fields(FLConfig)):
        name, default = field.name, getattr(_DEFAULT, field.name)
        flag = "--" + name.replace("_", "-")
        kwargs = dict(help=_HELP[name], show_default=default not in (None, ()))
        if isinstance(default, bool):
            fn = click.option(f"{flag}/--no-{name.replace('_', '-')}", name, default=default, **kwargs)(fn)
        elif name in _CHOICES:
            fn = click.option(flag, name, type=click.Choice(_CHOICES[name]), default=default, **kwargs)(fn)
        elif name == "layers":
            fn = click.option(flag, name, default="", **kwargs)(fn)
        else:
            kind = float if name in ("density", "lr", "fraction_train", "alpha", "downstream_density") else int
            fn = click.option(flag, name, type=kind, default=default, **kwargs)(fn)
    return fn


def _config(options: dict) -> FLConfig:
    options = dict(options)
    options["layers"] = tuple(p.strip() for p in options["layers"].split(",") if p.strip())
    return FLConfig(**options)


def _outputs(log, record, force):
    check_output(log, [], force)
    if record is not None and record.exists() and any(record.iterdir()) and not force:
        raise click.UsageError(f"{record} exists and is not empty; give --force (-f) to write into it")


@click.group(name="fl")
def command():
    """Federated learning with gpucabac-coded updates (Flower; needs the fl extra).

    Clients train a Flax CNN on their part of MNIST or Fashion-MNIST and send sparse differential
    updates, coded with gpucabac, with error feedback and optional filter-wise scales; the server
    averages them and codes its update back. Every round prints the accuracy, the bytes sent
    each way and the coding time against the training time."""


def _common(fn):
    fn = click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
                      default=pathlib.Path("fl_log.json"), show_default=True,
                      help="JSON log of the run: its settings and every round's metrics.")(fn)
    fn = click.option("--record", "record_dir", type=click.Path(file_okay=False, path_type=pathlib.Path), default=None,
                      help="Keep every bitstream and the final model (final.npz) in this folder.")(fn)
    return force_option(_fl_options(fn))


@command.command(name="simulate")
@_common
def simulate(log_path, record_dir, force, **options):
    """Run the federation in Flower's simulation engine (Ray) on this machine."""
    config = _config(options)
    _outputs(log_path, record_dir, force)
    from ..fl.simulation import simulate as run  # noqa: PLC0415  (flwr, Ray and JAX load here)

    run(config, log_path=log_path, record_dir=record_dir, echo=click.echo)
    click.echo(f"{log_path}: written")


@command.command(name="deploy")
@_common
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=1800, show_default=True,
              help="Stop everything after this many seconds.")
def deploy(log_path, record_dir, force, timeout_s, **options):
    """Run the federation as a real deployment: a SuperLink and one SuperNode per client on
    127.0.0.1, the app started with `flwr run`; every process is stopped at the end."""
    config = _config(options)
    _outputs(log_path, record_dir, force)
    from ..fl.deploy import deploy as run  # noqa: PLC0415

    run(config, log_path=log_path, record_dir=record_dir, timeout_s=timeout_s, echo=click.echo)
    click.echo(f"{log_path}: written")
