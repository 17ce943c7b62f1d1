"""The estimator behind experiments/minilm_bound.py: differential entropies and the model's
Shannon lower bound, against closed forms."""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))

import minilm_bound as mb  # noqa: E402


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "uniform"])
def test_differential_entropy_matches_closed_form(kind):
    rng = np.random.default_rng(1)
    b = 0.03
    x, exact = {
        "gaussian": (rng.standard_normal(1 << 20) * b, 0.5 * math.log2(2 * math.pi * math.e * b * b)),
        "laplace": (rng.laplace(0, b, 1 << 20), math.log2(2 * math.e * b)),
        "uniform": (rng.uniform(-b, b, 1 << 20), math.log2(2 * b)),
    }[kind]
    assert mb.differential_entropy(x) == pytest.approx(exact, abs=0.01)


def test_a_scale_class_lowers_the_entropy_of_a_scale_mixture():
    rng = np.random.default_rng(2)
    scales = np.where(np.arange(512) % 2 == 0, 0.01, 0.05)  # two kinds of rows
    w = rng.standard_normal((512, 256)) * scales[:, None]
    h = mb.differential_entropy(w)
    h_rows = mb.differential_entropy(w, classes=mb.scale_classes(w, 1))
    exact_given_row = 0.5 * (0.5 * math.log2(2 * math.pi * math.e * 0.01 ** 2)) + 0.5 * (0.5 * math.log2(2 * math.pi * math.e * 0.05 ** 2))
    assert h_rows == pytest.approx(exact_given_row, abs=0.02)
    assert h - h_rows > 0.3
    # the column classes carry nothing here
    assert mb.differential_entropy(w, classes=mb.scale_classes(w, 0)) == pytest.approx(h, abs=0.02)


def test_bound_of_a_gaussian_tensor_is_its_rate_distortion_function():
    sigma = 0.02
    ents = {"t": dict(numel=1000, power=sigma ** 2, h=0.5 * math.log2(2 * math.pi * math.e * sigma ** 2))}
    for snr_db in (6.0, 20.0, 40.0):
        assert mb.bound_bpw(ents, snr_db) == pytest.approx(snr_db / (20 * math.log10(2)), rel=1e-9)


def test_bound_water_fills_across_tensors():
    g = lambda s: 0.5 * math.log2(2 * math.pi * math.e * s * s)  # noqa: E731
    # a loud and a quiet tensor: at low SNR the quiet one gets no bits, at high SNR both share one D
    ents = {"loud": dict(numel=100, power=1.0, h=g(1.0)), "quiet": dict(numel=100, power=1e-6, h=g(1e-3))}
    # at 6 dB the quiet tensor keeps its variance as error and the loud one takes the rest
    d_loud = (1 + 1e-6) / 10 ** 0.6 - 1e-6
    assert mb.bound_bpw(ents, 6.0) == pytest.approx(0.5 * 0.5 * math.log2(1 / d_loud), rel=1e-6)
    d = (1 + 1e-6) / 2 / 10 ** 8.0  # 80 dB: one D below both variances
    assert mb.bound_bpw(ents, 80.0) == pytest.approx(0.5 * (0.5 * math.log2(1 / d) + 0.5 * math.log2(1e-6 / d)), rel=1e-6)
    assert mb.bound_bpw(ents, -10.0) == 0.0
