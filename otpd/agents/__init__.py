"""The built-in agents, and what they share."""

from __future__ import annotations

from typing import Any

from otpd.errors import OtpdError


def timeout_arg(value: Any, name: str, code: str) -> float:
    """A timeout in seconds from the config (``code`` config_invalid) or a request (bad_request)."""
    if type(value) not in (int, float) or not 0 <= value <= 86_400 * 365:  # NaN fails too
        raise OtpdError(code, f"{name} must be a number of seconds >= 0 (0: no limit), got {value!r}")
    return float(value)
