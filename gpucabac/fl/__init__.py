"""Federated learning with gpucabac: coded sparse differential updates between clients and a
server, with error feedback and adaptive filter-wise scaling (docs/design.md §8).

A layer on top of the codec (nothing below imports it):
- pytree      JAX pytrees (Flax NNX states) <-> named NumPy tensors, structure restored exactly
- update      encode_update / decode_update: differences against a base both sides hold, named
              by its digest; partial updates; per-tensor settings
- sparsify    magnitude top-k (per tensor, global), NNCodec's statistics threshold and filter-wise
              structured sparsification, random-k
- stc         sparse ternary compression (Sattler et al. 2019), the baseline, as its own stream
- feedback    error feedback: the residual a client (or the server) carries to its next round
- scaling     one scale per output filter of every conv and dense layer, trained with Optax
- models, data, train   Flax NNX CNNs, MNIST / Fashion-MNIST from packages, local training
- protocol    a round without Flower (client and server); inprocess: all rounds in one process
- flower      the Flower app (ClientApp, ServerApp, strategy): the only module importing flwr

Needs the `fl` extra: pip install 'gpucabac[fl]'.
"""
