"""Restart intensity and start backoff: two small pure functions.

``add_restart`` is OTP's: keep the restart timestamps that fall inside the
period, add ``now``, and report whether the supervisor is still within
``max_restarts``.  More than ``max_restarts`` restarts inside ``max_seconds``
means the supervisor gives up.
"""

from __future__ import annotations

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 5.0


def add_restart(
    restarts: tuple[float, ...], now: float, max_restarts: int, max_seconds: float
) -> tuple[tuple[float, ...], bool]:
    """Return (the new window, True if still within the intensity)."""
    window = tuple(t for t in restarts if now - t <= max_seconds) + (now,)
    return window, len(window) <= max_restarts


def backoff_delay(consecutive_start_failures: int) -> float:
    """Seconds to wait before starting a child that failed to start n times in a row.

    The first restart after a crash of a running child is immediate (n == 0);
    each start failure in a row doubles the wait, capped, so a child that
    cannot start never spins the CPU even with a generous intensity.
    """
    if consecutive_start_failures <= 0:
        return 0.0
    exponent = min(consecutive_start_failures - 1, 16)
    return float(min(BACKOFF_BASE_S * (2**exponent), BACKOFF_CAP_S))
