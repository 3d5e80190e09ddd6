"""Agents the system tests name in their configs ("agents_for_tests:Controlled").

The daemon imports this module (the test fixture puts tests/ on its
PYTHONPATH), so it stays small and imports only what the agents need.

Every agent here is driven over the control socket:

* casts ``{"do": "stop"}`` (``Agent.stop()``: a normal exit),
  ``{"do": "exit", "code": n}`` (``os._exit(n)``: a crash unless n == 0) and
  ``{"do": "raise"}`` (an exception escapes the callback: a crash);
* calls ``"pid"`` (the agent's own pid), ``"args"`` (its args), ``"fail"`` (an
  ``OtpdError`` reply), ``"crash"`` (``os._exit(5)`` during the call), ``"hang"``
  (never answers) and anything else (echoed back); cast ``{"do": "hang-unseen"}``
  hangs with its liveness stamps saying it waits.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from otpd.agent.base import Agent
from otpd.errors import OtpdError


class Controlled(Agent):
    """An echo agent that can be told to stop, exit or raise."""

    def handle_call(self, request: Any) -> Any:
        if request == "pid":
            return os.getpid()
        if request == "args":
            return self.args
        if request == "fail":
            raise OtpdError("bad_request", "failed on request", {"agent": self.id})
        if request == "crash":
            os._exit(5)
        if request == "unencodable":
            return {"not msgpack": object()}
        if isinstance(request, dict) and "reply_bytes" in request:
            return "x" * request["reply_bytes"]
        if request == "hang":
            while True:
                signal.pause()
        return request

    def handle_cast(self, message: Any) -> None:
        action = message.get("do") if isinstance(message, dict) else None
        if action == "stop":
            self.stop()
        elif action == "exit":
            os._exit(int(message.get("code", 3)))
        elif action == "raise":
            raise RuntimeError("raised on request")
        elif action == "hang-unseen":  # hangs while its stamps say it waits: only unread input can tell
            from otpd.posix.liveness import Stamp

            runtime = self._runtime
            assert runtime is not None
            runtime.stamp.waiting()
            runtime.stamp = Stamp(None, -1)
            print("hanging unseen", flush=True)  # the test's cue: input sent from now on stays unread
            while True:
                signal.pause()


class Gated(Controlled):
    """Controlled, with an arg only the config sets (``allowed``): a dynamic child takes its template's."""

    config_args = ("allowed",)


class CrashInInit(Agent):
    """Fails every start: ``init`` raises."""

    def init(self) -> None:
        raise RuntimeError("boom in init")


class FifoInInit(Controlled):
    """``init`` opens the FIFO ``args["fifo"]`` to read, which blocks until the test has it open to write."""

    def init(self) -> None:
        os.close(os.open(self.args["fifo"], os.O_RDONLY))


class CrashInInitWhenGated(Controlled):
    """Starts normally until the file ``args["gate"]`` exists; from then on every start fails."""

    def init(self) -> None:
        if Path(self.args["gate"]).exists():
            raise RuntimeError("gate is closed")


class IgnoresTerm(Controlled):
    """Ignores SIGTERM, so only the SIGKILL at the end of its shutdown timeout stops it."""

    def init(self) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TouchOnInit(Controlled):
    """Creates the file ``args["path"]`` in init: proof that a process was forked and started."""

    def init(self) -> None:
        Path(self.args["path"]).touch()


class Picky(Controlled):
    """Checks its args before anything is forked: ``size`` an integer; ``crash_check`` makes the
    check itself fail (a bug in a user's check_args); ``touch`` proves a process started."""

    @classmethod
    def check_args(cls, args: dict[str, Any]) -> None:
        if args.get("crash_check"):
            raise KeyError("a bug in the check")
        if not isinstance(args.get("size", 0), int):
            raise OtpdError("config_invalid", f"size must be an integer, got {args['size']!r}")
        args["size"] = "changed by the check"  # a copy: the agent never sees this

    def init(self) -> None:
        if "touch" in self.args:
            Path(self.args["touch"]).touch()
