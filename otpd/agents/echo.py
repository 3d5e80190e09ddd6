"""EchoAgent: the smallest agent. A call is answered with its request."""

from __future__ import annotations

from typing import Any

from otpd.agent.base import Agent


class EchoAgent(Agent):
    def handle_call(self, request: Any) -> Any:
        return request
