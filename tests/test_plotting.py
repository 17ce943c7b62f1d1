"""RD figures of sweep files (gpucabac.plotting): one colour per method in every file, one marker
and the model name per file, λ=0 curves below the fronts, the model name as the default title."""

from __future__ import annotations

import numpy as np
import pytest

import gpucabac
from gpucabac import plotting

to_hex = pytest.importorskip("matplotlib.colors").to_hex  # the whole module skips without matplotlib


def _tensors(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"a.weight": (rng.standard_normal((32, 48)) * 0.02).astype(np.float32),
            "b.weight": (rng.standard_normal((48, 16)) * 0.05).astype(np.float32)}


def _sweep_file(path, seed: int, *, model: str | None, methods=("urq", "dq"), extra: dict | None = None):
    res = gpucabac.sweep(_tensors(seed), [2.0 ** -7, 2.0 ** -6, 2.0 ** -5], [0.0, 0.15], methods=methods,
                         slice_size=1024)
    if model is not None:
        res.settings["model"] = model
    res.extra.update(extra or {})
    res.to_json(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweeps")
    nnc = {"nncodec": [{"label": "NNCodec DQ", "points": [{"bpw": 3.0, "snr_db": 20.0}, {"bpw": 4.0, "snr_db": 26.0}]}],
           "reference": [{"label": "bound", "bpw": [2.0, 5.0], "snr_db": [15.0, 33.0]}]}
    return dict(a=_sweep_file(d / "sweep_a.json", 1, model="models/tiny-a.npz", extra=nnc),
                b=_sweep_file(d / "sweep_b.json", 2, model="/data/tiny-b/model.safetensors"),
                dq_only=_sweep_file(d / "dq_only.json", 3, model="tiny-c", methods=("dq",)),
                anonymous=_sweep_file(d / "no_model_here.json", 4, model=None, methods=("urq",)))


def _line(ax, *parts):
    """The one line whose label holds every part."""
    found = [ln for ln in ax.get_lines() if all(p in ln.get_label() for p in parts)]
    assert len(found) == 1, [ln.get_label() for ln in ax.get_lines()]
    return found[0]


def _front(ax, *parts):
    return _line(ax, "+ RD (front", *parts)


def _zero(ax, *parts):
    return _line(ax, "λ = 0", *parts)


def test_a_method_has_one_colour_in_every_file_and_the_methods_differ(files):
    ax = plotting.draw_sweeps([files["a"], files["b"]]).axes[0]
    colour = {(f, m): to_hex(_front(ax, f"{f}: {m}").get_color()) for f in ("tiny-a", "tiny-b") for m in ("URQ", "DQ")}
    assert colour["tiny-a", "URQ"] == colour["tiny-b", "URQ"]
    assert colour["tiny-a", "DQ"] == colour["tiny-b", "DQ"]
    assert colour["tiny-a", "URQ"] != colour["tiny-a", "DQ"]
    for f in ("tiny-a", "tiny-b"):  # the λ=0 curve in its method's colour
        for m in ("URQ", "DQ"):
            assert to_hex(_zero(ax, f"{f}: {m},").get_color()) == colour[f, m]
    # the faint per-setting dots in the method's colours, nothing else
    dots = {to_hex(c.get_facecolor()[0], keep_alpha=False) for c in ax.collections}
    assert dots == {colour["tiny-a", "URQ"], colour["tiny-a", "DQ"]}
    # fixed, not from the colour cycle: DQ alone (first and only method) keeps DQ's colour
    alone = plotting.draw_sweeps([files["dq_only"]]).axes[0]
    assert to_hex(_front(alone, "DQ").get_color()) == colour["tiny-a", "DQ"] == plotting.method_color("dq")
    assert to_hex(_front(alone, "DQ").get_color()) != to_hex(_front(ax, "tiny-a: URQ").get_color())


def test_nncodec_is_black_and_the_reference_gray(files):
    ax = plotting.draw_sweeps([files["a"]]).axes[0]
    assert to_hex(_line(ax, "NNCodec DQ").get_color()) == "#000000"
    assert to_hex(_line(ax, "bound").get_color()) == to_hex("gray")
    assert {to_hex(_front(ax, m).get_color()) for m in ("URQ", "DQ")}.isdisjoint({"#000000", to_hex("gray")})


def test_each_file_has_its_own_marker_and_its_model_name_in_the_legend(files):
    fig = plotting.draw_sweeps([files["a"], files["b"], files["dq_only"]])
    ax = fig.axes[0]
    markers = {f: {_front(ax, f"{f}: {m}").get_marker() for m in ("URQ", "DQ") if f != "tiny-c" or m == "DQ"}
               for f in ("tiny-a", "tiny-b", "tiny-c")}
    assert all(len(v) == 1 for v in markers.values())  # one marker per file ...
    assert len({v.pop() for v in markers.values()}) == 3  # ... a different one for each
    assert _front(ax, "tiny-a: URQ").get_linestyle() == "-"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        assert any(t.startswith(f"{name}: ") for t in legend), legend
    assert "tiny-a: NNCodec DQ" in legend
    # one file: the model name heads the legend instead
    one = plotting.draw_sweeps([files["a"]]).axes[0].get_legend()
    assert one.get_title().get_text() == "tiny-a"
    assert not any("tiny-a" in t.get_text() for t in one.get_texts())


def test_lambda_zero_curves_lie_below_the_fronts_thin_light_and_not_solid(files):
    ax = plotting.draw_sweeps([files["a"], files["b"]]).axes[0]
    for f in ("tiny-a", "tiny-b"):
        for m in ("URQ", "DQ"):
            front, zero = _front(ax, f"{f}: {m}"), _zero(ax, f"{f}: {m},")
            assert zero.get_zorder() < front.get_zorder()
            assert zero.get_linestyle() not in ("-", "None", "")
            assert zero.get_linewidth() < front.get_linewidth()
            assert zero.get_alpha() is not None and zero.get_alpha() < 1
            assert "λ = 0" in zero.get_label()
    assert max(c.get_zorder() for c in ax.collections) < min(ln.get_zorder() for ln in ax.get_lines())
    assert all(c.get_alpha() <= 0.3 for c in ax.collections)


def test_the_title_defaults_to_the_model_name(files):
    def title(paths, **kw):
        return plotting.draw_sweeps(paths, **kw).axes[0].get_title()

    assert title([files["a"]]) == "tiny-a"  # a recorded path shows as its file name
    assert title([files["b"]]) == "tiny-b"  # a generic model.safetensors as its folder's name
    assert title([files["anonymous"]]) == "no_model_here"  # nothing recorded: the file stem
    assert title([files["a"], files["b"]]) == "tiny-a vs tiny-b"
    assert title([files["a"], files["a"]]) == "tiny-a"
    assert title([files["a"]], title="My figure") == "My figure"
    ax = plotting.draw_sweeps([files["a"], files["a"]]).axes[0]  # the same model twice: told apart
    assert len({ln.get_label() for ln in ax.get_lines()}) == len(ax.get_lines())


def test_model_name_and_default_title():
    assert plotting.model_name({"model": "minilm"}, "x/rd.json") == "minilm"
    assert plotting.model_name({"model": "/m/bert-base.pt"}, "rd.json") == "bert-base"
    assert plotting.model_name({"model": "hub/all-MiniLM-L6-v2/model.safetensors"}, "rd.json") == "all-MiniLM-L6-v2"
    assert plotting.model_name({"model": "tiny random"}, "rd.json") == "tiny random"
    assert plotting.model_name({"model": "llama-3.1"}, "rd.json") == "llama-3.1"
    assert plotting.model_name({}, "some/dir/rd_run.json") == "rd_run"
    assert plotting.model_name({"model": "  "}, "rd_run.json") == "rd_run"
    assert plotting.default_title(["a", "b", "a"]) == "a vs b"
    assert plotting.default_title(["a", "b", "c", "d"]) == "RD curves"


def test_plot_sweeps_writes_the_drawn_figure(files, tmp_path, monkeypatch):
    out = tmp_path / "rd.png"
    plotting.plot_sweeps([files["a"], files["b"]], out)
    assert out.read_bytes()[:4] == b"\x89PNG"
    captured = []
    monkeypatch.setattr(plotting, "save_figure_atomic", lambda fig, path: captured.append((fig, path)))
    plotting.plot_sweeps([files["a"]], tmp_path / "x.svg", title="T")
    ((fig, path),) = captured
    assert path == tmp_path / "x.svg" and fig.axes[0].get_title() == "T"
    with pytest.raises(gpucabac.InputError, match="no sweep files"):
        plotting.draw_sweeps([])


def test_cli_sweep_records_the_model_and_plot_titles_with_it(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from gpucabac import cli
    from gpucabac import io as gio

    gio.write_model(tmp_path / "tinynet.npz", _tensors(5))
    r = CliRunner().invoke(cli.main, ["sweep", str(tmp_path / "tinynet.npz"), "-o", str(tmp_path / "s.json"),
                                      "--qp-range", "-30:-29", "--lams", "0,0.1", "--slice-size", "1024"])
    assert r.exit_code == 0, r.output
    captured = []
    monkeypatch.setattr(plotting, "save_figure_atomic", lambda fig, path: captured.append(fig))
    r = CliRunner().invoke(cli.main, ["plot", str(tmp_path / "s.json"), "-o", str(tmp_path / "rd.png")])
    assert r.exit_code == 0, r.output
    assert captured[0].axes[0].get_title() == "tinynet"


def test_every_plot_option_has_help():
    import click
    from click.testing import CliRunner

    from gpucabac.cli.plot import command

    options = [p for p in command.params if isinstance(p, click.Option)]
    assert {o.name for o in options} >= {"output", "rate", "metric", "title", "force"}
    assert [o.name for o in options if not (o.help or "").strip()] == []
    r = CliRunner().invoke(command, ["--help"])
    assert r.exit_code == 0 and "SWEEPS" in r.output and "model name" in r.output
