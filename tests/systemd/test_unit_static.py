"""Static checks of systemd/otpd.service, the system config and the install scripts (no manager needed).

* ``systemd-analyze verify`` prints nothing at all (it exits 0 on unknown keys and bad
  values, so any output is a failure). It needs ExecStart='s binary to exist, so it
  verifies a copy whose ExecStart names this test venv's ``otpd``.
* ``systemd-analyze security --offline=yes --threshold=20``: exposure 2.0 or less.
* The unit keeps the contract the daemon relies on, and its stop timeout covers the
  shipped config's children stopping one after another.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from otpd.control.client import SYSTEM_SOCKET
from tests.conftest import REPO_DIR, console, run_cli

pytestmark = pytest.mark.timeout(60)

UNIT = REPO_DIR / "systemd" / "otpd.service"
SYSTEM_CONFIG = REPO_DIR / "config" / "otpd-system.toml"
SCRIPTS = [REPO_DIR / "scripts" / name for name in ("install-systemd", "uninstall-systemd", "sdbox.sh")]
EXEC_START = "/opt/otpd/venv/bin/otpd"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (Debian: apt-get install systemd)")


def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart naming this venv's otpd, which exists (verify insists)."""
    otpd = console("otpd")
    if len(otpd) != 1:
        pytest.skip("this Python has no otpd console script to stand in for /opt/otpd/venv/bin/otpd")
    text = UNIT.read_text(encoding="utf-8")
    assert EXEC_START in text
    path = tmp_path / "otpd.service"
    path.write_text(text.replace(EXEC_START, otpd[0]), encoding="utf-8")
    return path


def unit_settings() -> dict[str, list[str]]:
    """Every key of the unit with all of its values (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


@needs_analyze
def test_systemd_analyze_verify_prints_no_diagnostic(tmp_path):
    unit = unit_copy(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_analyze
def test_security_exposure_is_at_most_2(tmp_path):
    unit = unit_copy(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--threshold={int(MAX_EXPOSURE * 10)}",
                             "--no-pager", str(unit)], capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"Overall exposure level for otpd\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security --offline=yes: exposure {exposure}")
    assert result.returncode == 0 and exposure <= MAX_EXPOSURE, result.stdout


def test_unit_keeps_the_contract_with_the_daemon():
    s = unit_settings()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecStart"] == f"{EXEC_START} run --config /etc/otpd/otpd.toml"
    assert re.fullmatch(r"\S*kill -HUP \$MAINPID", one["ExecReload"])
    assert seconds(one["WatchdogSec"]) > 0
    assert one["Restart"] == "on-failure", "exit 4 (root supervisor gave up) must be restarted"
    prevented = " ".join(s.get("RestartPreventExitStatus", [])).split()
    assert "2" in prevented and "4" not in prevented and "1" not in prevented
    assert "SuccessExitStatus" not in s, "4 must stay a failure"
    assert int(one["StartLimitBurst"]) >= 3 and seconds(one["StartLimitIntervalSec"]) > 0
    assert one["KillMode"] == "mixed", "SIGTERM to the daemon only: it stops its children in order"
    assert one["StateDirectory"] == "otpd" and one["RuntimeDirectory"] == "otpd"
    assert one["RuntimeDirectoryMode"] in ("0700", "0750")
    assert one["DynamicUser"] == "yes"
    for key in ("ProtectHome", "PrivateTmp", "PrivateDevices", "NoNewPrivileges", "MemoryDenyWriteExecute",
                "PrivateNetwork", "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert one["RestrictAddressFamilies"] == "AF_UNIX"
    assert one["CapabilityBoundingSet"] == ""


def test_stop_timeout_covers_the_shipped_config():
    """Children stop in reverse order, one after another, each within shutdown_ms (default 5000)."""
    one = {k: v[-1] for k, v in unit_settings().items()}
    config = tomllib.loads(SYSTEM_CONFIG.read_text(encoding="utf-8"))

    def budget(children: list[dict]) -> float:  # sequential stop of a static list
        total = 0.0
        for child in children:
            if child.get("supervisor") == "dynamic":  # its children stop all at once
                total += child.get("template", {}).get("shutdown_ms", 5000) / 1000
            elif child.get("supervisor"):
                total += budget(child.get("children", []))
            else:
                ms = child.get("shutdown_ms", 5000)
                total += 0 if ms == "brutal_kill" else ms / 1000
        return total

    need = budget(config["root"]["children"])
    assert seconds(one["TimeoutStopSec"]) >= need + 5, f"TimeoutStopSec={one['TimeoutStopSec']} < {need} s + margin"


def test_system_config_is_valid_and_uses_the_systemd_layout():
    result = run_cli("otpd", "check-config", str(SYSTEM_CONFIG))
    assert result.returncode == 0, result.stderr
    assert f"socket {SYSTEM_SOCKET}" in result.stdout, result.stdout
    daemon = tomllib.loads(SYSTEM_CONFIG.read_text(encoding="utf-8"))["daemon"]
    assert daemon["state_dir"] == "/var/lib/otpd" and daemon["runtime_dir"] == "/run/otpd"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_executable_bash_that_parses(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True,
                               timeout=60, check=False)
        assert check.returncode == 0, check.stdout


@pytest.mark.parametrize("script", ["install-systemd", "uninstall-systemd"])
def test_install_scripts_refuse_to_run_without_root(script):
    path = REPO_DIR / "scripts" / script
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "bash", str(path)]
        probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "test", "-r",
                                str(path)], check=False)
        if probe.returncode != 0:
            pytest.skip(f"{path} is not readable by an unprivileged user here")
    else:
        cmd = ["bash", str(path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False, cwd="/")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "must be run as root" in result.stderr
