"""The chaos tool in CI: a fixed seed, real kills by PID (one of the daemon), every invariant."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def chaos(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), *args], capture_output=True,
                         text=True, timeout=timeout, cwd=REPO, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert " passed, 0 failed" in out.stdout
    return out


@pytest.mark.timeout(180)
def test_a_short_chaos_run_with_a_daemon_kill_loses_nothing() -> None:
    out = chaos("--seed", "11", "--duration", "20", "--tasks", "6000", "--workflows", "120", "--kill-rate", "5",
                "--kill-daemon", timeout=170)
    assert "daemon exits [-9]" in out.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["sigstop", "corrupt", "storm", "mapfull"])
def test_each_fault_mode_keeps_every_invariant(mode: str) -> None:
    chaos("--seed", "5", "--mode", mode, "--duration", "6", "--tasks", "1500", "--workflows", "30",
          "--kill-rate", "2", timeout=110)
