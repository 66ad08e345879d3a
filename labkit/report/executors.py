"""Where the report's notebook runs execute: `labkit report --executor {processes,dask}`.

`processes` (the default) is a pool of spawned processes on this machine, `workers` at a time (1: one after
another). `dask` runs each run as a task on `dask.distributed`: a `LocalCluster` of `workers` one-thread worker
processes by default, or the cluster whose scheduler is at `--scheduler ADDRESS` (every worker must see this
repository and the report folder at the same paths: a shared filesystem). Either way the scheduler
(`labkit.report.scheduler.schedule`) gets a `concurrent.futures.Executor`, so what decides the order (longest first,
one run of a generation group at a time), what runs (`labkit.report.run._execute`: papermill), reuse (decided before
any pool starts) and `summary.json` are the same for both; `docs/distributed_report.md` shows both in use.

A task carries its environment with it: a worker of an existing cluster was started elsewhere and did not inherit
ours, so each task sets the kernels' thread count (`OMP_NUM_THREADS`, `MKL_NUM_THREADS`) and the caller's
`LABKIT_*` variables (device, precision, retrained checkpoints, weights) before papermill starts the kernel, and
restores them afterwards. One GPU per worker: on a `LocalCluster` of a machine where torch sees GPUs, worker i's
kernels get `CUDA_VISIBLE_DEVICES` = the (i mod count)-th visible GPU. On an existing cluster the workers keep the
GPUs their launcher gave them (Slurm, dask-cuda and the like set `CUDA_VISIBLE_DEVICES` per worker).

A worker that dies (killed, preempted, out of memory) takes its task with it and dask raises `KilledWorker` for it.
That run becomes a failed entry (its error names the lost worker, its partial notebook is kept) and every other run
goes on, as a notebook that raises does. On the `LocalCluster` dask does not retry it
(`distributed.scheduler.allowed-failures` = `ALLOWED_FAILURES` = 0): a notebook that brought its worker down would
most likely bring the next one down too, and `labkit report` run again reruns only the failed runs (the others are
reused). An existing cluster keeps its own setting (dask's default: 3 retries); a run that a retry finished is
reported ok like any other, since dask does not tell the client how many attempts a task took.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
import uuid
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from labkit.core.errors import LabError, ParameterError

EXECUTORS = ("processes", "dask")
# Tasks whose worker died that the local cluster's scheduler retries (see the module docstring).
ALLOWED_FAILURES = 0
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
INSTALL_HINT = "pip install 'seed-story-lab[dask]'"


@dataclass
class ExecutorConfig:
    """How the report's runs execute: `name` one of `EXECUTORS`; `scheduler` the address of a running dask
    scheduler (tcp://host:8786), only with `dask`; None starts a `LocalCluster` of the report's workers."""

    name: str = "processes"
    scheduler: str | None = None

    def check(self) -> ExecutorConfig:
        if self.name not in EXECUTORS:
            raise ParameterError("--executor", f"unknown executor {self.name!r}; choose one of {', '.join(EXECUTORS)}")
        if self.scheduler is not None and self.name != "dask":
            raise ParameterError("--scheduler", "names a dask scheduler, so it needs --executor dask")
        if self.name == "dask":
            require_distributed()
        return self


def require_distributed() -> None:
    """A LabError naming the install command when dask.distributed is missing (it is an optional extra)."""
    try:
        import distributed  # noqa: F401
    except ImportError as error:
        raise LabError(f"--executor dask needs dask.distributed, which is not installed ({error}): {INSTALL_HINT}")


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Set these environment variables (child processes started meanwhile inherit them); restore them afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def thread_environment(threads: int) -> dict[str, str]:
    """The variables that fix a kernel's thread count (read by torch's and MKL's pools at start-up)."""
    return {name: str(threads) for name in THREAD_VARIABLES}


def notebook_pool(workers: int) -> ProcessPoolExecutor:
    """The `processes` executor: `workers` spawned processes of this machine."""
    # Processes, not threads: papermill chdir()s the whole process into the notebook's folder while it runs
    # (papermill.utils.chdir), so two notebooks in threads would restore each other's working directory. Spawned, not
    # forked: this process has imported torch, whose thread pools do not survive a fork. A worker only waits on its
    # kernel; it imports this module once (torch, transformers: seconds) and serves the next runs too.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as `CUDA_VISIBLE_DEVICES` entries (empty without CUDA)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def _worker_index() -> int | None:
    from distributed import get_worker

    name = get_worker().name  # a LocalCluster names its workers 0..n-1, and a restarted worker keeps its name
    return name if isinstance(name, int) else None


def run_in_worker(execute: Callable, run: Any, variables: dict[str, str], gpus: list[str]) -> Any:
    """The dask task: `execute(run)` with the caller's variables (and, on a LocalCluster, this worker's GPU) set for
    the kernel papermill starts. One task at a time per worker (one thread), so setting os.environ here is safe."""
    values = dict(variables)
    index = _worker_index() if gpus else None
    if index is not None:
        values["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    with environment(values):
        return execute(run)


def local_cluster(workers: int):
    """A `distributed.LocalCluster` of `workers` one-thread worker processes (each under a nanny that restarts it
    if it dies), whose scheduler does not retry a task that a dying worker took with it (`ALLOWED_FAILURES`)."""
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        # memory_limit=0: the notebooks run in kernels (the workers' child processes) that dask's memory monitor
        # does not see; a worker only waits on its kernel. No dashboard: no port to collide on. Errors only: at the
        # end the nanny kills a worker still tearing down torch after 4 s, with a warning that would only worry
        # (every result is on disk by then).
        return LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=0,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )


def _describe(error: BaseException) -> str:
    from distributed import KilledWorker

    if isinstance(error, KilledWorker):
        return f"the dask worker {error.last_worker.address} died while running this notebook (KilledWorker)"
    return f"lost to dask: {type(error).__name__}: {error}"


class DaskPool(Executor):
    """A `concurrent.futures.Executor` on a dask cluster whose futures never raise: a run lost with its worker
    resolves to `lost(run, why, seconds)`, the run's failed entry. `shutdown` closes the client, and the
    `LocalCluster` if this pool started one."""

    def __init__(
        self, workers: int, scheduler: str | None, threads: int, lost: Callable[[Any, str, float], Any]
    ) -> None:
        from distributed import Client

        self.lost, self.cluster = lost, None
        self.variables = {
            **{k: v for k, v in os.environ.items() if k.startswith("LABKIT_")},
            **thread_environment(threads),
        }
        if scheduler is None:
            self.cluster = local_cluster(workers)
            self.gpus = visible_gpus()
        else:
            self.gpus = []  # an existing cluster's workers keep the GPUs their launcher gave them
        try:
            self.client = Client(self.cluster or scheduler, timeout="30s")
        except (OSError, TimeoutError, ValueError) as error:
            self._close_cluster()
            raise LabError(f"--scheduler {scheduler}: could not reach a dask scheduler there ({error})")

    def workers_now(self) -> tuple[int, int]:
        """(workers, their threads) of the cluster now: the threads are what runs at once without --workers."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return len(workers), sum(w["nthreads"] for w in workers)

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """`fn(run)` as a dask task named after the run (`<run id>-<8 hex>`: the dashboard and `client.processing()`
        show which worker runs what; a new name each time, so dask never hands back an earlier result). Returns a
        `concurrent.futures.Future`, which the scheduler's `concurrent.futures.wait` waits on."""
        (run,) = args
        start = time.perf_counter()
        key = f"{getattr(run, 'run_id', 'run')}-{uuid.uuid4().hex[:8]}"
        task = self.client.submit(run_in_worker, fn, run, self.variables, self.gpus, key=key, pure=False)
        outer: Future = Future()

        def settle(done) -> None:  # in a thread of the client, once the task finished, erred or was lost
            try:
                outer.set_result(done.result())
            except BaseException as error:  # KilledWorker, or anything else the task or dask raised
                outer.set_result(self.lost(run, _describe(error), round(time.perf_counter() - start, 2)))

        task.add_done_callback(settle)
        return outer

    def _close_cluster(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.client.close()
        self._close_cluster()


def open_pool(
    config: ExecutorConfig, workers: int | None, default: int, threads: int, lost: Callable[[Any, str, float], Any]
) -> tuple[Executor, int, int]:
    """(the executor for `config`, how many runs execute at once, how many workers it has). At once: `workers`,
    else `default` (a LocalCluster of that many workers, or processes) or, on an existing dask cluster, its
    workers' threads."""
    if config.name == "processes":
        count = workers or default
        return notebook_pool(count), count, count
    pool = DaskPool(workers or default, config.scheduler, threads, lost)
    present, threads_now = pool.workers_now()
    count = workers or (threads_now if config.scheduler else default)
    if count < 1:
        pool.shutdown()
        raise LabError(f"--scheduler {config.scheduler}: the cluster has no workers yet; start some or pass --workers")
    return pool, count, present
