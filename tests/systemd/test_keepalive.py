"""The daemon's watchdog pings (Daemon._keepalive), driven by hand: no systemd, no fork."""

from __future__ import annotations

import math
import time
from itertools import count
from typing import Any

import pytest

from otpd.posix import daemon as daemon_module
from otpd.posix.daemon import Daemon

pytestmark = pytest.mark.timeout(30)


class FakeNotifier:
    watchdog_interval = 5.0

    def __init__(self) -> None:
        self.pings = 0

    def watchdog(self) -> None:
        self.pings += 1


def bare_daemon() -> Any:
    d: Any = Daemon.__new__(Daemon)  # only what _keepalive and the timers use
    d.notify = FakeNotifier()
    d.timers, d.timer_seq, d.seq = [], {}, count(1)
    d.now = time.monotonic()
    d.watchdog_due = math.inf
    return d


def test_no_ping_before_the_watchdog_is_armed_then_one_per_half_period() -> None:
    d = bare_daemon()
    d._keepalive()
    assert d.notify.pings == 0 and d.timers == []
    d.watchdog_due = time.monotonic()  # armed, and due
    d._keepalive()
    d._keepalive()
    assert d.notify.pings == 1 and ("watchdog",) in d.timer_seq


def test_a_stuck_iteration_stops_the_pings_but_the_next_one_pings_again() -> None:
    d = bare_daemon()
    d.watchdog_due = time.monotonic()
    d.now = time.monotonic() - daemon_module.KEEPALIVE_WITHIN_S - 10  # one iteration, 130 s long
    d._keepalive()
    assert d.notify.pings == 0, "a loop stuck in one iteration must not feed the watchdog"
    assert ("watchdog",) in d.timer_seq, "the timer survives: the next iteration pings"
    d.now = time.monotonic()  # the next iteration
    d._keepalive()
    assert d.notify.pings == 1
