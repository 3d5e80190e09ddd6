"""Attached links: client connections the daemon handed to an agent (``attach``).

A call through the daemon crosses two sockets and three processes; on a link the client
talks to the agent's process directly, as an Erlang process sends to a pid it looked up
by name.  The daemon keeps what it is for: it accepts the connection and checks the peer
(SO_PEERCRED), finds the agent by name, and passes the fd over the agent's channel with
SCM_RIGHTS.  The agent answers the ``attach`` request on the link, then its calls:

    client -> agent: [id, request]                       (a call; id an integer)
    agent -> client: [id, true, result] | [id, false, {"code", "message", "details"}]

The same ``handle_call``, the same group commit (a link's calls share a commit with the
channel's and every other link's that arrived together), the same write before the reply.
The link ends with the agent's process: the client sees the connection close, with the
outcome of the calls it had in flight unknown, and attaches again to the replacement.
A call on a link has no timeout but the client's own.

Bad input ends the link, never the agent: bytes that are not msgpack, a frame longer than
``MAX_FRAME`` (counted in bytes fed since the last whole frame: every frame up to it is
taken), or a client that lets ``OUT_CAP`` bytes of replies pile up unread.  A frame of
another shape gets ``bad_request``.  When the agent's process ends on its own (``end_after_commit``,
a shutdown), the replies still queued for slow readers are sent first, within the daemon's
limits (``drain``, ``Runtime._drain_links``).  An agent takes at most half its RLIMIT_NOFILE in links
(``max_links``); beyond, an attach is answered ``internal`` and closed, the agent unharmed.
"""

from __future__ import annotations

import resource
import select
import selectors
import socket
import time
from collections.abc import Callable
from typing import Any

from otpd import codec
from otpd.control import protocol
from otpd.errors import OtpdError

MAX_FRAME, OUT_CAP, MAX_ID = protocol.MAX_FRAME, protocol.OUT_CAP, protocol.MAX_ID
READ_SIZE = codec.READ_SIZE
SHAPE = "a call on an attached link is [id, request], id an integer"


class Link:
    __slots__ = ("sock", "selector", "unpacker", "out", "events", "replies", "closed", "eof", "whole", "owed",
                 "on_close", "fed", "frame_at")

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 on_close: Callable[[], None] | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.selector = selector
        # A frame up to MAX_FRAME, incomplete, plus one read always fit: no frame within the
        # limit is refused, whatever the reads' sizes (server.Connection counts instead).
        self.unpacker = codec.unpacker(MAX_FRAME + READ_SIZE)
        self.out = bytearray()
        self.events = selectors.EVENT_READ  # what the selector watches for (0: not registered)
        self.owed = 0  # calls read and not answered yet (their replies wait for a commit, or a sync)
        self.replies: list[Any] = []  # of the batch being applied, sent once it is committed
        self.closed = False
        self.eof = False  # the client shut down its side: answered, then closed
        self.whole = True  # one whole frame per read so far (a client with one call in flight)
        self.fed = self.frame_at = 0  # bytes given to the stream decoder; where its last whole frame ended
        self.on_close = on_close
        selector.register(sock, selectors.EVENT_READ, self)

    def read(self) -> list[Any]:
        """The calls one read brings."""
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            self.eof = True  # no more reads (EOF stays readable); closed once it is answered
            self._settle()
            return []
        return self.feed(data)

    def feed(self, data: bytes) -> list[Any]:
        """The frames ``data`` completes; each is owed one reply (a call's, or bad_request)."""
        frames = self._decode(data)
        self.owed += len(frames)
        return frames

    def _decode(self, data: bytes) -> list[Any]:
        if self.whole:  # every read so far was one whole frame: decoded without the stream decoder
            try:
                return [codec.unpack(data)]
            except Exception:  # several frames, part of one, or garbage: the stream decoder tells
                self.whole = False  # (for good: it may hold part of a frame from now on)
        unpacker = self.unpacker
        frames = []
        try:
            unpacker.feed(data)
            for frame in unpacker:
                frames.append(frame)
                self.frame_at = unpacker.tell()
        except Exception:  # BufferFull (a frame over the limit), or not msgpack: nothing to answer
            self.close()
            return []
        self.fed += len(data)
        if self.fed - self.frame_at > MAX_FRAME:
            # What follows the last whole frame is one frame, still incomplete, and over the limit.
            # (The decoder's buffer limit does not see it: it drops what it has parsed, so a frame
            # of many small elements passes it, and is built in memory at ~8 bytes per byte sent.)
            self.close()
            return []
        return frames

    def send(self, data: bytes, replies: int = 0) -> None:
        """Send now what the socket takes; queue the rest (up to OUT_CAP), sent when writable.
        ``replies``: how many of the calls it is owed ``data`` answers."""
        self.owed -= replies
        if self.closed:
            return
        if not self.out:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(data):
                if self.eof:
                    self._settle()
                return
            data = data[sent:]
        if len(self.out) + len(data) > OUT_CAP:
            self.close()  # it stopped reading its replies
            return
        self.out += data
        self.flush()

    def flush(self) -> None:
        if self.closed:
            return
        if not protocol.send_out(self.sock, self.out):
            self.close()
            return
        self._settle()

    def _settle(self) -> None:
        """Watch for what is due: reads until EOF, writes while replies are queued; close once
        a client that shut down its side has every reply it is owed."""
        if self.eof and not self.out and self.owed <= 0:
            self.close()
            return
        events = (0 if self.eof else selectors.EVENT_READ) | (selectors.EVENT_WRITE if self.out else 0)
        if events == self.events:
            return
        if not events:
            self.selector.unregister(self.sock)
        elif not self.events:
            self.selector.register(self.sock, events, self)
        else:
            self.selector.modify(self.sock, events, self)
        self.events = events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.out.clear()
        self.replies.clear()
        if self.events:
            self.selector.unregister(self.sock)
        self.sock.close()
        if self.on_close is not None:
            self.on_close()


def drain(links: list[Link], seconds: float) -> None:
    """Before the agent's process ends: send the replies still queued for clients slow to
    read them, for at most ``seconds`` in all.  A link that still holds some then is closed
    with them, as if the agent had been killed (its client attaches again)."""
    waiting = {link.sock.fileno(): link for link in links if link.out and not link.closed}
    if not waiting:
        return
    deadline = time.monotonic() + seconds
    poll = select.poll()  # (takes no fd, unlike an epoll: an agent at its fd limit drains too)
    for fd in waiting:
        poll.register(fd, select.POLLOUT)
    while waiting and (left := deadline - time.monotonic()) > 0:
        for fd, _mask in poll.poll(left * 1000):
            link = waiting[fd]
            if not protocol.send_out(link.sock, link.out) or not link.out:
                poll.unregister(fd)  # (gone, or all sent)
                del waiting[fd]


def max_links() -> int:
    """How many links an agent takes: half its fd limit, so that a client attaching again and
    again cannot take the fds the agent needs itself (a worker's pipe, the store's files)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(1, soft // 2) if soft != resource.RLIM_INFINITY else 1 << 16


def bad_shape(frame: Any) -> list[Any]:
    """The reply to a frame that is not ``[id, request]``."""
    req_id = frame[0] if type(frame) is list and frame and type(frame[0]) is int else None
    return [req_id, False, OtpdError("bad_request", SHAPE).to_wire()]


def is_call(frame: Any) -> bool:
    return type(frame) is list and len(frame) == 2 and type(frame[0]) is int and 0 <= frame[0] <= MAX_ID
