"""The micro-batcher alone: results routed back to their callers, batch limits, failure isolation, shutdown."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve.batching import BatchingConfig, MicroBatcher


class Recorder:
    """A batch function that squares its items, sleeping like a model run; fails on negative items."""

    def __init__(self, seconds: float = 0.005):
        self.seconds, self.batches = seconds, []
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(items))
        time.sleep(self.seconds)
        if any(i < 0 for i in items):
            raise ValueError(f"negative item in {items}")
        return [i * i for i in items]


def test_concurrent_requests_are_batched_and_routed_back():
    run = Recorder()
    batcher = MicroBatcher(run, BatchingConfig(max_batch_size=8, max_wait_ms=20))
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: batcher([i, i + 1000]), range(200)))
    assert results == [[i * i, (i + 1000) ** 2] for i in range(200)]
    assert sum(len(b) for b in run.batches) == 400
    assert all(len(b) <= 8 for b in run.batches)  # 2-item requests are never split, never overfill
    assert max(len(b) for b in run.batches) == 8 and len(run.batches) < 100
    assert list(batcher.batch_sizes) == [len(b) for b in run.batches]
    assert batcher([]) == []  # an empty request never reaches the model
    batcher.close()


def test_an_idle_batcher_waits_at_most_max_wait_ms():
    batcher = MicroBatcher(Recorder(seconds=0), BatchingConfig(max_batch_size=64, max_wait_ms=30))
    batcher([1])  # starts the worker
    start = time.perf_counter()
    assert batcher([3]) == [9]
    elapsed = time.perf_counter() - start
    assert 0.025 <= elapsed < 0.5, elapsed
    assert MicroBatcher(Recorder(seconds=0), BatchingConfig(max_wait_ms=0))([2]) == [4]


def test_a_failing_request_fails_alone():
    run = Recorder(seconds=0.02)
    batcher = MicroBatcher(run, BatchingConfig(max_batch_size=16, max_wait_ms=30))
    futures = [batcher.submit([i]) for i in (1, 2, -3, 4)]
    assert [f.result() for i, f in enumerate(futures) if i != 2] == [[1], [4], [16]]
    with pytest.raises(ValueError, match=r"negative item in \[-3\]"):
        futures[2].result()
    assert run.batches[0] == [1, 2, -3, 4]  # tried together first, then one by one
    assert batcher([5]) == [25]  # still serving


def test_a_cancelled_request_is_skipped():
    run = Recorder(seconds=0.05)
    batcher = MicroBatcher(run, BatchingConfig(max_batch_size=1))
    first = batcher.submit([1])
    time.sleep(0.01)  # the worker is busy with the first request
    second = batcher.submit([2])
    assert second.cancel()
    assert first.result() == [1] and batcher([3]) == [9]
    assert [2] not in run.batches


def test_close_finishes_queued_work_then_refuses():
    batcher = MicroBatcher(Recorder(), BatchingConfig(max_batch_size=2, max_wait_ms=1))
    futures = [batcher.submit([i]) for i in range(6)]
    batcher.close()
    assert [f.result(timeout=5) for f in futures] == [[i * i] for i in range(6)]
    with pytest.raises(RuntimeError, match="is closed"):
        batcher.submit([1])


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_batch_size >= 1"):
        BatchingConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms >= 0"):
        BatchingConfig(max_wait_ms=-1)
    with pytest.raises(ValueError, match="workers >= 1"):
        BatchingConfig(workers=0)


def test_workers_run_batches_at_the_same_time_and_close_together():
    active, peak, lock = [0], [0], threading.Lock()

    def run(items: list[int]) -> list[int]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.03)
        with lock:
            active[0] -= 1
        return [i + 1 for i in items]

    batcher = MicroBatcher(run, BatchingConfig(max_batch_size=2, workers=2))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: batcher([i]), range(16)))
    assert results == [[i + 1] for i in range(16)]
    assert peak[0] == 2  # two batches in flight, never more
    batcher.close()
    assert not any(thread.is_alive() for thread in batcher._threads)
