"""What the benchmark scripts share: running a measured subprocess and describing the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run `cmd` from the repo root; return (wall seconds, peak RSS in MiB of that process alone)."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed; see {log}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def machine() -> dict:
    """CPU and its ISA flags (AVX-512, VNNI, BF16 and AMX decide int8 and bf16 speed), cores, torch threads, memory,
    versions, and the load average (other work on a shared machine)."""
    import torch

    from serve.bundle.manifest import cpu_info

    cpu = cpu_info()
    return {"cpu": cpu["model"], "isa": [name for name, present in cpu["flags"].items() if present],
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]}


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write a benchmark's JSON with no absolute path of this machine: paths in the repo become relative to it,
    ../shared stays ../shared, temp folders become <tmp>."""
    text = json.dumps(result, indent=2, default=str)
    for prefix, short in ((str(REPO.parent / "shared"), "../shared"), (str(REPO) + "/", ""), (str(REPO), "."),
                          (tempfile.gettempdir(), "<tmp>"), (str(Path.home()), "~")):
        text = text.replace(prefix, short)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
