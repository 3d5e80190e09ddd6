"""Agents' stdout and stderr: read line by line, prefixed with the agent's id, rate-limited.

Each child writes both streams into one pipe; the daemon reads it without blocking and
logs every complete line as ``<id>: line``.  A token bucket per child (LINES_PER_S,
BURST) keeps one noisy agent from flooding the daemon or the journal: lines over the
limit are dropped and counted, and the count is logged once the agent is within its
rate again (or when it exits).
"""

from __future__ import annotations

import os
from collections.abc import Callable

LINES_PER_S = 200.0
BURST = 1000.0
MAX_LINE = 16 * 1024  # longer lines are cut; an endless line cannot grow the buffer


class OutputReader:
    __slots__ = ("fd", "child_id", "log", "buf", "tokens", "last", "dropped")

    def __init__(self, fd: int, child_id: str, log: Callable[[str, str], None], now: float) -> None:
        self.fd = fd
        self.child_id = child_id
        self.log = log
        self.buf = b""
        self.tokens = BURST
        self.last = now
        self.dropped = 0

    def read(self, now: float) -> bool:
        """Read what is there; False at EOF (the pipe is then closed)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            if self.buf:
                self._line(self.buf, now)
            self._report_dropped()
            os.close(self.fd)
            return False
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        if len(self.buf) > MAX_LINE:
            lines.append(self.buf[:MAX_LINE] + b" [cut]")
            self.buf = b""
        for line in lines:
            self._line(line, now)
        return True

    def _line(self, line: bytes, now: float) -> None:
        self.tokens = min(BURST, self.tokens + (now - self.last) * LINES_PER_S)
        self.last = now
        if self.tokens < 1.0:
            self.dropped += 1
            return
        self.tokens -= 1.0
        self._report_dropped()
        self.log("info", f"{self.child_id}: {line[:MAX_LINE].decode('utf-8', 'replace').rstrip()}")

    def _report_dropped(self) -> None:
        if self.dropped:
            self.log("warning", f"{self.child_id}: {self.dropped} output lines dropped (over {LINES_PER_S:g}/s)")
            self.dropped = 0
