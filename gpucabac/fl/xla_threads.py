"""One CPU thread per XLA process for federated learning, unless the user chose otherwise.

XLA's multi-threaded CPU kernels sum in an order that depends on the thread count, so a
simulation (Ray actors of one CPU each) and a deployment (SuperNode processes) would train to
different bits; the clients of one machine share its cores anyway. XLA reads the flags when JAX
starts its CPU backend, so every module of gpucabac.fl that runs JAX imports this one before
JAX; a process that started JAX before keeps its threads. The core's RD quantizer never
imports it.
"""

from __future__ import annotations

import os

FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAGS}".strip()
