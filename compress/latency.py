"""Latency: p50 / p95 of single inference calls at fixed batch sizes, every variant on the same inputs and threads.

How it is measured: each variant and batch size runs `warmup` untimed calls, then `runs` timed calls split into
`rounds` blocks taken round-robin across the variants, so a change of load on a shared machine hits every variant
alike; only the call itself is timed (time.perf_counter; inputs are built before). ONNX Runtime sessions get
intra_op_num_threads = threads, one inter-op thread, sequential execution and the variant's recorded session settings
(compress.optimize.session_settings); PyTorch runs with torch.set_num_threads(threads) under inference_mode.

On a busy machine wall times are inflated by every slice the scheduler gives to other processes. With one thread the
calling thread does all the work, so its CPU time per call (time.thread_time, `cpu_p50_ms`) is also recorded: it
leaves out the waiting, not the cache misses that other processes cause. Compare variants measured together.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.errors import require
from compress.optimize import session_settings

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], Callable[[], Any]]  # binds one input batch, returns the call to time


@dataclass
class LatencyConfig:
    """Threads, batch sizes and run counts of the latency measurement."""

    threads: int = 1  # intra-op threads of every runtime (ONNX Runtime and PyTorch alike)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    warmup: int = 10  # untimed calls per variant and batch size
    runs: int = 100  # timed calls per variant and batch size
    rounds: int = 10  # the timed calls are interleaved across variants in this many blocks

    def __post_init__(self) -> None:
        if self.threads < 1 or self.runs < 1 or self.rounds < 1 or self.warmup < 0:
            raise ValueError("latency threads, runs and rounds must be >= 1 and warmup >= 0")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"latency batch_sizes must be positive, got {self.batch_sizes}")


def session_options(threads: int, session: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """ONNX Runtime SessionOptions and InferenceSession keyword arguments for a variant's recorded session settings."""
    ort = require("onnxruntime")
    settings = session or session_settings()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, settings["graph_optimization_level"])
    return options, {"disabled_optimizers": list(settings.get("disabled_optimizers") or [])}


def ort_runner(path: str | Path, *, threads: int, session: dict[str, Any] | None = None) -> Runner:
    """Calls of an ONNX graph with the variant's session settings (None: tuneforge's defaults)."""
    ort = require("onnxruntime")
    options, kwargs = session_options(threads, session)
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **kwargs)
    return bind_session(sess)


def default_ort_runner(path: str | Path, *, threads: int) -> Runner:
    """Calls of an ONNX graph in a session with ONNX Runtime's defaults except the thread count: what a user gets from
    `InferenceSession(path)` (the baseline of the by-hand path)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return bind_session(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))


def torch_runner(model: Any, input_names: list[str]) -> Runner:
    """Calls of a PyTorch model with the graph's inputs as tensors (built once per batch, outside the timing)."""
    import torch

    def bind(feeds: Feeds) -> Callable[[], Any]:
        tensors = {name: torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in input_names}

        def call() -> Any:
            with torch.inference_mode():
                return model(**tensors)

        return call

    return bind


def measure(runners: dict[str, Runner], inputs: dict[int, Feeds], config: LatencyConfig) -> dict[str, dict[str, Any]]:
    """{variant: {"batch_<n>": {"p50_ms", "p95_ms", "mean_ms", "min_ms", "cpu_p50_ms", "runs"}}} for every batch
    size in `inputs` (cpu_p50_ms: the calling thread's CPU time, None with more than one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        calls = {(name, size): runner(inputs[size]) for name, runner in runners.items() for size in inputs}
        for call in calls.values():
            for _ in range(config.warmup):
                call()
        times: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
        cpu: dict[tuple[str, int], list[float]] = {key: [] for key in calls}
        per_round = [config.runs // config.rounds + (1 if r < config.runs % config.rounds else 0)
                     for r in range(config.rounds)]
        load_before = os.getloadavg()[0]
        for count in per_round:
            for key, call in calls.items():
                for _ in range(count):
                    start, start_cpu = time.perf_counter(), time.thread_time()
                    call()
                    cpu[key].append(time.thread_time() - start_cpu)
                    times[key].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    logger.info("latency: %d variants x %d batch sizes x %d runs (load average %.1f -> %.1f)", len(runners),
                len(inputs), config.runs, load_before, os.getloadavg()[0])
    out: dict[str, dict[str, Any]] = {name: {} for name in runners}
    for (name, size), values in times.items():
        ms = np.asarray(values) * 1e3
        cpu_ms = float(np.percentile(cpu[name, size], 50) * 1e3) if config.threads == 1 else None
        out[name][f"batch_{size}"] = {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                                      "mean_ms": float(ms.mean()), "min_ms": float(ms.min()), "cpu_p50_ms": cpu_ms,
                                      "runs": len(values)}
    return out


def bind_session(session: Any) -> Runner:
    """Calls of an open ONNX Runtime session (the graph's own inputs picked from the feeds)."""
    wanted = {i.name for i in session.get_inputs()}

    def bind(feeds: Feeds) -> Callable[[], Any]:
        picked = {k: v for k, v in feeds.items() if k in wanted}
        return lambda: session.run(None, picked)

    return bind
