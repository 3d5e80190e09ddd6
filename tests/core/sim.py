"""A fake OS and clock for driving the pure core (no processes, no time)."""

from __future__ import annotations

from itertools import count
from typing import Any

from otpd.core import tree as core
from otpd.core.spec import AgentSpec, SupervisorSpec


def agent(cid: str, restart: str = "permanent", shutdown_ms: int | None = 1000) -> AgentSpec:
    return AgentSpec(id=cid, agent="otpd.agents.echo:EchoAgent", restart=restart, shutdown_ms=shutdown_ms)  # type: ignore[arg-type]


def sup(cid: str, *children: Any, strategy: str = "one_for_one", max_restarts: int = 3,
        max_seconds: float = 5.0, kind: str = "static", restart: str = "permanent",
        start: str = "serial") -> SupervisorSpec:
    return SupervisorSpec(id=cid, kind=kind, strategy=strategy, max_restarts=max_restarts,  # type: ignore[arg-type]
                          max_seconds=max_seconds, children=tuple(children), restart=restart,  # type: ignore[arg-type]
                          start=start)  # type: ignore[arg-type]


class Sim:
    """Runs the core's actions against a pretend OS: pids, signals, timers."""

    def __init__(self, root: SupervisorSpec, auto_ready: bool = True, auto_exit_on_term: bool = True) -> None:
        self.tree = core.Tree(root)
        self.now = 0.0
        self.pids = count(1000)
        self.timers: dict[tuple[Any, ...], float] = {}
        self.events: list[tuple[str, str, dict[str, Any]]] = []
        self.signals: list[tuple[str, str]] = []
        self.spawns: list[str] = []
        self.exit: int | None = None
        self.auto_ready = auto_ready
        self.auto_exit_on_term = auto_exit_on_term
        self.pending: list[tuple[str, str]] = []  # deferred OS reactions

    # -- driving --------------------------------------------------------------

    def apply(self, actions: list[core.Action]) -> None:
        for action in actions:
            if isinstance(action, core.Spawn):
                if not self.tree.spawn_is_current(action.id, action.token):
                    continue
                self.spawns.append(action.id)
                pid = next(self.pids)
                self.apply(self.tree.spawned(action.id, pid, self.now))
                if self.auto_ready:
                    self.pending.append(("ready", action.id))
            elif isinstance(action, core.Signal):
                self.signals.append((action.id, action.signal))
                if action.signal == "KILL":
                    self.pending.append(("killed", action.id))
                elif self.auto_exit_on_term:
                    self.pending.append(("termed", action.id))
            elif isinstance(action, core.SetTimer):
                self.timers[action.key] = action.at
            elif isinstance(action, core.CancelTimer):
                self.timers.pop(action.key, None)
            elif isinstance(action, core.Emit):
                self.events.append((action.event, action.id, action.details))
            elif isinstance(action, core.Exit):
                assert self.exit is None, "Exit twice"
                self.exit = action.status
        self._settle()

    def _settle(self) -> None:
        while self.pending:
            kind, cid = self.pending.pop(0)
            node = self.tree.nodes.get(cid)
            if node is None or node.pid is None:
                continue
            if kind == "ready" and node.state == "starting":
                self.apply(self.tree.ready(cid, self.now))
            elif kind == "killed":
                self.apply(self.tree.exited(cid, "crash", self.now))
            elif kind == "termed":
                self.apply(self.tree.exited(cid, "shutdown", self.now))

    def start(self) -> Sim:
        self.apply(self.tree.start(self.now))
        return self

    def crash(self, cid: str, reason: str = "crash") -> None:
        self.apply(self.tree.exited(cid, reason, self.now))  # type: ignore[arg-type]

    def ready(self, cid: str) -> None:
        self.apply(self.tree.ready(cid, self.now))

    def advance(self, dt: float) -> None:
        """Move the clock, firing due timers in time order."""
        end = self.now + dt
        while True:
            due = [(at, k) for k, at in self.timers.items() if at <= end]
            if not due:
                break
            at, key = min(due, key=lambda t: t[0])
            del self.timers[key]
            self.now = max(self.now, at)
            self.apply(self.tree.timer(key, self.now))
        self.now = end

    # -- looking ----------------------------------------------------------------

    def state(self, cid: str) -> str:
        return self.tree.nodes[cid].state

    def pid(self, cid: str) -> int | None:
        return self.tree.nodes[cid].pid

    def names(self, event: str) -> list[str]:
        return [cid for (e, cid, _) in self.events if e == event]

    def clear(self) -> None:
        self.events.clear()
        self.signals.clear()
        self.spawns.clear()
