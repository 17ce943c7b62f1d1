"""Golden containers that freeze the format (docs/format.md §6): tiny inputs from a seeded generator, the
encode parameters, and the exact bytes gpucabac writes for them.

    python tests/make_golden.py            # check: re-encode every case, compare with tests/data
    python tests/make_golden.py --write    # regenerate tests/data/*.gcb.golden and manifest.json

Only --write touches files, and only on purpose: a changed byte in a golden file means the format
(or the encoder's decisions) changed, which needs a version bump or a deliberate regeneration.
tests/test_golden.py imports this module and runs the same comparison.

The inputs come from splitmix64 in pure Python integer arithmetic, turned into dyadic rationals
(integers / 2**k), so they are exact in every float dtype's conversion and cannot drift with
NumPy's random streams or a platform's libm. (The files end in .gcb.golden because .gitignore
ignores *.gcb.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import ml_dtypes
import numpy as np

import gpucabac

DATA = pathlib.Path(__file__).resolve().parent / "data"
MANIFEST = DATA / "manifest.json"
FORMAT_VERSION = 3  # the newest; each file has the version its modes need (docs/format.md)
M64 = (1 << 64) - 1

# name -> (seed, encode parameters, tensors as (name, dtype, shape, kind, scale_bits))
# kinds: "bell" = sum of three uniform integers in [-2**11, 2**11) / 2**scale_bits (peaked, dyadic);
#        "int" = uniform integers in the dtype's range, clipped to +-2**scale_bits;
#        "wide" = like int, plus the dtype's extremes; "bool"; "zero";
#        "sparse" = "bell" where the generator's next draw is 0 mod 32, else 0 (for float dtypes),
#        or a uniform integer in +-2**scale_bits there (integer dtypes).
CASES: dict[str, dict] = {
    "urq_s7": dict(seed=1, params=dict(qp=-32, slice_size=7), tensors=[
        ("conv.weight", "float32", [4, 3, 3, 3], "bell", 15),
        ("fc.weight", "float32", [8, 12], "bell", 14),
        ("fc.bias", "float32", [12], "bell", 17),
    ]),
    "dq_s1": dict(seed=2, params=dict(qp=-30, dq=True, slice_size=1), tensors=[
        ("w", "float32", [6, 9], "bell", 14),
    ]),
    "dq_one_slice_n20": dict(seed=3, params=dict(qp=-36, dq=True, slice_size=None, num_gt_flags=20), tensors=[
        ("w", "float32", [10, 20], "bell", 13),
        ("b", "float32", [20], "bell", 16),
    ]),
    "int_n1": dict(seed=4, params=dict(slice_size=7, num_gt_flags=1), tensors=[
        ("i8", "int8", [3, 5], "wide", 7),
        ("u16", "uint16", [10], "int", 9),
        ("i32", "int32", [4, 4], "int", 20),
        ("flags", "bool", [2, 7], "bool", 0),
        ("big", "int64", [3], "wide", 62),
        ("scalar", "int32", [], "int", 4),
    ]),
    "raw_lossless": dict(seed=5, params=dict(qp=-28, slice_size=None, small_step="lossless"), tensors=[
        ("ln.weight", "float32", [16], "bell", 10),
        ("ln.bias", "float16", [16], "bell", 12),
        ("scale", "float64", [], "bell", 8),
        ("proj", "float32", [5, 8], "bell", 13),
    ]),
    "bf16_n0": dict(seed=6, params=dict(qp=-34, slice_size=4096, num_gt_flags=0), tensors=[
        ("w", "bfloat16", [12, 10], "bell", 14),
        ("h", "float16", [5, 6], "bell", 12),
        ("d", "float64", [3, 7], "bell", 15),
        ("empty", "float32", [0, 4], "zero", 0),
        ("zeros", "float32", [2, 3], "zero", 0),
    ]),
    # format version 2: the larger DQ trellises
    "dq16_s7": dict(seed=7, params=dict(qp=-32, dq=16, slice_size=7), tensors=[
        ("conv.weight", "float32", [4, 3, 3, 3], "bell", 15),
        ("fc.weight", "float32", [8, 12], "bell", 14),
    ]),
    "dq256_one_slice": dict(seed=8, params=dict(qp=-34, dq=256, slice_size=None), tensors=[
        ("w", "float32", [9, 14], "bell", 13),
    ]),
    "dq_columns_s9": dict(seed=9, params=dict(qp=-32, dq=True, slice_size=9, scan="columns"), tensors=[
        ("conv.weight", "float32", [4, 3, 2, 2], "bell", 15),
        ("fc.weight", "bfloat16", [5, 7], "bell", 14),
        ("fc.bias", "float32", [7], "bell", 17),
    ]),
    # format version 3: zero runs
    "urq_runs_s64": dict(seed=10, params=dict(qp=-32, slice_size=64, zeros="runs"), tensors=[
        ("conv.weight", "float32", [8, 4, 3, 3], "sparse", 13),
        ("fc.weight", "float32", [40, 16], "sparse", 12),
        ("counts", "int16", [150], "sparse", 9),
        ("zeros", "float32", [70, 2], "zero", 0),
    ]),
    "dq_runs_auto_whole": dict(seed=11, params=dict(qp=-34, dq=True, slice_size=None, zeros="auto"), tensors=[
        ("sparse.weight", "float32", [60, 80], "sparse", 13),
        ("dense.weight", "float32", [6, 9], "bell", 14),
    ]),
}


def _splitmix64(state: int):
    while True:
        state = (state + 0x9E3779B97F4A7C15) & M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        yield z ^ (z >> 31)


def _dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def make_tensor(seed: int, index: int, dtype: str, shape, kind: str, scale_bits: int) -> np.ndarray:
    gen = _splitmix64((seed << 16) + index)
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    dt = _dtype(dtype)
    if kind == "zero":
        return np.zeros(shape, dt)
    if kind == "bool":
        return np.array([next(gen) & 1 for _ in range(n)], bool).reshape(shape)
    if kind == "sparse":
        keep = [next(gen) % 32 == 0 for _ in range(n)]
        if np.issubdtype(dt, np.integer):
            vals = [((next(gen) % (2 << scale_bits)) - (1 << scale_bits)) if k else 0 for k in keep]
            return np.array(vals, np.int64).astype(dt).reshape(shape)
        vals = [sum((next(gen) >> 52) - 2048 for _ in range(3)) if k else 0 for k in keep]
        return (np.array(vals, np.float64) / 2.0**scale_bits).astype(dt).reshape(shape)
    if kind in ("int", "wide"):
        info = np.iinfo(dt)
        lo, hi = max(int(info.min), -(1 << scale_bits)), min(int(info.max), 1 << scale_bits)
        vals = [lo + next(gen) % (hi - lo + 1) for _ in range(n)]
        if kind == "wide" and n >= 2:
            vals[0], vals[-1] = int(info.max), int(info.min)
        return np.array(vals, dtype=object).astype(dt).reshape(shape)
    assert kind == "bell"
    vals = [sum((next(gen) >> 52) - 2048 for _ in range(3)) for _ in range(n)]  # 12-bit uniforms
    return (np.array(vals, np.float64) / 2.0**scale_bits).astype(dt).reshape(shape)


def case_inputs(case: dict) -> dict[str, np.ndarray]:
    return {name: make_tensor(case["seed"], i, dtype, shape, kind, bits)
            for i, (name, dtype, shape, kind, bits) in enumerate(case["tensors"])}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_case(name: str, case: dict) -> tuple[bytes, dict]:
    """(container bytes, manifest entry) for one case."""
    data = gpucabac.encode(case_inputs(case), **case["params"])
    decoded = gpucabac.decode(data)
    entry = dict(
        file=f"{name}.gcb.golden", format_version=int.from_bytes(data[8:10], "little"),
        seed=case["seed"], params=case["params"],
        tensors=[dict(name=n, dtype=d, shape=s, kind=k, scale_bits=b) for n, d, s, k, b in case["tensors"]],
        bytes=len(data), sha256=sha256(data),
        decoded_sha256={k: sha256(np.ascontiguousarray(v).tobytes()) for k, v in decoded.items()},
    )
    return data, entry


def manifest() -> dict:
    return dict(
        format_version=FORMAT_VERSION,
        generator="splitmix64(seed << 16 + tensor index); 'bell' = sum of three (x >> 52) - 2048, / 2**scale_bits",
        regenerate="python tests/make_golden.py --write",
        cases=[build_case(name, case)[1] for name, case in CASES.items()],
    )


def check() -> list[str]:
    """Problems found comparing freshly encoded cases with tests/data (empty when all match)."""
    problems = []
    if not MANIFEST.exists():
        return [f"{MANIFEST} is missing"]
    stored = json.loads(MANIFEST.read_text())
    if stored.get("format_version") != FORMAT_VERSION:
        problems.append(f"manifest format_version {stored.get('format_version')} != {FORMAT_VERSION}")
    fresh = manifest()
    if stored["cases"] != fresh["cases"]:
        problems.append("manifest entries differ from what the current encoder produces")
    for entry in stored["cases"]:
        path = DATA / entry["file"]
        if not path.exists() or sha256(path.read_bytes()) != entry["sha256"]:
            problems.append(f"{path.name}: missing or its sha256 differs from the manifest")
    return problems


def write() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, case in CASES.items():
        data, entry = build_case(name, case)
        (DATA / entry["file"]).write_bytes(data)
        entries.append(entry)
    m = manifest()
    assert m["cases"] == entries
    MANIFEST.write_text(json.dumps(m, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="regenerate the golden files and manifest.json")
    args = ap.parse_args(argv)
    if args.write:
        write()
        print(f"wrote {len(CASES)} golden containers and {MANIFEST}")
        return 0
    problems = check()
    for p in problems:
        print("MISMATCH:", p)
    print("golden files match" if not problems else f"{len(problems)} problem(s); --write regenerates on purpose")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
