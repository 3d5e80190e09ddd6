"""Control-socket frames (DESIGN §4): msgpack maps, streamed, size-limited.

Request ``{"id": n, "op": "...", "args": {...}}``; reply ``{"id": n, "ok": true,
"result": ...}`` or ``{"id": n, "ok": false, "error": {"code", "message", "details"}}``.
After ``events``, the connection carries ``{"event": ..., ...}`` frames.

One exception, for the hot path: a call may also travel as a compact frame, an array
``[id, "call", agent_id, request]`` (or ``[..., timeout]``), answered ``[id, true, result]``
or ``[id, false, {"code", "message", "details"}]``.  The same call, the same errors and
timeouts; only the encoding differs.  Decoding a map makes a dict and looks up (interned)
string keys, so the map form costs the daemon ~1.6 µs per request against ~0.5 µs, and
a client ~0.9 µs per reply against ~0.2 µs: about a fifth of a pipelined call's CPU.
A map request is always answered with a map, and so is an array without a valid id
(``{"id": null, "ok": false, ...}``, as any request without one).

``{"op": "attach", "args": {"id": agent}}`` hands the connection to that agent's process: the
agent answers the attach (a map), then the connection carries ``[id, request]`` calls answered
``[id, true, result]`` / ``[id, false, error]`` by the agent itself (otpd/agent/links.py).
"""

from __future__ import annotations

import socket
from typing import Any

import msgpack

from otpd import codec

MAX_FRAME = 1 << 20  # a request larger than this closes the connection
OUT_CAP = 16 << 20  # a client that lets this much pile up unread is dropped
MAX_ID = (1 << 63) - 1
CALL_TIMEOUT_S = 5.0  # a call's timeout when the request names none
MAX_TIMEOUT = 86400.0 * 7  # seconds, a wait's or a call's: longer is a mistake (NaN or infinity would break timers)


pack = codec.pack


def unpacker(max_frame: int = MAX_FRAME) -> msgpack.Unpacker:
    return codec.unpacker(max_frame)


def send_out(sock: socket.socket, out: bytearray) -> bool:
    """Send what a non-blocking socket takes of ``out`` now (removed from it); False if the
    peer is gone.  A control connection's and an attached link's flush."""
    while out:
        try:
            sent = sock.send(out)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del out[:sent]
    return True


def ok(req_id: Any, result: Any) -> dict[str, Any]:
    return {"id": req_id, "ok": True, "result": result}


def fail(req_id: Any, error: dict[str, Any]) -> dict[str, Any]:
    return {"id": req_id, "ok": False, "error": error}
