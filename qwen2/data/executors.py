"""Executors: run one function over many work units and return the results in unit order, whatever
order they finished in. The pipeline's outputs depend only on the units and their order, never on
the executor, so a local run and a Ray run write the same files.

- `LocalExecutor`: a process pool on this machine (the default); `workers=1` runs in-process.
- `RayExecutor`: Ray tasks (the `ray` extra); `address=None` starts a local Ray on this machine,
  an address ("auto", "ray://host:10001") joins a cluster.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Sequence


class LocalExecutor:
    name = "local"

    def __init__(self, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"executor workers must be at least 1 (got {workers})")
        self.workers = workers

    def map(self, fn: Callable[..., Any], args: Sequence[tuple], *, progress: Callable[[int], None] | None = None) -> list:
        if self.workers == 1 or len(args) <= 1:
            out = []
            for a in args:
                out.append(fn(*a))
                if progress:
                    progress(1)
            return out
        # spawn, not fork: workers may load PyTorch models, and a forked OpenMP runtime can deadlock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(self.workers, len(args)), mp_context=context) as pool:
            futures = [pool.submit(fn, *a) for a in args]
            out = []
            for future in futures:  # in submission order
                out.append(future.result())
                if progress:
                    progress(1)
            return out


class RayExecutor:
    name = "ray"

    def __init__(self, workers: int = 2, address: str | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("the Ray executor needs Ray: pip install ray (or the 'ray' extra)") from None
        self.ray = ray
        self.workers, self.address = workers, address
        self._started = False

    def _ensure(self) -> None:
        if self.ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting from a data job
        if self.address is None:  # a private local Ray: never attach to a stale cluster by accident
            self.ray.init(address="local", num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                          configure_logging=False)
        else:
            self.ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        self._started = True

    def map(self, fn: Callable[..., Any], args: Sequence[tuple], *, progress: Callable[[int], None] | None = None) -> list:
        self._ensure()
        remote = self.ray.remote(num_cpus=1, max_retries=2)(fn)
        refs = [remote.remote(*a) for a in args]
        out = []
        for ref in refs:  # ray.get per ref in submission order: results in unit order
            out.append(self.ray.get(ref))
            if progress:
                progress(1)
        return out

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False


def make_executor(kind: str, workers: int, address: str | None = None) -> LocalExecutor | RayExecutor:
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, address)
    raise ValueError(f"executor must be 'local' or 'ray' (got {kind!r})")
