"""Micro-batching for servers: many callers' requests, one batched model run, each result routed back.

A worker thread takes the first waiting request, then keeps collecting until `max_batch_size` items are gathered or
`max_wait_ms` has passed since it took the first one; it runs the batch once and resolves each caller's future with
its own slice. `workers` such threads share the queue, so that several batches run at once (one per core on a CPU).
While the model runs, new requests queue up, so under load batches fill without any waiting; with max_wait_ms = 0
an idle server adds no latency at all.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class BatchingConfig:
    """How a predictor groups concurrent requests: at most `max_batch_size` items per model run, waiting at most
    `max_wait_ms` (milliseconds, after the first request of a batch arrives) for more.

    The default wait is 0: under load, requests queue up while a batch runs, so batches fill anyway; waiting only
    adds latency when the model is idle (on CPUs a batch of 2 costs about twice a batch of 1). Raise it on hardware
    where a bigger batch is much cheaper per item (GPUs).

    `workers` batches run at once. On a CPU a transformer's cost per item hardly drops with the batch size (the
    tokens already fill the matrix kernels), so one worker with a one-thread session leaves the other cores idle:
    use one worker per core (threads=1), or one worker with a session of all threads.
    """

    max_batch_size: int = 32
    max_wait_ms: float = 0.0
    workers: int = 1

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_wait_ms < 0 or self.workers < 1:
            raise ValueError(f"batching needs max_batch_size >= 1, max_wait_ms >= 0 and workers >= 1, got {self}")


@dataclass
class _Request(Generic[Item, Result]):
    items: list[Item]
    future: Future[list[Result]]


class MicroBatcher(Generic[Item, Result]):
    """Runs `run(items) -> results` (one result per item, in order) on batches gathered from concurrent `submit`s.

    A request may hold several items; it is never split. If a batch of several requests fails, each request is run
    again alone, so one bad request cannot fail the others. The workers are daemon threads started on first use.
    """

    def __init__(self, run: Callable[[list[Item]], Sequence[Result]], config: BatchingConfig, *,
                 name: str = "batcher"):
        self._run, self.config, self.name = run, config, name
        self._queue: queue.SimpleQueue[_Request[Item, Result] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        # Items per model run of the last 1,000 runs (appended by the workers: deque appends are atomic).
        self.batch_sizes: deque[int] = deque(maxlen=1000)

    def __call__(self, items: list[Item]) -> list[Result]:
        """Submit and wait for the results."""
        return self.submit(items).result()

    def submit(self, items: list[Item]) -> Future[list[Result]]:
        """Queue one request; the future resolves to its results (or its exception)."""
        future: Future[list[Result]] = Future()
        if not items:
            future.set_result([])
            return future
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name} is closed")
            if not self._threads:
                self._threads = [threading.Thread(target=self._work, name=f"{self.name} {i}", daemon=True)
                                 for i in range(self.config.workers)]
                for thread in self._threads:
                    thread.start()
        self._queue.put(_Request(list(items), future))
        return future

    def close(self) -> None:
        """Finish the queued requests and stop the workers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for _ in threads:  # one stop sign per worker
            self._queue.put(None)
        for thread in threads:
            thread.join()

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, count = [first], len(first.items)
            deadline = time.monotonic() + self.config.max_wait_ms / 1000
            while count < self.config.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    request = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stopping = True
                    break
                batch.append(request)
                count += len(request.items)
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]  # drops callers who cancelled
            if batch:
                self._dispatch(batch)

    def _dispatch(self, batch: list[_Request[Item, Result]]) -> None:
        items = [item for request in batch for item in request.items]
        try:
            results = list(self._run(items))
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: the batch function returned {len(results)} results for "
                                   f"{len(items)} items")
        except Exception as err:
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            logger.warning("%s: a batch of %d requests failed (%s); running them one by one", self.name, len(batch),
                           err)
            for request in batch:
                self._dispatch([request])
            return
        self.batch_sizes.append(len(items))
        start = 0
        for request in batch:
            request.future.set_result(results[start:start + len(request.items)])
            start += len(request.items)
