"""Where per-file work runs: this process, a local process pool, or a Dask cluster — the same pure function
``fn(arg) -> result`` everywhere, results streamed back as they complete, at most a bounded number in flight.

Dask (``dask.distributed``) rather than Ray: a pure function over file paths needs no actors, object store or
placement groups, only a task scheduler with streamed results (``as_completed``); Dask's is a pip install of pure
Python that starts in-process (``LocalCluster(processes=False)``) in about a second on a small box, where Ray
starts a raylet, a GCS and an object store of their own. Its ``Client(address)`` joins any scheduler — a
``dask-scheduler`` on a cluster, Kubernetes (dask-kubernetes), YARN, SLURM (dask-jobqueue) or Coiled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from lorakit.errors import UsageError

A = TypeVar("A")
R = TypeVar("R")
EXECUTORS = ("local", "dask")


def _worker_init() -> None:
    try:
        import torch
        torch.set_num_threads(1)    # N processes × 1 thread; tiny files gain nothing from intra-op threads
    except Exception:  # pragma: no cover - torch always imports here
        pass


def pool_map(fn: Callable[[A], R], args: Sequence[A], *, jobs: int = 1,
             on_failure: Callable[[A, BaseException], R] | None = None) -> Iterator[tuple[int, R]]:
    """(index, fn(arg)) in completion order: in this process for ``jobs <= 1``, else in ``jobs`` worker processes
    with at most ``jobs`` in flight. Workers are forked where the platform can (torch's own DataLoader workers
    are: CPU torch is fork-safe, and a fork skips re-importing torch, seconds per worker), else spawned. A worker
    that dies gives ``on_failure(arg, exc)`` (re-raised without it)."""
    if jobs <= 1:
        for i, a in enumerate(args):
            yield i, fn(a)
        return
    import multiprocessing
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pending: dict[Future[R], int] = {}
    nxt = 0
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init) as pool:
        while nxt < len(args) and len(pending) < jobs:
            pending[pool.submit(fn, args[nxt])] = nxt
            nxt += 1
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    result = fut.result()
                except Exception as exc:
                    if on_failure is None:
                        raise
                    result = on_failure(args[i], exc)
                yield i, result
                if nxt < len(args):
                    pending[pool.submit(fn, args[nxt])] = nxt
                    nxt += 1


def dask_map(fn: Callable[[A], R], args: Sequence[A], *, address: str | None = None, jobs: int = 1,
             in_flight: int = 256, on_failure: Callable[[A, BaseException], R] | None = None
             ) -> Iterator[tuple[int, R]]:
    """(index, fn(arg)) in completion order on a Dask cluster: the scheduler at ``address``, else a local
    cluster of ``jobs`` single-threaded worker processes started (and stopped) here. At most ``in_flight`` tasks
    are submitted at a time, so the scheduler's memory stays bounded for any corpus size."""
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise UsageError("--executor dask needs dask.distributed, which is not installed.",
                         hint="pip install 'lorakit[dask]'") from None
    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=max(1, jobs), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        try:
            client = Client(address, timeout=30)
        except OSError as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {address} ({exc}).",
                             hint="start one (dask scheduler; dask worker ADDRESS) or leave --address out for a "
                                  "local cluster.") from None
    try:
        index: dict[Any, int] = {}
        nxt = 0
        ac = as_completed()
        while nxt < len(args) and len(index) < in_flight:
            fut = client.submit(fn, args[nxt], pure=False)
            index[fut.key] = nxt
            ac.add(fut)
            nxt += 1
        for fut in ac:
            i = index.pop(fut.key)
            try:
                result = fut.result()
            except Exception as exc:
                if on_failure is None:
                    raise
                result = on_failure(args[i], exc)
            fut.release()
            yield i, result
            if nxt < len(args):
                new = client.submit(fn, args[nxt], pure=False)
                index[new.key] = nxt
                ac.add(new)
                nxt += 1
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def run_map(fn: Callable[[A], R], args: Sequence[A], *, executor: str = "local", jobs: int = 1,
            address: str | None = None, on_failure: Callable[[A, BaseException], R] | None = None
            ) -> Iterator[tuple[int, R]]:
    """Dispatch to :func:`pool_map` (``local``) or :func:`dask_map` (``dask``)."""
    if executor == "local":
        if address is not None:
            raise UsageError("--address goes with --executor dask.")
        return pool_map(fn, args, jobs=jobs, on_failure=on_failure)
    if executor == "dask":
        return dask_map(fn, args, address=address, jobs=jobs, on_failure=on_failure)
    raise UsageError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}.")
