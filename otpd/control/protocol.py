"""Control-socket frames (DESIGN §4): msgpack maps, streamed, size-limited.

Request ``{"id": n, "op": "...", "args": {...}}``; reply ``{"id": n, "ok": true,
"result": ...}`` or ``{"id": n, "ok": false, "error": {"code", "message", "details"}}``.
After ``events``, the connection carries ``{"event": ..., ...}`` frames.
"""

from __future__ import annotations

from typing import Any

import msgpack

from otpd import codec

MAX_FRAME = 1 << 20  # a request larger than this closes the connection
OUT_CAP = 16 << 20  # a client that lets this much pile up unread is dropped
MAX_ID = (1 << 63) - 1


pack = codec.pack


def unpacker(max_frame: int = MAX_FRAME) -> msgpack.Unpacker:
    return codec.unpacker(max_frame)


def ok(req_id: Any, result: Any) -> dict[str, Any]:
    return {"id": req_id, "ok": True, "result": result}


def fail(req_id: Any, error: dict[str, Any]) -> dict[str, Any]:
    return {"id": req_id, "ok": False, "error": error}
