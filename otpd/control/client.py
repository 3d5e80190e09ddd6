"""A blocking Python client of the control socket, used by otpctl and the tests.

    from otpd.client import Client
    with Client("var/run/otpd.sock") as c:
        print(c.request("status"))
        print(c.call("echo", {"hello": 1}))        # the same as c.request("call", {"id": "echo", ...})
        c.request("kill", {"id": "echo"})
        c.request("wait", {"id": "echo", "state": "running", "not_pid": old_pid})

``call`` and the calls of ``pipeline`` travel as compact frames (protocol.py): arrays, not
maps, which cost the client and the daemon about half as much to encode and decode.

``attach`` hands the connection to one agent, which then answers its calls itself, the
daemon's hop skipped (otpd/agent/links.py)::

    with Client(path).attach("kv") as kv:
        kv.call({"op": "put", "key": "a", "value": 1})

Errors from the daemon raise ``OtpdError`` with the daemon's code; a socket
that cannot be reached raises ``Unreachable``; a request the client refuses to send
(or a timeout it cannot use) raises ``BadRequest``, an ``OtpdError`` the daemon never saw.
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
MAX_TIMEOUT = protocol.MAX_TIMEOUT  # the daemon's limit on a wait's or a call's timeout
REPLY_MARGIN = 10.0  # seconds a client waits for an answer past the daemon's own timeout (it answers that)
MAX_SOCKET_TIMEOUT = MAX_TIMEOUT + REPLY_MARGIN
_MAX_FRAME = protocol.MAX_FRAME


class Unreachable(Exception):
    """The daemon's socket is missing, refuses connections, or went away."""


class BadRequest(OtpdError):
    """``bad_request`` found by the client itself, before anything was sent: the daemon never saw it."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_request", message)


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
        """``timeout``: seconds each send and receive may wait (None: no limit).  0 is refused: it
        would make the socket non-blocking, and every receive a timeout."""
        if timeout is not None and not (isinstance(timeout, (int, float)) and 0 < timeout <= MAX_SOCKET_TIMEOUT):
            # (NaN fails the comparison too; infinity and huge values fit no timeval)
            raise BadRequest(f"timeout must be None (no limit) or seconds in (0, {MAX_SOCKET_TIMEOUT:g}], "
                             f"not {timeout!r}")
        self.path = Path(path) if path is not None else default_socket()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if timeout is not None:
            # The kernel's timeouts, not Python's: with settimeout() every send and recv
            # is a poll() and then the call, twice the syscalls on the hot path.
            # The socket stays blocking; a timed-out call fails with EAGAIN.
            tv = struct.pack("ll", *divmod(max(1, round(timeout * 1e6)), 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        else:
            self.sock.settimeout(None)  # blocking, whatever socket.setdefaulttimeout() says
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

    def receive(self) -> Any:
        """The next frame from the daemon: a reply or an event (maps), or a compact reply (an array)."""
        unpacker = self.unpacker
        while True:
            for frame in unpacker:  # (not next(): an empty buffer would cost a StopIteration)
                return frame
            try:
                data = self.sock.recv(codec.READ_SIZE)
            except (TimeoutError, BlockingIOError):  # the socket's timeout (EAGAIN from SO_RCVTIMEO)
                raise OtpdError("timeout", f"no answer from otpd at {self.path}") from None
            except OSError as exc:
                raise Unreachable(f"otpd at {self.path} went away: {exc}") from None
            if not data:
                raise Unreachable(f"otpd at {self.path} closed the connection")
            unpacker.feed(data)

    def request(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result, or raise its OtpdError."""
        return self._await(self.send(op, args))

    def call(self, agent_id: str, request: Any, timeout: float | None = None) -> Any:
        """Call an agent and return its reply (or raise its OtpdError): ``request("call", ...)``
        in a compact frame.  ``timeout``: the daemon's, default ``protocol.CALL_TIMEOUT_S``."""
        req_id = self.next_id
        self.next_id += 1
        self._sendall(_encode(_compact(req_id, agent_id, request, timeout)))
        return self._await(req_id)

    def _await(self, req_id: int) -> Any:
        while True:
            frame = self.receive()
            answers = _answers(frame)
            if answers == req_id or answers is REFUSED:
                return _outcome(frame)

    def pipeline(self, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Send every request at once, then collect the replies (results or OtpdErrors) in order.
        Calls (``("call", {"id", "request"[, "timeout"]})``) go as compact frames."""
        data = bytearray()
        ids = []
        for op, args in requests:
            ids.append(self.next_id)
            if op == "call" and type(args.get("id")) is str and set(args) <= {"id", "request", "timeout"} \
                    and args.get("timeout", protocol.CALL_TIMEOUT_S) is not None:  # (None: refused, in a map)
                data += _encode(_compact(self.next_id, args["id"], args.get("request"), args.get("timeout")))
            else:
                data += _encode({"id": self.next_id, "op": op, "args": args})
            self.next_id += 1
        self._sendall(bytes(data))
        replies: dict[int, Any] = {}
        wanted = set(ids)
        while len(replies) < len(ids):
            frame = self.receive()
            answers = _answers(frame)
            if answers is REFUSED:
                _outcome(frame)  # raises it
            if answers not in wanted:  # an event, or the late reply of an earlier request
                continue
            try:
                replies[answers] = _outcome(frame)
            except OtpdError as err:
                replies[answers] = err
        return [replies[i] for i in ids]

    def attach(self, agent_id: str) -> Link:
        """Hand this connection to the running agent ``agent_id``: the ``Link`` returned calls it
        directly, and owns the connection from now on (this Client is done with)."""
        try:
            result = self.request("attach", {"id": agent_id})  # answered by the agent, on its side
        except Unreachable:  # closed unanswered: the agent that had it ended, or the daemon did
            if not self._daemon_answers():
                raise
            raise OtpdError("agent_down", f"agent {agent_id!r} ended before it answered the attach (or could "
                            "not take it): attach again", {"id": agent_id}) from None
        return Link(self, agent_id, int(result["pid"]) if type(result) is dict else 0)

    def _daemon_answers(self) -> bool:
        """Does the daemon still take connections at our path? (A closed connection alone does
        not say whether it or the agent it was handed to went away.)"""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)  # a full backlog must not block us: it means alive, not accepting
        try:
            probe.connect(str(self.path))
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def events(self, last: int = 0) -> Iterator[dict[str, Any]]:
        """Subscribe and yield events as they come, after the ``last`` recent ones
        (blocks; the socket timeout applies)."""
        yield from self.request("events", {"follow": True, "last": last})["events"]
        while True:
            frame = self.receive()
            if type(frame) is dict and "event" in frame:
                yield frame


class Link:
    """Calls straight to one agent's process (``Client.attach``): ``[id, request]`` frames,
    answered by the agent after its commit, as through the daemon.  When the agent's process
    ends the link is closed: a call then raises ``agent_down`` (for a call in flight, whether
    it was applied is unknown), and a new ``Client(...).attach(id)`` reaches the replacement.
    The Client's socket timeout is the calls' timeout (``timeout``); the agent sets none."""

    def __init__(self, client: Client, agent_id: str, pid: int) -> None:
        self.client = client
        self.agent_id = agent_id
        self.pid = pid
        self.closed = False

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def close(self) -> None:
        self.client.close()

    def call(self, request: Any) -> Any:
        """Call the agent; its result, or its OtpdError raised."""
        return _compact_result(self._await(self.send(request)))

    def send(self, request: Any) -> int:
        """Send one call without waiting; its id (``receive`` gives the replies in order)."""
        client = self.client
        req_id = client.next_id
        data = _encode([req_id, request])
        self._sendall(data)
        client.next_id += 1
        return req_id

    def pipeline(self, requests: list[Any]) -> list[Any]:
        """Send every call at once, then collect their results (or OtpdErrors) in order."""
        client = self.client
        first = client.next_id
        data = b"".join([_encode([first + i, request]) for i, request in enumerate(requests)])
        self._sendall(data)
        client.next_id += len(requests)
        out = []
        for i in range(len(requests)):
            frame = self._await(first + i)
            try:
                out.append(_compact_result(frame))
            except OtpdError as err:
                out.append(err)
        return out

    def receive(self) -> list[Any]:
        """The next reply: ``[id, true, result]`` or ``[id, false, error]``."""
        try:
            frame = self.client.receive()
        except Unreachable:
            self.closed = True
            raise self._down() from None
        if type(frame) is not list or len(frame) != 3:
            raise OtpdError("internal", f"malformed reply on the link to {self.agent_id!r}: {frame!r}")
        return frame

    def _await(self, req_id: int) -> list[Any]:
        while True:
            frame = self.receive()
            if frame[0] == req_id:
                return frame
            if frame[0] is None:  # a frame the agent could not read the id of: refused
                _compact_result(frame)

    def _sendall(self, data: bytes) -> None:
        if self.closed:
            raise self._down()
        try:
            self.client.sock.sendall(data)
        except (TimeoutError, BlockingIOError):  # the socket's timeout (SO_SNDTIMEO): the agent may well live
            raise OtpdError("timeout", f"the agent {self.agent_id!r} (pid {self.pid}) did not take the calls "
                                       "in time; part of them may have been sent", {"id": self.agent_id}) from None
        except OSError:
            self.closed = True
            raise self._down() from None

    def _down(self) -> OtpdError:
        return OtpdError("agent_down", f"the link to agent {self.agent_id!r} (pid {self.pid}) is closed: its "
                                       "process ended (a call in flight may or may not have been applied); "
                                       "attach again to reach its replacement", {"id": self.agent_id})


def _encode(request: dict[str, Any] | list[Any]) -> bytes:
    try:
        frame = protocol.pack(request)
    except (TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"the request cannot be encoded as msgpack: {exc}") from None
    if len(frame) > _MAX_FRAME:  # the daemon would close the connection, answering nothing
        raise BadRequest(f"the request is {len(frame)} bytes encoded, over the daemon's limit of "
                         f"{_MAX_FRAME} bytes per frame")
    return frame


REFUSED = object()  # what a reply with no id answers: every request (the connection is refused)


def _answers(frame: Any) -> Any:
    """The id of the request ``frame`` answers; REFUSED for a reply with no id
    (permission_denied, a request without a valid id); None for an event."""
    if type(frame) is list:  # a compact reply
        return frame[0]
    if "ok" not in frame:
        return None
    req_id = frame.get("id")
    return REFUSED if req_id is None else req_id


def _outcome(frame: Any) -> Any:
    """A reply's result, or its error raised."""
    return _compact_result(frame) if type(frame) is list else _result(frame)


def _compact(req_id: int, agent_id: str, request: Any, timeout: float | None) -> list[Any]:
    return [req_id, "call", agent_id, request] if timeout is None else [req_id, "call", agent_id, request, timeout]


def _compact_result(frame: list[Any]) -> Any:
    if len(frame) == 3 and frame[1] is True:
        return frame[2]
    raise OtpdError.from_wire(frame[2] if len(frame) == 3 else None)


def _result(frame: dict[str, Any]) -> Any:
    if frame.get("ok"):
        return frame.get("result")
    raise OtpdError.from_wire(frame.get("error"))
