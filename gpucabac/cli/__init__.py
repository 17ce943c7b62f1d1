"""The `gpucabac` command (also `python -m gpucabac`): encode, decode, info, demo, sweep, plot, fl.

One module per command: it parses, calls one library function and prints. Every problem with
the user's files or settings (a GpucabacError or OSError) ends the command with
`gpucabac: error: ...` on stderr and exit status 1; click's own usage errors keep status 2.
Progress bars go to stderr, and only on a terminal for work that takes more than a moment.
"""

from __future__ import annotations

import click

from ._common import Group


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("gpucabac")
    except PackageNotFoundError:
        return "unknown (not installed)"


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="gpucabac")
@click.option("--quiet", "-q", is_flag=True, help="No progress output (errors and results still print).")
def main(quiet: bool) -> None:
    """Slice-parallel DeepCABAC coding of neural-network weights (.gcb files)."""


from . import decode, demo, encode, fl, info, plot, sweep  # noqa: E402  (each adds its command to main)

for _module in (encode, decode, info, demo, sweep, plot, fl):
    main.add_command(_module.command)

__all__ = ["main"]
