"""Feature flags: on, off, or a percentage rolled out by a stable hash.

A flag's value is a percentage (``"on"`` = 100, ``"off"`` = 0).  Whether it is on
*for a key* (an agent id, a workflow id) is ``hash(flag, key) mod 100 < percent``,
with a hash that is the same in every process and every run, so one key always gets
the same answer at a given percentage, and raising the percentage only ever turns
keys on (10 % -> 50 % keeps the first 10 % on).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from otpd.core.spec import AgentSpec, ChildSpec, SupervisorSpec


def parse(value: Any) -> float:
    """``"on"`` / ``"off"`` / ``25`` / ``"25%"`` / ``12.5`` -> a percentage; ValueError otherwise."""
    if value in ("on", True):
        return 100.0
    if value in ("off", False):
        return 0.0
    if isinstance(value, str) and value.endswith("%"):
        value = value[:-1]
    try:
        percent = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not on, off or a percentage") from None
    if not 0.0 <= percent <= 100.0:
        raise ValueError(f"{percent} is not a percentage (0..100)")
    return percent


def show(percent: float) -> str:
    return "on" if percent >= 100 else "off" if percent <= 0 else f"{percent:g}%"


def bucket(name: str, key: str) -> float:
    """Where ``key`` falls for flag ``name``: a stable number in [0, 100)."""
    digest = hashlib.blake2b(f"{name}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % 10_000 / 100.0


def enabled(name: str, percent: float, key: str) -> bool:
    if percent >= 100.0:
        return True
    if percent <= 0.0:
        return False
    return bucket(name, key) < percent


def effective_agent(spec: AgentSpec, flags: dict[str, float], key: str | None = None) -> AgentSpec:
    """The spec with ``agent_next`` in place of ``agent`` where its switch is on for this child."""
    if spec.switch is None or spec.agent_next is None:
        return spec
    if enabled(spec.switch, flags.get(spec.switch, 0.0), key or spec.id):
        return dataclasses.replace(spec, agent=spec.agent_next)
    return spec


def resolve(root: SupervisorSpec, flags: dict[str, float]) -> SupervisorSpec:
    """The tree to run: every switched agent on the class its flag picks."""
    def one(child: ChildSpec) -> ChildSpec:
        if isinstance(child, SupervisorSpec):
            return dataclasses.replace(child, children=tuple(one(c) for c in child.children))
        return effective_agent(child, flags)

    resolved = one(root)
    assert isinstance(resolved, SupervisorSpec)
    return resolved
