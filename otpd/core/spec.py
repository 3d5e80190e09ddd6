"""Child specifications: the validated, frozen shape of a supervision tree.

The config layer builds these once at the edge; everything inside trusts them.
Words are OTP's: restart types, strategies, intensity, shutdown / brutal_kill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Restart = Literal["permanent", "transient", "temporary"]
Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
SupervisorKind = Literal["static", "dynamic"]
StartOrder = Literal["serial", "parallel"]
SparePolicy = Literal["on_restart", "always", "never"]

RESTARTS: tuple[str, ...] = ("permanent", "transient", "temporary")
STRATEGIES: tuple[str, ...] = ("one_for_one", "one_for_all", "rest_for_one")
START_ORDERS: tuple[str, ...] = ("serial", "parallel")
SPARE_POLICIES: tuple[str, ...] = ("on_restart", "always", "never")

DEFAULT_MAX_RESTARTS = 3
DEFAULT_MAX_SECONDS = 5.0
DEFAULT_SHUTDOWN_MS = 5000
DEFAULT_HEARTBEAT_MS = 2000
DEFAULT_HEARTBEAT_TIMEOUT_MS = 10000


@dataclass(frozen=True)
class AgentSpec:
    """One agent: an OS process running ``agent`` (``module:Class``)."""

    id: str
    agent: str
    restart: Restart = "permanent"
    # None means brutal_kill: SIGKILL at once, no SIGTERM.
    shutdown_ms: int | None = DEFAULT_SHUTDOWN_MS
    heartbeat_ms: int = DEFAULT_HEARTBEAT_MS
    # 0 disables the liveness check for this child.
    heartbeat_timeout_ms: int = DEFAULT_HEARTBEAT_TIMEOUT_MS
    args: dict[str, Any] = field(default_factory=dict, compare=True, hash=False)
    # A version switch: run ``agent_next`` instead of ``agent`` where feature flag
    # ``switch`` is on for this child (its state is migrated, and kept for a rollback).
    agent_next: str | None = None
    switch: str | None = None
    # A warm spare: a process forked and booted ahead (imports done, the store open) that
    # waits to become the agent at its next restart.  on_restart: keep one once the agent
    # has restarted (an agent that crashes once tends to again); always: from its first start.
    spare: SparePolicy = "on_restart"


@dataclass(frozen=True)
class SupervisorSpec:
    """A supervisor node inside the daemon (no process of its own)."""

    id: str
    kind: SupervisorKind = "static"
    strategy: Strategy = "one_for_one"
    max_restarts: int = DEFAULT_MAX_RESTARTS
    max_seconds: float = DEFAULT_MAX_SECONDS
    restart: Restart = "permanent"
    children: tuple[ChildSpec, ...] = ()
    # dynamic supervisors: the spec children added at run time start from
    # (OTP's simple_one_for_one child spec); its id is a placeholder.
    template: AgentSpec | None = None
    # serial: OTP's order, each child ready before the next starts, stopped in reverse
    # order.  parallel: for independent children (a pool of workers): consecutive
    # starts overlap and the supervisor is up once all are ready; stops are all at once.
    start: StartOrder = "serial"


ChildSpec = AgentSpec | SupervisorSpec


def walk(spec: SupervisorSpec) -> list[ChildSpec]:
    """Every node under ``spec`` (itself included), depth first in start order."""
    out: list[ChildSpec] = [spec]
    for child in spec.children:
        if isinstance(child, SupervisorSpec):
            out.extend(walk(child))
        else:
            out.append(child)
    return out
