"""The package's layers (docs/design.md §7): every module imports only from its own layer or the
layers below it, so that data flows one way and no module reaches back up. The core import
stays light: `import gpucabac` loads neither JAX, CuPy, matplotlib nor torch."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import gpucabac

PACKAGE = pathlib.Path(gpucabac.__file__).resolve().parent

# docs/design.md §7, bottom first; a module may import from its layer and the ones above it here
LAYERS = [
    {"errors", "tables", "dtypes", "modes", "layout"},
    {"binarize", "slices", "context_init", "threads", "jit", "metrics"},
    {"quantization", "rdquant"},
    {"settings"},
    {"engines"},
    {"container"},
    {"io", "models", "importance"},
    {"codec", "sweeps", "summary"},
    {"ray_sweeps"},
    {"plotting"},
    {"fl"},
    {"cli"},
    {"__init__", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _module_of(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: pathlib.Path) -> set[str]:
    """The gpucabac modules (top-level names inside the package) that a file imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for gpucabac/x.py, 1 for gpucabac/engines/x.py
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "gpucabac":
                    parts = node.module.split(".")[1:]
                    out |= {parts[0]} if parts else {a.name for a in node.names}
            elif node.level > depth:  # reaches the package level
                if node.module:
                    out.add(node.module.split(".")[0])
                else:
                    out |= {a.name for a in node.names}
            # a relative import inside the same subpackage stays in its module
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gpucabac.")}
            if any(a.name == "gpucabac" for a in node.names):
                out.add("__init__")
    return out


def test_every_module_has_a_layer():
    modules = {_module_of(p) for p in PACKAGE.rglob("*.py")}
    assert modules == set(LEVEL), sorted(modules ^ set(LEVEL))


def test_imports_flow_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_of(path)
        for other in _imports(path) - {me}:
            if other not in LEVEL:
                wrong.append(f"{path.relative_to(PACKAGE)} imports unknown gpucabac.{other}")
            elif LEVEL[other] > LEVEL[me] and not (me == "cli" and other == "__init__"):
                wrong.append(f"{path.relative_to(PACKAGE)} ({me}) imports {other}, a layer above it")
    assert not wrong, "\n".join(wrong)


def test_the_engines_do_not_import_each_other():
    for a, b in (("cpu", "gpu"), ("gpu", "cpu")):
        tree = ast.parse((PACKAGE / "engines" / f"{a}.py").read_text(encoding="utf-8"))
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m and (m == b or m.endswith(f".{b}") or m.endswith(f"engines.{b}")) for m in names), (a, names)


HEAVY = ("jax", "cupy", "matplotlib", "torch", "numba", "ml_dtypes", "flwr", "ray", "flax")


def _heavy_after(code: str) -> list[str]:
    """The heavy libraries a fresh interpreter has loaded after running `code`."""
    probe = f"import sys\n{code}\nprint('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    loaded = r.stdout.rsplit("loaded:", 1)[-1].strip()
    return loaded.split(",") if loaded else []


def test_the_core_import_is_light():
    """`import gpucabac` loads no heavy library (the public names load on first use)."""
    assert _heavy_after("import gpucabac") == []


def test_info_and_help_start_without_the_coder(tmp_path):
    """`gpucabac info` and `--help` (of every command) import neither numba nor ml_dtypes: they
    start in a fraction of a second (issue: well under 0.5 s)."""
    import numpy as np

    path = tmp_path / "m.gcb"
    path.write_bytes(gpucabac.encode({"w": np.ones((8, 8), np.float32)}))
    commands = ("encode", "decode", "info", "demo", "sweep", "plot", "fl", "fl simulate", "fl deploy")
    for args in (["info", str(path)], ["--help"], *([*c.split(), "--help"] for c in commands)):
        code = f"from gpucabac.cli import main\ntry:\n    main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code"
        assert _heavy_after(code) == [], args


def test_every_public_name_resolves():
    """The lazily loaded public surface: every name of __all__ is there, and dir() lists it."""
    for name in gpucabac.__all__:
        assert getattr(gpucabac, name) is not None, name
    assert set(gpucabac.__all__) <= set(dir(gpucabac))
