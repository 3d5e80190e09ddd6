"""Agents that write to stdout / stderr."""

from __future__ import annotations

import sys
from typing import Any

from otpd.agent.base import Agent


class Talker(Agent):
    def handle_call(self, request: Any) -> Any:
        kind, count = request["kind"], int(request.get("count", 1))
        stream = sys.stderr if kind == "stderr" else sys.stdout
        for i in range(count):
            print(f"{kind} line {i}", file=stream)
        stream.flush()
        return count
