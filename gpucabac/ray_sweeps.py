"""RD sweeps over a Ray cluster: `RayExecutor`, an executor for `gpucabac.sweep` / `sweep_models`.

The sweep cuts its work into (model, tensor chunk, grid chunk) tasks (`sweeps.SweepTask`); this
executor puts every tensor chunk into Ray's object store once (ray.put, shared by the tasks of
every method and grid chunk that read it), submits one Ray task per sweep task and yields each
task's rows as it finishes. Every slice is quantized and coded on its own, so the rows are those
of a local run, to the bit, on workers of the same kind (XLA's CPU and GPU code may round
differently). A task whose worker dies (a crash, a lost node, Ray's out-of-memory killer) or
that raises anything but a GpucabacError is resubmitted, reported through `on_retry`, up to
`retries` times, then fails the sweep with a SweepTaskError that names it: never a missing row.

ray (the `ray` extra) is imported when a run starts, not with this module: `import gpucabac`
and `gpucabac sweep --help` stay light.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence

from .errors import GpucabacError, InputError, SweepTaskError
from .sweeps import SweepTask, run_task

# the failures of a worker or node rather than of the task's code: worth another attempt
_SYSTEM_FAILURES = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OutOfMemoryError",
                    "LocalRayletDiedError", "RaySystemError", "ObjectFetchTimedOutError")


def _ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError as e:
        raise InputError("the Ray executor needs ray: pip install 'gpucabac[ray]'") from e
    return ray


def _remote_task(task: SweepTask, chunk: dict, common: dict, attempt: int, before_task) -> dict[str, list[dict]]:
    """What a Ray worker runs: `run_task`, after the fault-injection hook."""
    if before_task is not None:
        before_task(task, attempt)
    return run_task(task, chunk, common)


class RayExecutor:
    """Runs a sweep's tasks on a Ray cluster.

    `address`: None to use the Ray session this process has already started or joined (else a
    new local instance), "local" for a new local instance on this machine, "auto" for the
    cluster running on this machine (`ray start --head`), or a cluster's address ("host:port",
    "ray://host:10001"); gpucabac must be installed on every node. A Ray session this process
    has already started or joined is used whatever the address; one this executor started is
    shut down when its run ends. `init_kwargs` go to ray.init.

    Each task asks Ray for `num_cpus` and `num_gpus` (a whole GPU per task: JAX claims most of
    a GPU's memory per process unless XLA_PYTHON_CLIENT_PREALLOCATE=false in the workers'
    environment). The work is cut into about `tasks_per_slot` tasks per task slot of the
    cluster, one grid index each while that gives enough tasks (every task then has the same
    number of steps, so a worker compiles few batch shapes of each method's quantizer), else
    chunks of tensors too; `tensor_chunk` (weights) and `steps_chunk` (grid indices) set the cut yourself.

    `retries`: how many times a failed task is resubmitted; `on_retry(task, attempt, error)`
    hears of every failed attempt that is, and `failures` lists (task, attempt, error) of the
    last run's. `before_task(task, attempt)` runs in the worker before each attempt: a fault
    injection hook for tests (it must be picklable by Ray)."""

    def __init__(self, address: str | None = None, *, num_cpus: float = 1, num_gpus: float = 0, retries: int = 3,
                 tasks_per_slot: int = 4, tensor_chunk: int | None = None, steps_chunk: int | None = None,
                 on_retry: Callable[[SweepTask, int, BaseException], None] | None = None,
                 init_kwargs: Mapping | None = None, before_task: Callable[[SweepTask, int], None] | None = None):
        if address is not None and (not isinstance(address, str) or not address.strip()):
            raise InputError(f"RayExecutor: address must be None, 'local', 'auto' or a cluster address, got {address!r}")
        for what, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InputError(f"RayExecutor: {what} must be a number >= 0, got {v!r}")
        if num_cpus == 0 and num_gpus == 0:
            raise InputError("RayExecutor: num_cpus and num_gpus are both 0; a task needs a CPU or a GPU")
        for what, v, low in (("retries", retries, 0), ("tasks_per_slot", tasks_per_slot, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"RayExecutor: {what} must be an integer >= {low}, got {v!r}")
        for what, v in (("tensor_chunk", tensor_chunk), ("steps_chunk", steps_chunk)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"RayExecutor: {what} must be a positive integer or None, got {v!r}")
        self.address = None if address is None else address.strip()
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.retries, self.tasks_per_slot = retries, tasks_per_slot
        self.tensor_chunk, self.steps_chunk = tensor_chunk, steps_chunk
        self.on_retry, self.before_task = on_retry, before_task
        self.init_kwargs = dict(init_kwargs or {})
        self.failures: list[tuple[SweepTask, int, str]] = []
        self._started = False

    def _connect(self):
        ray = _ray()
        if ray.is_initialized():  # a second ray.init in one process fails: the session there is the one to use
            return ray
        kwargs = dict(self.init_kwargs)
        kwargs.setdefault("include_dashboard", False)
        kwargs.setdefault("log_to_driver", True)
        try:
            with warnings.catch_warnings():
                # Ray's tip that it may stop hiding GPUs from tasks that ask for none: hiding them is what
                # keeps a CPU task on the CPU, with a local CPU run's numbers
                warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
                ray.init(address=None if self.address in (None, "local") else self.address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            hint = " (start one with `ray start --head`, or use 'local' for an instance of this process)" \
                if self.address == "auto" else ""
            raise InputError(f"RayExecutor: cannot join the Ray cluster at {self.address!r}{hint}: "
                             f"{type(e).__name__}: {e}") from e
        self._started = True
        return ray

    def close(self) -> None:
        """Shut down the Ray session this executor started (a joined cluster keeps running)."""
        if self._started:
            _ray().shutdown()
            self._started = False

    def slots(self) -> int:
        """How many tasks the cluster runs at once, by its CPUs and GPUs and each task's ask."""
        res = self._connect().cluster_resources()
        fits = [res.get(kind, 0.0) / ask for kind, ask in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if ask > 0]
        n = int(min(fits) + 1e-9) if fits else 0
        if n < 1:
            raise InputError(f"RayExecutor: the cluster ({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs) "
                             f"cannot run a task asking for {self.num_cpus:g} CPUs and {self.num_gpus:g} GPUs")
        return n

    def chunking(self, numel: int, n_steps: int, n_lams: int, n_methods: int) -> tuple[int | None, int | None]:
        """(tensor_chunk, steps_chunk): the given ones, else about tasks_per_slot tasks per slot."""
        if self.tensor_chunk is not None or self.steps_chunk is not None:
            return self.tensor_chunk, self.steps_chunk
        want = self.tasks_per_slot * self.slots()
        per_tensor_chunk = n_steps * n_methods  # the tasks of one grid index each
        if per_tensor_chunk >= want:
            return None, 1
        parts = math.ceil(want / per_tensor_chunk)
        return max(1, math.ceil(numel / parts)), 1

    def run(self, tasks: Sequence[SweepTask], chunks: Sequence[dict], common: dict,
            progress: Callable[[int], None] | None = None):
        """Yields (task, its rows per tensor) as tasks finish; `progress` hears of each finished
        task's work units."""
        ray = self._connect()
        self.failures = []
        system = tuple(getattr(ray.exceptions, n) for n in _SYSTEM_FAILURES if hasattr(ray.exceptions, n))
        # Ray's own retries are silent; resubmitting here is what lets every failure be reported
        remote = ray.remote(_remote_task).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=0)
        pending: dict = {}
        try:
            refs = [ray.put(c) for c in chunks]
            for task in tasks:
                pending[remote.remote(task, refs[task.chunk], common, 0, self.before_task)] = (task, 0)
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task, attempt = pending.pop(ref)
                    try:
                        rows = ray.get(ref)
                    except ray.exceptions.RayTaskError as e:
                        cause = getattr(e, "cause", None)
                        if isinstance(cause, GpucabacError):  # the sweep's own data: the same on every attempt
                            raise cause from None
                        error: BaseException = cause if isinstance(cause, BaseException) else e
                    except system as e:
                        error = e
                    else:
                        if progress is not None:
                            progress(task.work)
                        yield task, rows
                        continue
                    self.failures.append((task, attempt, f"{type(error).__name__}: {_first_line(error)}"))
                    if attempt >= self.retries:
                        raise SweepTaskError(f"{task.describe()} failed {attempt + 1} times; the last: "
                                             f"{type(error).__name__}: {_first_line(error)}") from error
                    if self.on_retry is not None:
                        self.on_retry(task, attempt, error)
                    pending[remote.remote(task, refs[task.chunk], common, attempt + 1, self.before_task)] = (task, attempt + 1)
        finally:
            for ref in pending:  # left by an error or a caller that stopped early
                ray.cancel(ref, force=True)
            self.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"


def crash_on_first_attempt(index: int) -> Callable[[SweepTask, int], None]:
    """A `before_task` hook that ends the worker process (os._exit, as a crash or a kill would)
    on the first attempt of task `index`: what the tests use to lose a worker mid-sweep."""
    return _CrashOnce(index)


class _CrashOnce:
    def __init__(self, index: int):
        self.index = index

    def __call__(self, task: SweepTask, attempt: int) -> None:
        if task.index == self.index and attempt == 0:
            os._exit(17)
