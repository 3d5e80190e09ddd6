"""Task handlers and an agent for the tests of tests/agents (named in their configs).

The daemon imports this module when it checks a config (``tests.agents.handlers:Hog``), so it
imports only the standard library.

Handlers (``fn(payload) -> result``, run on a TaskAgent's worker threads):

* ``gate``: the test controls when it finishes.  Run k (it appends a line to ``payload["runs"]``
  and counts them) opens the FIFO ``payload["fifo"] + ".k"`` for reading, which blocks until the
  test opens it for writing: the test's open returning proves that run k is running *now*.  It
  then reads until the test closes its end; ``b"fail"`` makes it raise, anything else is returned.
* ``fail_unless_file``: raises until ``payload["file"]`` exists.
* ``exit_agent``: ends the agent's process (``os._exit``), as a segfault in a handler would.
"""

from __future__ import annotations

import os
from typing import Any

from otpd.agent.base import Agent


def gate(payload: dict[str, Any]) -> str:
    with open(payload["runs"], "a+", encoding="utf-8") as f:
        f.write(f"{payload.get('n', '')}\n")
        f.seek(0)
        run = len(f.read().splitlines())
    with open(f"{payload['fifo']}.{run}", "rb") as fifo:  # a FIFO per run: no run sees another's test end
        data = fifo.read()
    if data == b"fail":
        raise RuntimeError(f"gate {payload.get('n', '')} told to fail")
    return data.decode("utf-8", "replace")


def fail_unless_file(payload: dict[str, Any]) -> str:
    if not os.path.exists(payload["file"]):
        raise FileNotFoundError(f"{payload['file']} is not there yet")
    return "ok"


def exit_agent(payload: Any) -> None:
    os._exit(7)


class Hog(Agent):
    """Holds memory on demand: cast ``{"alloc_mb": n}`` (resident: the bytes are written) and
    ``{"free": true}``; call ``"pid"`` -> its pid, ``"held_mb"`` -> MiB held."""

    def init(self) -> None:
        self.held: list[bytes] = []

    def handle_cast(self, message: Any) -> None:
        if isinstance(message, dict) and "alloc_mb" in message:
            self.held.append(b"\x01" * (int(message["alloc_mb"]) << 20))
        elif isinstance(message, dict) and message.get("free"):
            self.held.clear()

    def handle_call(self, request: Any) -> Any:
        if request == "pid":
            return os.getpid()
        if request == "held_mb":
            return sum(len(b) for b in self.held) >> 20
        return request


class _BadStr(Exception):
    def __str__(self) -> str:
        raise ValueError("no str for you")


class _NotStr(Exception):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


def raises_bad_str(payload: Any) -> None:
    raise _BadStr()


def raises_not_str(payload: Any) -> None:
    raise _NotStr()
