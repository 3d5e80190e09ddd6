"""A blocking Python client of the control socket, used by otpctl and the tests.

    from otpd.client import Client
    with Client("var/run/otpd.sock") as c:
        print(c.request("status"))
        c.request("kill", {"id": "echo"})
        c.request("wait", {"id": "echo", "state": "running", "not_pid": old_pid})

Errors from the daemon raise ``OtpdError`` with the daemon's code; a socket
that cannot be reached raises ``Unreachable``.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from otpd import codec
from otpd.control import protocol
from otpd.errors import OtpdError

SYSTEM_SOCKET = Path("/run/otpd/otpd.sock")


class Unreachable(Exception):
    """The daemon's socket is missing, refuses connections, or went away."""


def default_socket() -> Path:
    """$OTPD_SOCKET, else the systemd layout's socket if present, else the default config's."""
    env = os.environ.get("OTPD_SOCKET")
    if env:
        return Path(env)
    if SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    repo_config = Path(__file__).resolve().parents[2] / "config" / "otpd.toml"
    return repo_config.parent / "var" / "run" / "otpd.sock"


class Client:
    def __init__(self, path: str | Path | None = None, timeout: float | None = 60.0) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if timeout is not None and timeout > 0:
            # The kernel's timeouts, not Python's: with settimeout() every send and recv
            # is a poll() and then the call, twice the syscalls on the hot path.
            # The socket stays blocking; a timed-out call fails with EAGAIN.
            tv = struct.pack("ll", *divmod(max(1, round(timeout * 1e6)), 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        else:
            self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as exc:
            self.sock.close()
            raise Unreachable(f"cannot reach otpd at {self.path}: {exc.strerror or exc}") from None
        self.unpacker = codec.unpacker(1 << 30)
        self.next_id = 1

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, op: str, args: dict[str, Any] | None = None) -> int:
        req_id = self.next_id
        self._sendall(_encode({"id": req_id, "op": op, "args": args or {}}))
        self.next_id += 1
        return req_id

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise Unreachable(f"otpd at {self.path} went away: {exc}") from None

    def receive(self) -> dict[str, Any]:
        """The next frame from the daemon (a reply or an event)."""
        unpacker = self.unpacker
        while True:
            for frame in unpacker:  # (not next(): an empty buffer would cost a StopIteration)
                return frame  # type: ignore[no-any-return]
            try:
                data = self.sock.recv(256 * 1024)
            except (TimeoutError, BlockingIOError):  # the socket's timeout (EAGAIN from SO_RCVTIMEO)
                raise OtpdError("timeout", f"no answer from otpd at {self.path}") from None
            except OSError as exc:
                raise Unreachable(f"otpd at {self.path} went away: {exc}") from None
            if not data:
                raise Unreachable(f"otpd at {self.path} closed the connection")
            unpacker.feed(data)

    def request(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result, or raise its OtpdError."""
        req_id = self.send(op, args)
        while True:
            frame = self.receive()
            if frame.get("id") == req_id or frame.get("id") is None and "ok" in frame:
                return _result(frame)

    def pipeline(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Send every request at once, then collect the replies (results or OtpdErrors) in order."""
        data = bytearray()
        ids = []
        for op, args in requests:
            ids.append(self.next_id)
            data += _encode({"id": self.next_id, "op": op, "args": args})
            self.next_id += 1
        self._sendall(bytes(data))
        replies: dict[int, Any] = {}
        while len(replies) < len(ids):
            frame = self.receive()
            try:
                replies[frame["id"]] = _result(frame)
            except OtpdError as err:
                replies[frame["id"]] = err
        return [replies[i] for i in ids]

    def events(self, last: int = 0) -> Iterator[dict[str, Any]]:
        """Subscribe and yield events as they come, after the ``last`` recent ones
        (blocks; the socket timeout applies)."""
        yield from self.request("events", {"follow": True, "last": last})["events"]
        while True:
            frame = self.receive()
            if "event" in frame:
                yield frame


def _encode(request: dict[str, Any]) -> bytes:
    try:
        return protocol.pack(request)
    except (TypeError, ValueError, OverflowError) as exc:
        raise OtpdError("bad_request", f"the request cannot be encoded as msgpack: {exc}") from None


def _result(frame: dict[str, Any]) -> Any:
    if frame.get("ok"):
        return frame.get("result")
    raise OtpdError.from_wire(frame.get("error"))
