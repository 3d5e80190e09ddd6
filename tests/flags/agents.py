"""Agents for the flag and version-switch tests: one state, three versions."""

from __future__ import annotations

from typing import Any

from otpd.agent.base import Agent
from otpd.agent.state import PersistentMap
from otpd.agents.kv import KVAgent


class V1(Agent):
    state_version = 1
    fields = {"name": "", "count": 0}
    persistent_fields = ("name", "count")

    def handle_call(self, request: Any) -> Any:
        if request["op"] == "set":
            self.name = request["name"]
        elif request["op"] == "inc":
            self.count += 1
        return {"class": type(self).__name__, "state": {k: getattr(self, k) for k in self.persistent_fields}}


def _split(state: dict[str, Any]) -> dict[str, Any]:
    first, _, last = state["name"].partition(" ")
    return {"first": first, "last": last, "count": state["count"]}


class V3(V1):
    """Version 3: the name split in two, and a title (version 2 only split the name)."""

    state_version = 3
    fields = {"first": "", "last": "", "count": 0, "title": ""}
    persistent_fields = ("first", "last", "count", "title")
    migrations = {1: _split, 2: lambda s: {**s, "title": "dr"}}
    downgrades = {
        3: lambda s: {k: v for k, v in s.items() if k != "title"},
        2: lambda s: {"name": f"{s['first']} {s['last']}".strip(), "count": s["count"]},
    }


class V3NoDowngrades(V3):
    downgrades: dict[int, Any] = {}


class KV1(KVAgent):
    pass


class KV2(KVAgent):
    state_version = 2
    migrations = {1: lambda s: s}
    downgrades = {2: lambda s: s}
    collections = {"data": PersistentMap}


class FlagReader(Agent):
    def handle_call(self, request: Any) -> Any:
        return self.flag(request["name"], request.get("key"))


class BootCaller(Agent):
    """Its init puts into its sibling ``kvs``: on a full store that start fails store_full."""

    def init(self) -> None:
        self.system("call", id="kvs", request={"op": "put", "key": f"boot-{self.id}", "value": "z" * 3000})

    def handle_call(self, request: Any) -> Any:
        return "ok"
