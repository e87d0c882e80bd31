"""Where an archive run's tasks run: a local cluster of N worker processes, or a running one.

``--workers N`` starts a ``dask.distributed.LocalCluster`` of N processes with one thread each
(the nanny starts every worker with ``OMP_NUM_THREADS=1``, and the tasks set torch to one thread:
N workers use N cores and never fight over them). ``--scheduler ADDRESS`` connects to a
scheduler started elsewhere (``dask scheduler`` and ``dask worker ADDRESS --nthreads 1``, or
dask-jobqueue / dask-kubernetes): its workers must have seglib installed, and read the inputs and
the checkpoint and write the output folder at the same paths as the client.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["dask_client", "dashboard_link", "dashboard_note"]


@contextlib.contextmanager
def dask_client(*, workers: int = 0, scheduler: str | None = None, memory_limit: str = "auto") -> Iterator:
    """A ``dask.distributed.Client``: on a new local cluster of ``workers`` processes (closed on
    the way out), or on the scheduler at ``scheduler``."""
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--workers and --scheduler need dask: pip install 'seglib[dask]'") from None
    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    for name in ("distributed", "tornado", "bokeh"):  # their INFO lines are not the user's business
        logging.getLogger(name).setLevel(logging.ERROR)
    # dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    # adaptive mmap threshold: every large array of a window is then mapped and unmapped afresh,
    # which cost 1.7x the CPU per file here (33 vs 55 ms per 512 px tile, the same task in one
    # process). Unset for our workers (a value in the environment still wins). The workers'
    # statistical profiler (a stack sample every 10 ms, for the dashboard) is off: CPU for nothing.
    unset = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    with dask.config.set({**unset, "distributed.worker.profile.enabled": False}):
        cluster = LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
            dashboard_address=":0", silence_logs=logging.ERROR,  # any free port (bokeh serves it)
        )  # fmt: skip
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def _has_bokeh() -> bool:
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def dashboard_link(client) -> str | None:
    """The address of the dask dashboard, or None when there is none (bokeh not installed)."""
    return getattr(client, "dashboard_link", None) if _has_bokeh() else None


def dashboard_note(client) -> str:
    """The line that tells where the dask dashboard is (or how to get one)."""
    link = dashboard_link(client)
    workers = len(client.scheduler_info().get("workers", {}))
    if link:
        return f"dask: {workers} worker(s), dashboard {link}"
    return f"dask: {workers} worker(s) (no dashboard: pip install 'bokeh>=3.1' for one)"
