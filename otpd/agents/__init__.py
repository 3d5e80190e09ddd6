"""The built-in agents, and what they share."""

from __future__ import annotations

from typing import Any

from otpd.errors import OtpdError


def timeout_arg(value: Any, name: str, code: str) -> float:
    """A timeout in seconds from the config (``code`` config_invalid) or a request (bad_request)."""
    if type(value) not in (int, float) or not 0 <= value <= 86_400 * 365:  # NaN fails too
        raise OtpdError(code, f"{name} must be a number of seconds >= 0 (0: no limit), got {value!r}")
    return float(value)


def error_text(error: BaseException) -> str:
    """What a task's or a step's failure is recorded as: its type and message, at most 2,000 characters."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 2000 else text[:2000] + "..."
