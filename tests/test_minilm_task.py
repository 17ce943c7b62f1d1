"""The JAX MiniLM of experiments/_minilm.py against sentence-transformers' own embeddings.

tests/data/minilm_embeddings.npz was written once with sentence-transformers 6.2.0 and torch
2.13.0 (CPU) from the same weights; the task-quality experiment (experiments/minilm_task.py)
is only meaningful if our forward pass reproduces them."""

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import _minilm  # noqa: E402

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def weights():
    return _minilm.float_weights()


def test_embeddings_match_sentence_transformers(weights):
    golden = np.load(ROOT / "tests" / "data" / "minilm_embeddings.npz")
    ids, mask = _minilm.tokenize([str(s) for s in golden["sentences"]])
    ours = np.asarray(_minilm.embed(weights, ids, mask))
    np.testing.assert_allclose(ours, golden["embeddings"], atol=2e-5)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_an_embedding(weights):
    short, long = "Compressed weights.", "A much longer sentence that forces every shorter one in the batch to be padded."
    ids, mask = _minilm.tokenize([short, long])
    alone_ids, alone_mask = _minilm.tokenize([short])
    assert ids.shape[1] > alone_ids.shape[1]
    np.testing.assert_allclose(np.asarray(_minilm.embed(weights, ids, mask))[0],
                               np.asarray(_minilm.embed(weights, alone_ids, alone_mask))[0], atol=2e-6)


def test_task_check_scores_the_original_as_one_and_damage_below(weights):
    check = _minilm.TaskCheck(weights, ["Return the number of items in a container.", "Close the file."])
    assert check.cosine({}) == pytest.approx(1.0, abs=1e-6)
    coarse = {k: np.round(v / 2**-4) * 2**-4 for k, v in weights.items()}
    assert check.cosine(coarse) < 0.95


def test_sentence_sets_are_disjoint_halves():
    cal, held_out = _minilm.sentences()
    assert len(cal) == len(held_out) == 320
    assert not set(cal) & set(held_out)
