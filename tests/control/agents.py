"""Agents for the control tests."""

from __future__ import annotations

import time
from typing import Any

from otpd.agent.base import Agent


class Sleeper(Agent):
    """Blocks in a call for ``request`` seconds: a slow or stuck agent."""

    def handle_call(self, request: Any) -> Any:
        time.sleep(float(request))  # the agent is meant to be unresponsive here
        return request


class Ender(Agent):
    """``{"big": n}`` answers n bytes; ``"end"`` ends the process once the batch is committed
    (``end_after_commit``), saying so on stderr first: the test's cue; ``"cue"`` only says so."""

    def handle_call(self, request: Any) -> Any:
        if request in ("end", "cue"):
            print(f"{request} read", flush=True)
            if request == "end":
                self.end_after_commit(0)
            return request
        return "x" * int(request["big"])
