"""The control socket's server side: accept, frame, check, dispatch, buffer.

Non-blocking throughout and driven by the daemon's selector.  A client is
never allowed to block the loop: replies go to a per-connection buffer, and a
client that lets ``OUT_CAP`` bytes pile up unread is disconnected.  Garbage
(bytes that are not msgpack, or a frame over ``MAX_FRAME``) closes the
connection; a well-formed frame that is not a valid request gets
``bad_request``.  Peers are checked with SO_PEERCRED at accept.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import select
import selectors
import socket
import stat
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from otpd import codec
from otpd.control import protocol
from otpd.errors import OtpdError
from otpd.posix import system

Handler = Callable[["Connection", Any, dict[str, Any]], Any]
# A compact call: (replies, id, agent id, request, timeout) -> a result, or DEFERRED
CompactCall = Callable[["Compact", Any, Any, Any, Any], Any]
DEFERRED = object()  # a handler's result meaning "the reply comes later"
MAX_ID, OUT_CAP, MAX_FRAME = protocol.MAX_ID, protocol.OUT_CAP, protocol.MAX_FRAME
MAX_REPLY = OUT_CAP // 2  # one reply larger is an error: queued, it would close the connection, unanswered
READ_SIZE = codec.READ_SIZE
_pack = protocol.pack


def _too_big(size: int) -> OtpdError:
    return OtpdError("bad_request", f"the reply is {size:,} bytes, more than a reply may be ({MAX_REPLY:,}): "
                     "ask for less (a limit, a filter)", {"bytes": size, "limit": MAX_REPLY})


class Compact:
    """Where a connection's compact calls are answered: ``[id, true, result]`` or
    ``[id, false, error]`` (protocol.py), in the place of the map a request gets."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def reply(self, req_id: Any, result: Any) -> None:
        conn = self.conn
        conn.owed -= 1
        if not conn.closed:  # [req_id, True, result], packed around its two values
            packed = _pack(result)
            if len(packed) > MAX_REPLY:
                conn._queue(_pack([req_id, False, _too_big(len(packed)).to_wire()]))
                return
            conn._queue(b"\x93%b\xc3%b" % (_pack(req_id), packed))

    def error(self, req_id: Any, err: OtpdError) -> None:
        self.conn.owed -= 1
        if not self.conn.closed:
            self.conn._queue(_pack([req_id, False, err.to_wire()]))


class Connection:
    """A client.  ``owed``: the replies still to send, one per request read.  A client that
    half-closes (``nc -N``, ``socat``: its requests sent, EOF) is still answered: its socket
    is no longer read, and closed once every reply it is owed went out.  (One that goes away
    meanwhile is noticed at its next reply: every call and wait has a timeout.)"""

    __slots__ = ("sock", "server", "unpacker", "out", "closed", "writing", "subscribed", "peer", "compact",
                 "owed", "draining", "fed", "frame_at")

    def __init__(self, sock: socket.socket, server: ControlServer, peer: tuple[int, int, int]) -> None:
        self.sock = sock
        self.server = server
        self.unpacker = protocol.unpacker()
        self.out = bytearray()
        self.closed = False
        self.writing = False
        self.subscribed = False
        self.peer = peer
        self.compact: Compact | None = None  # made at its first compact call; dropped at close (a cycle)
        self.owed = 0
        self.draining = False  # the client half-closed: no more reads, only the replies it is owed
        self.fed = 0  # bytes given to the decoder
        self.frame_at = 0  # where the frame it is decoding began (``tell()`` after the last one)

    def reply(self, req_id: Any, result: Any) -> None:
        # {"id": req_id, "ok": True, "result": result}, packed around its two values: this runs
        # once for every call the daemon answers, and building the map costs more than packing it
        self.owed -= 1
        if not self.closed:
            packed = _pack(result)
            if len(packed) > MAX_REPLY:
                self._queue(_pack(protocol.fail(req_id, _too_big(len(packed)).to_wire())))
                return
            self._queue(b"\x83\xa2id%b\xa2ok\xc3\xa6result%b" % (_pack(req_id), packed))

    def error(self, req_id: Any, err: OtpdError) -> None:
        self.owed -= 1
        self.send(protocol.fail(req_id, err.to_wire()))

    def send(self, frame: Any) -> None:
        """Queue a frame; the loop flushes every connection once per iteration."""
        if not self.closed:
            self._queue(_pack(frame))

    def _queue(self, data: bytes) -> None:
        if len(self.out) + len(data) > OUT_CAP:
            self.close()  # it stopped reading: drop it rather than grow without bound
            return
        self.out += data
        self.server.dirty.add(self)

    def flush(self) -> None:
        if self.closed:
            return
        if not protocol.send_out(self.sock, self.out):
            self.close()
            return
        want_write = bool(self.out)
        if self.draining:
            if not want_write and self.owed <= 0:
                self.close()  # everything it asked for is answered
            elif want_write != self.writing:
                self.writing = want_write
                if want_write:
                    self.server.selector.register(self.sock, selectors.EVENT_WRITE, self.on_ready)
                else:
                    self.server.selector.unregister(self.sock)
            return
        if want_write != self.writing:
            self.writing = want_write
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if want_write else 0)
            self.server.selector.modify(self.sock, mask, self.on_ready)

    def on_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if mask & selectors.EVENT_READ and not self.closed:
            self.on_readable()

    def on_readable(self) -> None:
        # Read no more than the decoder may hold: the part of a frame still to come plus the
        # next frames would otherwise overflow it, and drop a client whose frames are each
        # within the limit.  A frame still incomplete at MAX_FRAME bytes is over the limit.
        room = MAX_FRAME - (self.fed - self.frame_at)
        if room <= 0:
            self.close()
            return
        try:
            data = self.sock.recv(min(READ_SIZE, room))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if self.owed <= 0 or self.subscribed:
                self.close()
            else:  # half-closed with replies to come: stop reading (EOF stays readable), answer
                self.draining = True
                self.server.selector.unregister(self.sock)
                self.writing = False
                self.server.watch_hangup(self)  # unless it closed for good: then nobody is left to answer
                self.server.dirty.add(self)  # what is queued already goes out at the next flush
            return
        try:
            self.unpacker.feed(data)
        except msgpack.BufferFull:
            self.close()  # a frame over the limit
            return
        self.fed += len(data)
        unpacker = self.unpacker
        dispatch = self.server.dispatch
        while not self.closed:
            try:
                frame = next(unpacker)
            except StopIteration:
                return
            except Exception:  # whatever the decoder raises (even TypeError: a list as a map key)
                self.close()  # not msgpack: nothing to answer
                return
            self.frame_at = unpacker.tell()  # exact at a frame's end (inside one it moves by element)
            self.owed += 1  # every request gets one reply, now or later
            dispatch(self, frame)

    def hand_off(self) -> tuple[socket.socket, bytes]:
        """Give the connection away (``attach``): its socket, and the bytes it sent past the
        request being answered, which the new owner reads first.  The server forgets it and
        closes nothing.  Only a connection with nothing else outstanding can go: a reply or
        an event still owed to it would be lost."""
        if self.owed != 1 or self.subscribed or self.draining:
            raise OtpdError("bad_request", "attach takes a connection with no other request outstanding "
                                           "and no event subscription")
        self.flush()
        if self.out or self.closed:
            raise OtpdError("bad_request", "attach takes a connection that reads its replies")
        pending = self.unpacker.read_bytes(self.fed - self.unpacker.tell())
        self.closed = True
        self.compact = None
        self.server.forget(self)
        try:
            self.server.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        return self.sock, pending

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.compact = None
        self.out.clear()
        if self.draining:
            self.server.unwatch_hangup(self)
        self.server.forget(self)
        try:
            self.server.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class ControlServer:
    def __init__(self, selector: selectors.BaseSelector, path: Path, group: str | None,
                 handlers: dict[str, Handler], on_close: Callable[[Connection], None],
                 log: Callable[[str, str], None], compact_call: CompactCall | None = None) -> None:
        self.selector = selector
        self.compact_call = compact_call
        self.log = log
        self.path = path
        self.group_gid = grp.getgrnam(group).gr_gid if group else None
        self.handlers = handlers
        self.on_close = on_close
        self.connections: set[Connection] = set()
        self.dirty: set[Connection] = set()  # connections with output queued this iteration
        self.listener: socket.socket | None = None
        self.uid = os.getuid()
        # Half-closed connections still owed replies, watched for a hang-up only: a peer that
        # shut down its side keeps reading, one that closed is gone (AF_UNIX says EPOLLHUP, which
        # an epoll reports for an fd registered with no events at all).
        self.hangups = select.epoll()
        self.draining: dict[int, Connection] = {}
        self.selector.register(self.hangups.fileno(), selectors.EVENT_READ, self._on_hangups)
        # One fd kept in reserve: out of fds (EMFILE), the listener would stay readable and the
        # loop spin; the reserve is let go to accept the connection waiting, refuse it, and close it.
        self.reserve: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def open(self) -> None:
        runtime_dir = self.path.parent
        runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o750 if self.group_gid is not None else 0o700)
        mode = runtime_dir.stat().st_mode
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            raise OtpdError("config_invalid", f"runtime dir {runtime_dir} is world-writable")
        # One daemon per socket: a lock held for the daemon's life closes the race between two
        # that start at once (both would find no live socket, and the second unlink the first's).
        self.lock_fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            raise OtpdError("already_exists", f"another otpd is listening on {self.path} "
                                              f"(it holds {self.path.with_suffix('.lock')})") from None
        self._refuse_if_live()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117 if self.group_gid is not None else 0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        if self.group_gid is not None:
            os.chown(self.path, -1, self.group_gid)
        sock.listen(512)
        sock.setblocking(False)
        self.listener = sock
        self.selector.register(sock, selectors.EVENT_READ, self.on_accept)

    def _refuse_if_live(self) -> None:
        if not self.path.exists():
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            return  # stale socket of a dead daemon
        finally:
            probe.close()
        raise OtpdError("already_exists", f"another otpd is listening on {self.path}")

    def watch_hangup(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        self.draining[fd] = conn
        self.hangups.register(fd, 0)

    def unwatch_hangup(self, conn: Connection) -> None:
        fd = conn.sock.fileno()
        if self.draining.pop(fd, None) is not None:
            try:
                self.hangups.unregister(fd)
            except OSError:
                pass

    def _on_hangups(self, _mask: int) -> None:
        for fd, _events in self.hangups.poll(0):
            conn = self.draining.get(fd)
            if conn is not None:
                conn.close()  # its waits are dropped; a call's late reply finds it closed

    def flush_dirty(self) -> None:
        """One write per connection per loop iteration, however many replies it got."""
        while self.dirty:
            self.dirty.pop().flush()

    def close(self) -> None:
        for conn in list(self.connections):
            conn.flush()
            conn.close()
        self.selector.unregister(self.hangups.fileno())
        self.hangups.close()
        if self.reserve is not None:
            os.close(self.reserve)
            self.reserve = None
        if self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener.close()
            self.listener = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def on_accept(self, _mask: int) -> None:
        assert self.listener is not None
        for _ in range(64):  # bounded, so a flood of connects cannot starve the loop
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self.reserve is not None:
                    self._refuse_one()
                    continue
                return  # ENOBUFS and friends: the backlog keeps them
            sock.setblocking(False)
            peer = system.peer_credentials(sock)
            conn = Connection(sock, self, peer)
            self.connections.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn.on_ready)
            if not self._allowed(peer):
                conn.error(None, OtpdError("permission_denied", f"uid {peer[1]} may not use this socket"))
                conn.flush()
                conn.close()

    def _refuse_one(self) -> None:
        """Out of fds: take the reserve's place to accept one waiting connection, tell it
        why, close it, and take the reserve back (so the listener is not left readable)."""
        assert self.listener is not None and self.reserve is not None
        os.close(self.reserve)
        self.reserve = None
        try:
            sock, _addr = self.listener.accept()
        except OSError:
            sock = None
        if sock is not None:
            try:
                sock.setblocking(False)
                sock.send(_pack(protocol.fail(None, OtpdError(
                    "internal", "the daemon is out of file descriptors (its RLIMIT_NOFILE); "
                    "try again later").to_wire())))
            except OSError:
                pass
            sock.close()
        try:
            self.reserve = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # taken meanwhile: the next EMFILE leaves the backlog as it is

    def _allowed(self, peer: tuple[int, int, int]) -> bool:
        _pid, uid, gid = peer
        return uid in (0, self.uid) or (self.group_gid is not None and gid == self.group_gid)

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.dirty.discard(conn)
        self.on_close(conn)

    def dispatch(self, conn: Connection, frame: Any) -> None:
        if type(frame) is list:
            self._dispatch_compact(conn, frame)
            return
        # Exact types (what the decoder makes): a bool is not an id, and this runs for every request.
        req_id = frame.get("id") if type(frame) is dict else None
        if type(req_id) is not int or not 0 <= req_id <= MAX_ID:
            req_id = None
        try:
            if req_id is None:
                raise OtpdError("bad_request", "a request is a map with an integer 'id' and a string 'op'")
            op = frame.get("op")
            handler = self.handlers.get(op) if type(op) is str else None
            if handler is None:
                raise OtpdError("bad_request", f"unknown op {op!r}", {"ops": sorted(self.handlers)})
            args = frame.get("args")
            if type(args) is not dict:
                if args is not None or "args" in frame:
                    raise OtpdError("bad_request", "'args' must be a map")
                args = {}  # a fresh one: handlers may keep or change it
            result = handler(conn, req_id, args)
        except OtpdError as err:
            conn.error(req_id, err)
            return
        except Exception:  # a bug in a handler: answer it, log it, keep supervising
            self._internal(conn, req_id, f"op {frame.get('op')!r}")
            return
        if result is not DEFERRED:
            conn.reply(req_id, result)

    def _internal(self, out: Connection | Compact, req_id: Any, what: str) -> None:
        self.log("error", f"internal error in {what}:\n{traceback.format_exc()}")
        out.error(req_id, OtpdError("internal", "internal error in the daemon (logged)"))

    def _dispatch_compact(self, conn: Connection, frame: list[Any]) -> None:
        """``[id, "call", agent id, request]`` or ``[..., timeout]``: answered as an array."""
        req_id = frame[0] if frame else None
        if type(req_id) is not int or not 0 <= req_id <= MAX_ID:
            conn.error(None, OtpdError("bad_request", COMPACT_SHAPE))
            return
        out = conn.compact
        if out is None:
            out = conn.compact = Compact(conn)
        try:
            if not 4 <= len(frame) <= 5 or frame[1] != "call" or self.compact_call is None:
                raise OtpdError("bad_request", COMPACT_SHAPE)
            timeout = frame[4] if len(frame) == 5 else protocol.CALL_TIMEOUT_S
            result = self.compact_call(out, req_id, frame[2], frame[3], timeout)
        except OtpdError as err:
            out.error(req_id, err)
            return
        except Exception:  # a bug in the handler: answer it, log it, keep supervising
            self._internal(out, req_id, "a compact call")
            return
        if result is not DEFERRED:
            out.reply(req_id, result)


COMPACT_SHAPE = 'a compact request is [id, "call", agent id, request] or [id, "call", agent id, request, timeout]'
