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
