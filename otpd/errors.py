"""One error type for the library, the wire and the CLI, with stable codes."""

from __future__ import annotations

from typing import Any

CODES = frozenset(
    {
        "bad_request",
        "not_found",
        "already_exists",
        "timeout",
        "agent_down",
        "agent_crashed",
        "store_full",
        "store_corrupt",
        "config_invalid",
        "permission_denied",
        "shutting_down",
        "internal",
    }
)


class OtpdError(Exception):
    """An error with a stable ``code`` (one of ``CODES``), a message and details."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details or {}

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_wire(cls, error: Any) -> OtpdError:
        if not isinstance(error, dict) or error.get("code") not in CODES:
            return cls("internal", f"malformed error from the daemon: {error!r}")
        details = error.get("details")
        return cls(error["code"], str(error.get("message", "")), details if isinstance(details, dict) else {})

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
