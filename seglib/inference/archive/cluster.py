"""Where an archive run's tasks run: a local cluster of N worker processes, or a running one.

``--workers N`` starts a ``dask.distributed.LocalCluster`` of N processes with one thread each,
forked from the client once it has loaded the model (torch on one thread, and the tasks set it to
one thread again: N workers use N cores and never fight over them). ``--scheduler ADDRESS`` connects to a
scheduler started elsewhere (``dask scheduler`` and ``dask worker ADDRESS --nthreads 1``, or
dask-jobqueue / dask-kubernetes): its workers must have seglib installed, and read the inputs and
the checkpoint and write the output folder at the same paths as the client.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator

__all__ = ["dask_client", "dashboard_link", "dashboard_note"]


# How a local cluster's workers are started (dask's default: "spawn"). Forking is Linux only:
# macOS's system libraries are not safe to use in a forked child, and Windows cannot fork.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


@contextlib.contextmanager
def dask_client(
    *, workers: int = 0, scheduler: str | None = None, memory_limit: str = "auto", preload=None
) -> Iterator:
    """A ``dask.distributed.Client``: on a new local cluster of ``workers`` processes (closed on
    the way out), or on the scheduler at ``scheduler``.

    The local workers are forked from this process (``START_METHOD``) rather than spawned: a
    spawned worker starts a new interpreter and imports dask, torch and seglib (~2.3 CPU s each
    here), a forked one has them, and the models ``preload()`` loaded (``tasks.worker_model``),
    from the start. Forking is safe here because dask forks from a thread of its own while
    torch runs on one thread and no raster is open."""
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
    # The periodic bookkeeping of every process (an event-loop tick every 20 ms, system statistics
    # every 0.5 s, the nanny's memory check every 0.1 s) took 72 ms of CPU per second on an idle
    # two-worker cluster here; at these intervals 13 ms.
    quieter = {
        "distributed.admin.tick.interval": "1s",
        "distributed.admin.system-monitor.interval": "5s",
        "distributed.worker.memory.monitor-interval": "500ms",
    }
    forked = START_METHOD == "fork"
    if forked:
        _as_spawned_after_fork()
        if preload is not None:
            preload()
        sys.stdout.flush(), sys.stderr.flush()  # else a worker would print what is buffered here again
        # The objects alive now are left out of the workers' garbage collections: a collection
        # writes into every object it visits, which copies each of their pages into the worker.
        gc.collect(), gc.freeze()
    start = {"distributed.worker.multiprocessing-method": START_METHOD}
    try:
        with dask.config.set({**unset, **quieter, **start, "distributed.worker.profile.enabled": False}):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, memory_limit=memory_limit,
                dashboard_address=":0", silence_logs=logging.ERROR,  # any free port (bokeh serves it)
            )  # fmt: skip
    finally:
        if forked:
            gc.unfreeze()
    try:
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


_FORK_HOOK = []


def _as_spawned_after_fork() -> None:
    """In a forked worker, SIGTERM ends the process (dask's nanny stops a worker that way) as it
    would a spawned one, not through the handler ``python -m seglib.predict`` installed here."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
        _FORK_HOOK.append(True)


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
