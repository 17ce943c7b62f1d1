"""The documentation runs: the README's Python example, its command lines' options and the package
docstring examples."""

import doctest
import pathlib
import re

import gpucabac

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_package_docstring_examples():
    result = doctest.testmod(gpucabac, raise_on_error=False)
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_names_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "bash scripts/setup.sh --torch && .venv/bin/python -m pytest -q"
    assert command in readme and command in ci


def test_readme_command_lines_use_real_options():
    from gpucabac import cli

    text = (ROOT / "README.md").read_text()
    blocks = [re.sub(r"\\\n\s*", " ", b) for b in re.findall(r"```sh\n(.*?)```", text, flags=re.S)]  # join continued lines
    lines = [ln for block in blocks for ln in block.splitlines()]
    checked = 0
    for line in lines:
        words = line.split("#")[0].split()
        if words[:1] != ["gpucabac"] or len(words) < 2:
            continue
        command, rest = cli.main.commands.get(words[1]), words[2:]
        assert command is not None, f"README: no command {words[1]!r} in: {line}"
        while getattr(command, "commands", None) and rest and rest[0] in command.commands:  # a group's subcommand
            command, rest = command.commands[rest[0]], rest[1:]
        options = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for w in rest:
            if w.startswith("--"):
                assert w.split("=")[0] in options, f"README: gpucabac {words[1]} has no option {w} (in: {line})"
        checked += 1
    assert checked >= 5
