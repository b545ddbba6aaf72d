"""Every benchmark script starts as users run it (`python bench/<name>.py`): its imports resolve from the bench
folder (a script named like a package would shadow it) and its options parse."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO

# Scripts (not the helpers they import, e.g. common.py, or the peer app that uvicorn serves, http_peer.py).
SCRIPTS = sorted(p.name for p in (REPO / "bench").glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def test_the_scripts_are_found():
    assert len(SCRIPTS) >= 6


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_help_runs(script):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_committed_results_carry_no_absolute_paths():
    """bench/results/*.json are shared artifacts: no path of the machine that wrote them (common.write_result)."""
    results = sorted((REPO / "bench" / "results").glob("*.json"))
    assert len(results) >= 10
    leaked = [p.name for p in results if any(f'"{root}' in p.read_text() or f" {root}" in p.read_text()
                                             for root in ("/tmp/", "/work/", "/root/", "/home/", str(REPO)))]
    assert not leaked, f"absolute paths in {leaked}"
