"""experiments/fl/run.py smoke-run at --size tiny: it runs, writes JSON (every round, every
setting, the machine), a Markdown table and two figures, and `report` rebuilds the table from the
JSON alone.

NNCodec on the same updates (experiments/fl/same_updates.py): the smoke runs keep to our side
(GPUCABAC_NO_NNCODEC=1: the updates recorded, coded again by gpucabac, NNCodec skipped with its
reason), whether NNCodec's venv exists or not; `test_nncodec_codes_the_same_updates`, marked
`nncodec` and skipped without the venv (experiments/nncodec_env.py builds it), runs NNCodec's part."""

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
NNCODEC_VENV = ROOT / "experiments" / ".nncodec-venv"

try:
    from gpucabac.fl.data import load_dataset

    load_dataset("fashion_mnist")
    HAVE_DATA = True
except Exception:  # noqa: BLE001  (the reason is in the skip message)
    HAVE_DATA = False

pytestmark = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST is not fetched: bash scripts/fetch_fl_data.sh")
ROUND_KEYS = {"round", "accuracy", "loss", "upload-bytes", "download-bytes", "train-seconds", "coding-seconds"}


def _run(*args, out, nncodec=False):
    env = dict(os.environ, MPLBACKEND="Agg")
    if nncodec:
        env.pop("GPUCABAC_NO_NNCODEC", None)
    else:
        env["GPUCABAC_NO_NNCODEC"] = "1"
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
    _check_same_updates(results, ["sparse-ef", "scaled-delta"], nncodec=False)
    summary = results["summary"]
    assert summary["target-accuracy"] == pytest.approx(fedavg["rounds"][-1]["accuracy"] - 0.01)
    assert summary["methods"]["fedavg"]["ratio-vs-fedavg"] == 1.0
    md = (tmp_path / f"{stem}.md").read_text()
    assert md.startswith("# FL bidirectional (tiny)") and "| stc |" in md and "vs FedAvg" in md
    assert "## NNCodec 2.1.3 on the same updates" in md and "skipped (GPUCABAC_NO_NNCODEC is set)" in md
    assert "| scaled-delta | 2 | down | 1 |" in md
    for kind in ("rounds", "bytes"):
        assert (tmp_path / f"{stem}_accuracy_vs_{kind}.png").stat().st_size > 10_000
    (tmp_path / f"{stem}.md").unlink()
    _run("report", str(tmp_path / f"{stem}.json"), out=tmp_path)  # from the JSON alone
    assert (tmp_path / f"{stem}.md").read_text() == md


def test_unidirectional_tiny_codes_uploads_and_sends_float32_downloads(tmp_path):
    _run("unidirectional", "--size", "tiny", "--methods", "fedavg,sparse-ef", "--nncodec-methods", "none", out=tmp_path)
    results = json.loads((tmp_path / "unidirectional_vgg_fashion_mnist_iid_tiny.json").read_text())
    assert results["settings"]["downstream"] == "dense"
    fedavg, sparse = (results["methods"][m]["rounds"] for m in ("fedavg", "sparse-ef"))
    assert sparse[2]["download-bytes"] == fedavg[2]["download-bytes"] > 0  # the same raw float32 update
    assert sparse[1]["upload-bytes"] < fedavg[1]["upload-bytes"] / 5


def test_partial_tiny_sends_only_the_last_block_and_the_classifier(tmp_path):
    _run("partial", "--size", "tiny", "--methods", "fedavg,stc", "--rounds", "1", out=tmp_path)
    # off the size's 2 rounds: the name says so
    results = json.loads((tmp_path / "partial_vgg_fashion_mnist_iid_tiny_1rounds.json").read_text())
    assert results["settings"]["layers"] == "convs/3,fc1,fc2"
    assert set(results["methods"]) == {"fedavg", "stc"}
    from gpucabac.fl.config import FLConfig
    from gpucabac.fl.task import initial_params

    init = initial_params(FLConfig.from_record(results["methods"]["fedavg"]["config"]))
    sent = sum(v.size for k, v in init.items() if k.startswith(("convs/3/", "fc1/", "fc2/")))
    assert sent < sum(v.size for v in init.values())
    assert results["methods"]["fedavg"]["rounds"][1]["kept"] == 2 * sent  # two clients, every value of those layers


def _check_same_updates(results, names, *, nncodec):
    """Each recorded method's "same-updates": per round its uploads (one message per client) and
    its download, of the bytes the run sent; gpucabac's payload below its whole update; NNCodec's
    part present exactly when it ran."""
    assert results["nncodec-methods"] == names
    for name in names:
        m = results["methods"][name]
        same = m["same-updates"]
        assert [(r["round"], r["direction"]) for r in same["rounds"]] == [(1, "up"), (1, "down"), (2, "up"),
                                                                          (2, "down")]
        for r in same["rounds"]:
            entry = m["rounds"][r["round"]]
            if r["direction"] == "up":
                assert r["messages"] == 2 and r["sent-bytes"] == entry["upload-bytes"]
            else:
                assert r["messages"] == 1 and r["sent-bytes"] == entry["next-download-bytes"]
            assert 0 < r["ours-payload-bytes"] < r["ours-bytes"] and r["ours-snr-db"] > 0
            assert (r["nncodec-bytes"] is not None) == nncodec, (name, r)
        assert (same["nncodec-skipped"] is None) == nncodec
    for name, m in results["methods"].items():
        assert ("same-updates" in m) == (name in names), name


def test_nncodec_methods_must_be_coded_by_gpucabac(tmp_path):
    env = dict(os.environ, GPUCABAC_NO_NNCODEC="1")
    r = subprocess.run([sys.executable, str(RUN), "bidirectional", "--size", "tiny", "--nncodec-methods", "stc",
                        "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "only methods gpucabac codes" in r.stderr


@pytest.mark.nncodec
@pytest.mark.skipif(not NNCODEC_VENV.is_dir(), reason="no NNCodec venv (python experiments/nncodec_env.py builds it)")
def test_nncodec_codes_the_same_updates(tmp_path):
    """NNCodec 2.1.3 at its FL defaults on sparse-ef's very uploads and downloads: every payload
    decodes to its levels (the worker checks), the levels of tensors of two or more dimensions
    equal gpucabac's at the same QP, TCA takes the device's previous levels from the second
    round on, and the table shows NNCodec's bytes."""
    r = _run("bidirectional", "--size", "tiny", "--methods", "sparse-ef", "--nncodec-methods", "sparse-ef",
             out=tmp_path, nncodec=True)
    stem = "bidirectional_vgg_fashion_mnist_iid_tiny"
    results = json.loads((tmp_path / f"{stem}.json").read_text())
    _check_same_updates(results, ["sparse-ef"], nncodec=True)
    same = results["methods"]["sparse-ef"]["same-updates"]
    assert same["nncodec-version"] == "2.1.3"
    assert same["nncodec-settings"]["qp"] == same["qp"] == -26 and same["nncodec-settings"]["tca"] is True
    for row in same["rounds"]:
        assert row["nncodec-bytes"] > 0 and row["levels-differ"] == 0, row
        assert (row["nncodec-tca-ndus"] > 0) == (row["round"] > 1), row  # each device's first update has no base
        assert row["nncodec-snr-db"] == pytest.approx(row["ours-snr-db"], abs=0.5)  # same levels but 1-D tensors
    md = (tmp_path / f"{stem}.md").read_text()
    first = same["rounds"][0]
    assert f"| sparse-ef | 1 | up | 2 | {first['sent-bytes']:,} |" in md and f"| {first['nncodec-bytes']:,} |" in md
    assert "same updates, round 2 down" in r.stdout


def test_coding_time_tiny_writes_its_table(tmp_path):
    script = ROOT / "experiments" / "fl" / "coding_time.py"
    r = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", str(script), "--size", "tiny", "--out",
                        str(tmp_path)], cwd=ROOT, env=dict(os.environ, MPLBACKEND="Agg"), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"coding_time.py exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    results = json.loads((tmp_path / "coding_time_tiny.json").read_text())
    (only,) = results["results"]
    assert only["method"] == "sparse-ef" and [x["round"] for x in only["rounds"]] == [1, 2]
    for x in only["rounds"]:
        assert 0 < x["server-coding-seconds"] < x["coding-seconds"] and x["share"] == x["coding-seconds"] / x["train-seconds"]
    assert (tmp_path / "coding_time_tiny.md").read_text().startswith("# FL coding time against local training time")
