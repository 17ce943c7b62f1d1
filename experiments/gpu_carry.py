"""Prepare experiments/.carry/ for a GPU machine that has no package registry.

The lent GPU machines (see the device tool) have CuPy, JAX, numba and nvcc but neither the default
model's package (83.5 MB, above what a run can carry) nor nvCOMP. This writes, into the gitignored
experiments/.carry/:

- minilm.gcb: the default model coded at QP -38 (about 21 MB; decoded there on the CPU, it is
  MiniLM as reconstructed at that step: real weights for the bit-exactness check);
- the nvidia-nvcomp-cu13 and nvidia-libnvcomp-cu13 wheels (--no-nvcomp to skip), for Python 3.12,
  fetched with pip download;

and prints the one command to run there with the device tool (carry=["experiments/.carry"]):
build, `pytest -m gpu`, gpu_check.py (bit-exactness + throughput), bench_rd.py and, as far as 4 minutes
allow, rate_term_states.py (256 states with and without the rate term, every 2-D tensor) on the GPU.

    python experiments/gpu_carry.py [--no-nvcomp] [--qp -38] [--out DIR]   # DIR: default experiments/.carry
    python experiments/gpu_carry.py --tiny --out DIR                       # smoke run, seconds

--tiny runs the same steps small, into --out (default: a temp dir; never experiments/.carry, which
a tiny file would silently replace): minilm.gcb holds only TINY_TENSORS of the default model (a
few tensors, 1-D and 2-D, coded at --qp as the full file is), the nvCOMP download is skipped (it
needs the network, and none of our code runs in it), and the size check and the printed
device command are those of the full run. So a test exercises the whole script but the download,
and the file it writes is one that read_any_model (gpu_check.py --model) decodes.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

import _common

import gpucabac
from gpucabac.io import atomic_write_bytes, read_model

CARRY = _common.EXPERIMENTS_DIR / ".carry"
NVCOMP = ["nvidia-nvcomp-cu13==6.0.0.12", "nvidia-libnvcomp-cu13==6.0.0.12"]
TINY_TENSORS = ("embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight",
                "encoder.layer.0.attention.self.query.weight")
DEVICE_COMMAND = (
    "set -o pipefail; mkdir -p $OUT/gpu; "
    "(ls experiments/.carry/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps --no-index experiments/.carry/*.whl); "
    "python3 -m pytest -q -m gpu tests 2>&1 | tail -5 | tee $OUT/gpu/pytest_gpu.txt; "
    "python3 experiments/gpu_check.py --model experiments/.carry/minilm.gcb --out $OUT/gpu 2>&1 | tail -60; "
    "python3 experiments/bench_rd.py --model experiments/.carry/minilm.gcb --out $OUT/gpu 2>&1 | tail -20; "
    "timeout 240 python3 experiments/rate_term_states.py --model experiments/.carry/minilm.gcb --all "
    "--variants 256,256+lam0.3 --qps=-30,-26,-22 --out $OUT/gpu 2>&1 | tail -20"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run: a few tensors, no nvCOMP download, into --out")
    ap.add_argument("--no-nvcomp", action="store_true")
    ap.add_argument("--qp", type=int, default=-38)
    ap.add_argument("--out", default=None, help="directory to fill (default experiments/.carry; --tiny: a temp dir)")
    args = ap.parse_args()
    carry = pathlib.Path(args.out) if args.out else (_common.out_dir(None, True) / "carry" if args.tiny else CARRY)
    carry.mkdir(parents=True, exist_ok=True)
    tensors = read_model("minilm")
    if args.tiny:
        tensors = {k: tensors[k] for k in TINY_TENSORS}
    data = gpucabac.encode(tensors, qp=args.qp)
    atomic_write_bytes(carry / "minilm.gcb", data)
    print(f"{carry / 'minilm.gcb'}: {len(data):,} bytes")
    if not (args.no_nvcomp or args.tiny):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                        "--platform", "manylinux_2_28_x86_64", "-d", str(carry), *NVCOMP], check=True)
    total = sum(p.stat().st_size for p in carry.iterdir() if p.is_file())
    print(f"{carry}: {total / 2**20:.1f} MiB in all (the device tool carries at most 64 MiB)")
    if total > 64 * 2**20:
        sys.exit("too large to carry: drop the wheels (--no-nvcomp) or raise --qp")
    print("\nOn the GPU machine (device tool `run`, carry=[\"experiments/.carry\"]):\n" + DEVICE_COMMAND)


if __name__ == "__main__":
    main()
