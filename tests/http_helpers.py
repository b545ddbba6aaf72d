"""Starting a real server process for the HTTP tests (tests/test_http_server.py, tests/test_ray_serve.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from conftest import REPO

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}

# Slows every decoder step by 50 ms, so a test can disconnect mid-stream and fill the generation queue.
SLOW_STEP = """
import sys, time
import serve.runtime as runtime
fast = runtime.onnx_step
def slow_step(decoder, cache):
    step = fast(decoder, cache)
    def slowed(feeds, past):
        time.sleep(0.05)
        return step(feeds, past)
    return slowed
runtime.onnx_step = slow_step
from serve.http.cli import main
main(sys.argv[1:])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the server did not start in {timeout} s:\n{log.read_text()[-4000:]}")


@contextmanager
def running_server(args: list[str], log: Path, *, slow: bool = False, env: dict[str, str] | None = None
                   ) -> Iterator[str]:
    """`python -m serve.http ARGS --port P` (or the slowed variant) as a subprocess; yields its base URL."""
    port = free_port()
    start = [sys.executable, "-c", SLOW_STEP] if slow else [sys.executable, "-m", "serve.http"]
    with log.open("w") as out:
        proc = subprocess.Popen([*start, *args, "--port", str(port), "--log-level", "warning"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
