"""The raster pipeline's threads: a read-ahead thread, model workers, a writer thread; stage timers.

    times = {}
    for window in prefetch(read_windows(), depth=2):  # read in a background thread
        with timed(times, "model"):
            ...
    with RowWriter(dst_write) as write:                # written by a background thread
        write(y, rows)

Reading (GDAL decompression, the band stretch), the model and writing (GDAL compression) are
independent per window. GDAL, NumPy's bulk operations and torch release the GIL, so a reader
thread and a writer thread run while the model computes: on a 2-core machine they fill the
moments the model's own threads leave a core idle. Queues are short (``depth`` items), so the
memory in flight stays a couple of windows. An exception in a background thread is re-raised
in the caller with its own type (a truncated file stays an ``ImageReadError``).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["timed", "prefetch", "ordered_map", "RowWriter", "MODEL_WORKERS", "model_workers", "torch_threads"]

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()
_POLL = 0.05  # seconds a background thread waits on a queue before it looks again


@contextmanager
def timed(times: dict[str, float] | None, stage: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``times[stage]`` (nothing when times is None)."""
    if times is None:
        yield
        return
    tic = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - tic


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first; False when stopped."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False


def prefetch(items: Iterable[T], *, depth: int = 2, times: dict[str, float] | None = None) -> Iterator[T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer.

    The iterable runs entirely in that thread (so it must not share a file handle with the
    caller meanwhile). Leaving the loop early, or an exception on either side, stops the thread
    and waits for it before returning. ``times["wait"]`` collects the consumer's waiting time.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def work() -> None:
        try:
            for item in items:
                if not _put(q, item, stop):
                    return
            _put(q, _DONE, stop)
        except BaseException as exc:  # handed to the consumer, raised there
            _put(q, _Failed(exc), stop)

    thread = threading.Thread(target=work, name="seglib-reader", daemon=True)
    try:
        thread.start()
        while True:
            with timed(times, "wait"):
                item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        _join(thread)


def _join(thread: threading.Thread) -> None:
    """``thread.join()``, also after a Ctrl-C that landed while ``thread.start()`` waited for the
    new thread: it runs then, reading, but ``join`` refuses it until it has signalled its start."""
    for _ in range(1000):  # a new thread signals within microseconds
        try:
            thread.join()
            return
        except RuntimeError:  # not signalled yet (or never created: then nothing runs)
            time.sleep(0.001)


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    workers: int = 1,
    times: dict[str, float] | None = None,
    stage: str = "",
) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in the order of ``items``, with up to ``workers`` calls running at once
    in a thread pool (one at a time in the caller's thread when ``workers`` is 1). ``times[stage]``
    collects the calls' own seconds, summed over the workers."""

    def call(item: T) -> R:
        with timed(times if stage else None, stage):
            return fn(item)

    if workers <= 1:
        for item in items:
            yield item, call(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="seglib-model") as pool:
        running: deque = deque()
        try:
            for item in items:
                running.append((item, pool.submit(call, item)))
                if len(running) >= workers:
                    first, future = running.popleft()
                    yield first, future.result()
            while running:
                first, future = running.popleft()
                yield first, future.result()
        finally:
            for _, future in running:  # leaving early: do not start what is still queued
                future.cancel()


class RowWriter:
    """``write(y, rows)`` calls handed to a background thread, in order.

    Arguments:
      write: the function that writes (e.g. a GeoTIFF's ``dst.write`` for a block of rows).
      depth: calls that may wait in the queue; the caller blocks beyond that.
      times: optional stage timer; the writer's busy time goes to ``times["write"]``.

    Use as a context manager: leaving it waits for every queued call and re-raises the first
    error of the thread; after an error the remaining calls are dropped.
    """

    def __init__(self, write: Callable[[int, object], None], *, depth: int = 2, times: dict[str, float] | None = None):
        self._write, self._times = write, times
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="seglib-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            # A timed wait, not a blocking one: a Ctrl-C that lands in the caller's put between
            # waking this thread and deregistering its waiter leaves a stale waiter at the head of
            # the queue's condition, so a later put wakes nobody (CPython's Condition.notify). The
            # close() after that interrupt would wait forever; polling finds the item regardless.
            try:
                item = self._queue.get(timeout=_POLL)
            except queue.Empty:
                continue
            if item is _DONE:
                return
            if self._error is not None:
                continue  # drain without writing
            try:
                with timed(self._times, "write"):
                    self._write(*item)
            except BaseException as exc:
                self._error = exc

    def __call__(self, y: int, rows: object) -> None:
        if self._error is not None:
            raise self._error
        if not _put(self._queue, (y, rows), self._stop):
            raise RuntimeError("RowWriter is closed")

    def close(self) -> None:
        """Wait for the queued writes; re-raise the thread's error, if any."""
        if not self._stop.is_set():
            self._queue.put(_DONE)
            self._thread.join()
            self._stop.set()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: stop the thread, keep the original exception
            self.close()
        except BaseException:
            pass


MODEL_WORKERS = 2  # windows through the model at once on a CPU, each with its share of the threads


def model_workers(device: torch.device) -> tuple[int, int]:
    """(windows through the model at once, torch threads each) for the windowed pass.

    On a CPU, two windows at once with half the threads each: the models' convolutions scale
    poorly from one thread to two (the bundled student: 1.25x), while two windows side by side
    keep both cores busy. One window with every thread on a GPU, or with a single thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return 1, threads
    workers = min(MODEL_WORKERS, threads)
    return workers, threads // workers


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` meanwhile (process-wide), restored afterwards."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)
