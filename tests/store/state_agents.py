"""Agents with persistent state for the daemon-level tests (named in their configs)."""

from __future__ import annotations

from typing import Any

from otpd.agent.base import Agent
from otpd.agent.state import PersistentQueue
from otpd.agents.kv import KVAgent


class QueueAgent(Agent):
    """The design's critical test subject: a persisted queue plus counters."""

    fields = {"added": 0, "taken": 0}
    persistent_fields = ("added", "taken")
    collections = {"items": PersistentQueue}

    items: PersistentQueue
    added: int
    taken: int

    def handle_call(self, request: Any) -> Any:
        op = request["op"]
        if op == "add":
            self.items.append(request["item"])
            self.added += 1
        elif op == "take":
            self.taken += 1
            return {"item": self.items.popleft()}
        return {"items": list(self.items), "added": self.added, "taken": self.taken}


class StartCounter(Agent):
    """Counts its starts in init (so every start has a change to commit), says on stderr once
    that change is saved (``after_commit``), and keeps a queue; ``say`` prints its text."""

    fields = {"starts": 0}
    persistent_fields = ("starts",)
    collections = {"items": PersistentQueue}

    items: PersistentQueue
    starts: int

    def init(self) -> None:
        self.starts += 1
        starts = self.starts
        self.after_commit(lambda: print(f"start {starts} saved", flush=True))

    def handle_call(self, request: Any) -> Any:
        if request.get("op") == "add":
            self.items.append(request["item"])
        elif request.get("op") == "say":
            print(request["text"], flush=True)
        return {"starts": self.starts, "items": len(self.items)}


class EndingKV(KVAgent):
    """A KVAgent whose ``end`` call ends its process once the call's change is committed."""

    def op_end(self, request: dict[str, Any]) -> Any:
        self.puts += 1
        self.end_after_commit(0)
        return {"ending": True}
