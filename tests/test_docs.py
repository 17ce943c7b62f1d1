"""The documentation runs: the README's Python example and the package docstring examples."""

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
