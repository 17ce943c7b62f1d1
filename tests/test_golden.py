"""Format freeze (docs/format.md §6): the checked-in golden containers in tests/data must be
exactly what the current encoder writes for the inputs and parameters in manifest.json, and must
decode to the expected tensors. A failure here means the container layout or the encoder's
output changed: bump container.VERSION if the layout changed, and regenerate on purpose with
`python tests/make_golden.py --write`."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import gpucabac
from gpucabac import container

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("make_golden", HERE / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

MANIFEST = json.loads((HERE / "data" / "manifest.json").read_text())
CASES = {e["file"]: e for e in MANIFEST["cases"]}


def test_manifest_describes_the_cases_and_this_format():
    assert MANIFEST["format_version"] == container.VERSION == make_golden.FORMAT_VERSION
    assert sorted(CASES) == sorted(f"{n}.gcb.golden" for n in make_golden.CASES)
    modes = set()
    slice_sizes = set()
    for e in MANIFEST["cases"]:
        data = (HERE / "data" / e["file"]).read_bytes()
        assert len(data) == e["bytes"] and make_golden.sha256(data) == e["sha256"]
        info = gpucabac.info(data)
        version = container.format_version(container.parse_container(data).records)
        assert data[:8] == container.MAGIC and int.from_bytes(data[8:10], "little") == e["format_version"] == version
        modes |= {t.mode for t in info.tensors}
        slice_sizes.add(e["params"].get("slice_size", gpucabac.DEFAULT_SLICE_SIZE))
        assert {t.dtype for t in info.tensors} == {t["dtype"] for t in e["tensors"]}
    # the set covers every coding mode and the slice sizes 1, 7 and one-per-tensor
    assert modes == {"urq", "dq", "int", "raw", "dq16", "dq256"}
    scans = {t.scan for e in MANIFEST["cases"] for t in gpucabac.info((HERE / "data" / e["file"]).read_bytes()).tensors}
    assert scans == {"rows", "columns"}
    zeros = {t.zeros for e in MANIFEST["cases"] for t in gpucabac.info((HERE / "data" / e["file"]).read_bytes()).tensors}
    assert zeros == {"flags", "runs"}
    assert {1, 7, None} <= slice_sizes
    assert "bfloat16" in {t["dtype"] for e in MANIFEST["cases"] for t in e["tensors"]}


@pytest.mark.parametrize("file", sorted(CASES))
def test_reencoding_gives_the_checked_in_bytes(file):
    e = CASES[file]
    case = dict(seed=e["seed"], params=e["params"],
                tensors=[(t["name"], t["dtype"], t["shape"], t["kind"], t["scale_bits"]) for t in e["tensors"]])
    inputs = make_golden.case_inputs(case)
    fresh = gpucabac.encode(inputs, **e["params"])
    stored = (HERE / "data" / file).read_bytes()
    assert make_golden.sha256(stored) == e["sha256"], f"{file} does not match its manifest sha256"
    if fresh != stored:
        first = next((i for i, (a, b) in enumerate(zip(fresh, stored)) if a != b), min(len(fresh), len(stored)))
        pytest.fail(f"{file}: re-encoding differs from the golden file at byte {first} "
                    f"({len(fresh)} vs {len(stored)} bytes): the format or the encoder's output changed")


@pytest.mark.parametrize("file", sorted(CASES))
def test_golden_file_decodes_to_the_expected_tensors(file, tmp_path):
    e = CASES[file]
    stored = (HERE / "data" / file).read_bytes()
    case = dict(seed=e["seed"], params=e["params"],
                tensors=[(t["name"], t["dtype"], t["shape"], t["kind"], t["scale_bits"]) for t in e["tensors"]])
    inputs = make_golden.case_inputs(case)
    want = gpucabac.quantize(inputs, **e["params"])
    path = tmp_path / "g.gcb"
    path.write_bytes(stored)
    for out in (gpucabac.decode(stored), gpucabac.load(path)):
        assert list(out) == [t["name"] for t in e["tensors"]]
        for t in e["tensors"]:
            x = out[t["name"]]
            assert x.dtype == make_golden._dtype(t["dtype"]) and list(x.shape) == t["shape"]
            assert make_golden.sha256(np.ascontiguousarray(x).tobytes()) == e["decoded_sha256"][t["name"]]
            assert x.tobytes() == want[t["name"]].tobytes()
            if x.dtype.kind in "iub" or t["kind"] == "zero":
                assert x.tobytes() == inputs[t["name"]].tobytes()


def test_make_golden_check_mode_agrees(capsys):
    """The script's default (no --write) mode compares and reports, writing nothing."""
    before = {p.name: p.stat().st_mtime_ns for p in (HERE / "data").iterdir()}
    assert make_golden.main([]) == 0
    assert "golden files match" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (HERE / "data").iterdir()} == before
