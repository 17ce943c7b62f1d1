"""experiments/fl/run.py smoke-run at --size tiny: it runs, writes JSON (every round, every
setting, the machine), a Markdown table and two figures, and `report` rebuilds the table from the
JSON alone."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("flax")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ROOT / "experiments" / "fl" / "run.py"

try:
    from gpucabac.fl.data import load_dataset

    load_dataset("fashion_mnist")
    HAVE_DATA = True
except Exception:  # noqa: BLE001  (the reason is in the skip message)
    HAVE_DATA = False

pytestmark = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST is not fetched: bash scripts/fetch_fl_data.sh")
ROUND_KEYS = {"round", "accuracy", "loss", "upload-bytes", "download-bytes", "train-seconds", "coding-seconds"}


def _run(*args, out):
    env = dict(os.environ, MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", str(RUN), *args, "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"run.py {args} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def test_bidirectional_tiny_writes_json_table_and_figures(tmp_path):
    _run("bidirectional", "--size", "tiny", out=tmp_path)
    stem = "bidirectional_vgg_fashion_mnist_iid_tiny"
    results = json.loads((tmp_path / f"{stem}.json").read_text())
    assert set(results["methods"]) == {"fedavg", "gpucabac-dense", "sparse", "sparse-ef", "scaled-delta",
                                       "scaled-filter", "stc"}
    assert results["machine"]["git_commit"] and results["machine"]["date"] and results["settings"]["downstream"] == "coded"
    for name, m in results["methods"].items():
        assert [r["round"] for r in m["rounds"]] == [0, 1, 2]
        assert all(ROUND_KEYS <= set(r) for r in m["rounds"][1:]), name
        assert m["rounds"][1]["download-bytes"] == 0 and m["rounds"][2]["download-bytes"] > 0  # clients start at the seed
        assert m["rounds"][2]["download-bytes"] == 2 * m["rounds"][1]["next-download-bytes"]  # both clients got it
        assert m["rounds"][1]["upload-bytes"] == sum(c["upload-bytes"] for c in m["rounds"][1]["clients-detail"])
    fedavg, stc = results["methods"]["fedavg"], results["methods"]["stc"]
    assert stc["rounds"][1]["upload-bytes"] < fedavg["rounds"][1]["upload-bytes"] / 10
    summary = results["summary"]
    assert summary["target-accuracy"] == pytest.approx(fedavg["rounds"][-1]["accuracy"] - 0.01)
    assert summary["methods"]["fedavg"]["ratio-vs-fedavg"] == 1.0
    md = (tmp_path / f"{stem}.md").read_text()
    assert md.startswith("# FL bidirectional (tiny)") and "| stc |" in md and "vs FedAvg" in md
    for kind in ("rounds", "bytes"):
        assert (tmp_path / f"{stem}_accuracy_vs_{kind}.png").stat().st_size > 10_000
    (tmp_path / f"{stem}.md").unlink()
    _run("report", str(tmp_path / f"{stem}.json"), out=tmp_path)  # from the JSON alone
    assert (tmp_path / f"{stem}.md").read_text() == md


def test_partial_tiny_sends_only_the_last_block_and_the_classifier(tmp_path):
    _run("partial", "--size", "tiny", "--methods", "fedavg,stc", "--rounds", "1", out=tmp_path)
    results = json.loads((tmp_path / "partial_vgg_fashion_mnist_iid_tiny.json").read_text())
    assert results["settings"]["layers"] == "convs/3,fc1,fc2"
    assert set(results["methods"]) == {"fedavg", "stc"}
    from gpucabac.fl.config import FLConfig
    from gpucabac.fl.task import initial_params

    init = initial_params(FLConfig.from_record(results["methods"]["fedavg"]["config"]))
    sent = sum(v.size for k, v in init.items() if k.startswith(("convs/3/", "fc1/", "fc2/")))
    assert sent < sum(v.size for v in init.values())
    assert results["methods"]["fedavg"]["rounds"][1]["kept"] == 2 * sent  # two clients, every value of those layers
