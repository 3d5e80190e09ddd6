"""Agents for the benchmarks (the daemon imports this with scripts/ on PYTHONPATH).

``ReadyAgent`` signals readiness exactly like ``bench_child.py`` does under
supervisord and circus: one datagram with its PID to ``args.ready``, sent
from ``init()``.  Its loop is otpd's ordinary agent loop.
"""

from __future__ import annotations

from bench_child import signal_ready

from otpd.agent.base import Agent


class ReadyAgent(Agent):
    def init(self) -> None:
        path = self.args.get("ready")
        if path:
            signal_ready(str(path))
