"""Agents the systemd tests name in their configs ("tests.systemd.agents:SlowStart").

Imported by the daemon under test (tests/conftest.py puts the checkout on its
PYTHONPATH); inside the systemd box the file is copied to
/opt/otpd-test/otpd_sd_agents.py and named "otpd_sd_agents:...".  It imports
only otpd and the standard library.

The sleeps below are the behaviour being simulated (an agent that is slow to
start or to stop), not a test waiting for something.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from typing import Any

from otpd.agent.base import Agent

NOTIFY_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SlowStart(Agent):
    """``init`` takes ``args["start_s"]`` seconds (default 1): readiness comes late."""

    def init(self) -> None:
        time.sleep(float(self.args.get("start_s", 1.0)))

    def handle_call(self, request: Any) -> Any:
        return request


class SlowStop(Agent):
    """``terminate`` takes ``args["stop_s"]`` seconds (default 1): a long but orderly stop."""

    def terminate(self, reason: str) -> None:
        time.sleep(float(self.args.get("stop_s", 1.0)))

    def handle_call(self, request: Any) -> Any:
        return request


class EnvReport(Agent):
    """Call ``"env"``: what this process (and a program it runs) sees of the notify variables."""

    def handle_call(self, request: Any) -> Any:
        if request != "env":
            return request
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_char_p
        getenv = {name: (libc.getenv(name.encode()) or b"").decode() or None for name in NOTIFY_VARS}
        exec_env = subprocess.run(["/usr/bin/env"], capture_output=True, text=True, env=dict(os.environ),
                                  check=True).stdout.splitlines()
        return {
            "pid": os.getpid(),
            "os_environ": {name: os.environ.get(name) for name in NOTIFY_VARS},
            "getenv": getenv,
            "exec_env": [line for line in exec_env if line.split("=", 1)[0] in NOTIFY_VARS],
        }


class Garbler(Agent):
    """Cast ``"garble"``: writes a byte that is not msgpack to its channel (the daemon logs an error)."""

    def handle_cast(self, message: Any) -> None:
        if message == "garble":
            self._rt().channel.sendall(b"\xc1")
