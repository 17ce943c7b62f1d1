"""`python -m gpucabac`: the gpucabac command."""

from .cli import main

main(prog_name="gpucabac")
