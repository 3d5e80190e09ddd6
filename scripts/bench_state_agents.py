"""Agents used by scripts/bench_state.py."""

from __future__ import annotations

from typing import Any

from otpd.agent.base import Agent
from otpd.agent.state import PersistentQueue


class BenchQueue(Agent):
    """A persisted queue plus a counter: what the restore benchmark fills and kills."""

    fields = {"added": 0}
    persistent_fields = ("added",)
    collections = {"items": PersistentQueue}

    items: PersistentQueue
    added: int

    def handle_call(self, request: Any) -> Any:
        if request.get("op") == "add":
            self.items.append(request["item"])
            self.added += 1
        return {"len": len(self.items), "added": self.added}
