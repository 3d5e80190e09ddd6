"""The daemon: one single-threaded loop around the pure supervision core.

The loop waits on one selector: the signal wake-up pipe, the control socket
and its connections, and one socketpair per child.  Signal handlers only
record (``signal.set_wakeup_fd`` writes the signal number to the pipe); the
loop reads it and acts: SIGCHLD reaps with ``waitpid(-1, WNOHANG)`` until
nothing is left, SIGTERM / SIGINT stop the tree in order.  Timers (shutdown
deadlines, restart backoff, the heartbeat sweep, call and wait timeouts) sit
in one heap; the loop sleeps exactly until the next one.  There is no polling.

The core (``otpd.core.tree``) decides; ``_apply`` carries its actions out.

PIDs: a child's PID is signalled only while the child is unreaped, so it
cannot have been reused: a zombie keeps its PID until ``waitpid`` takes it,
and that happens here, in the same thread that sends the signals.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import gc
import heapq
import math
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from collections import deque
from itertools import count
from typing import Any, TextIO

import msgpack

from otpd import __version__, codec, flags
from otpd.agent import code
from otpd.agent.runtime import child_main  # imported here so that no child pays for it after fork
from otpd.config import Config
from otpd.control import protocol
from otpd.control.server import DEFERRED, Compact, Connection, ControlServer
from otpd.core import tree as core
from otpd.core.spec import AgentSpec
from otpd.errors import OtpdError
from otpd.posix import liveness, system
from otpd.posix.notify import Notifier
from otpd.posix.output import OutputReader
from otpd.store.lmdb_store import Store

EXIT_INTERNAL = 70
CALL_TICK = 0.05  # seconds: the resolution of call timeouts
MAX_TIMEOUT = protocol.MAX_TIMEOUT
FORWARDED_OPS = ("task.add", "task.stats", "task.list", "task.get", "task.retry", "task.pause", "task.resume",
                 "workflow.start", "workflow.status", "workflow.list", "workflow.cancel", "workflow.retry",
                 "workflow.skip", "health")
EVENT_HISTORY = 1000  # events kept for `otpctl events` without --follow
KEEPALIVE_WITHIN_S = 120.0  # a WATCHDOG=1 from inside one loop iteration: only this long into it
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}  # journald's <N> prefixes
HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FORK_BLOCKED = set(HANDLED_SIGNALS) | {signal.SIGUSR1, signal.SIGUSR2}


class Child:
    """The daemon's side of one running agent process."""

    __slots__ = ("id", "pid", "sock", "held", "slot", "spare", "wrote_at", "wrote_last", "stopped_at", "pending",
                 "spec", "start_error", "out", "writing", "fatal", "conn", "attaching", "attaching_bytes", "killed")

    def __init__(self, child_id: str, pid: int, sock: socket.socket, spec: AgentSpec, now: float) -> None:
        self.id = child_id
        self.pid = pid
        self.sock: socket.socket | None = sock
        self.held: Any = None  # its own decoder while it is in the middle of a frame (codec.Streams)
        self.slot = -1  # its stamps in the shared liveness region (otpd.posix.liveness)
        self.spare = False  # a warm spare waiting for "go", not (yet) the agent
        self.wrote_at: float | None = None  # the oldest input it may not have woken for
        self.wrote_last = 0.0  # the newest
        self.stopped_at: float | None = None  # SIGSTOPped (or SIGTSTP) since
        self.pending: dict[int, tuple[Connection | Compact, Any, int]] = {}  # ref -> caller, deadline bucket
        self.spec = spec
        self.start_error: str | None = None
        self.out = bytearray()
        self.writing = False
        self.fatal = False  # a start failure that a restart cannot fix (store_corrupt, a switch's store_full)
        self.conn: ChildConnection | None = None  # made when the agent first asks the daemon
        self.attaching: list[tuple[socket.socket, bytes]] = []  # clients to hand over, each with its frame
        self.attaching_bytes = 0  # their frames' bytes, counted with ``out`` against CHILD_OUT_CAP
        self.killed = False  # judged hung and SIGKILLed: its exit follows


CHILD_OUT_CAP = 64 << 20  # a child this far behind on reading its channel is hung (attaches waiting count too)


class ChildConnection:
    """An agent's channel seen as a control connection: agents speak otpctl's protocol too.

    A ``{"t": "sys", "ref": n, "op": ..., "args": ...}`` frame from an agent is dispatched
    like a request from a client; its reply goes back as ``{"t": "sysreply", ...}`` and
    events it subscribed to as ``{"t": "event", "e": {...}}``."""

    __slots__ = ("child", "daemon")

    def __init__(self, child: Child, daemon: Daemon) -> None:
        self.child = child
        self.daemon = daemon

    @property
    def closed(self) -> bool:
        return self.child.sock is None

    def reply(self, req_id: Any, result: Any) -> None:
        self.daemon._send_child(self.child, {"t": "sysreply", "ref": req_id, "ok": True, "result": result})

    def error(self, req_id: Any, err: OtpdError) -> None:
        self.daemon._send_child(self.child, {"t": "sysreply", "ref": req_id, "ok": False, "error": err.to_wire()})

    def send(self, frame: Any) -> None:
        self.daemon._send_child(self.child, {"t": "event", "e": frame})


class Waiter:
    __slots__ = ("conn", "req_id", "state", "not_pid", "key")

    def __init__(self, conn: Connection, req_id: Any, state: str, not_pid: int | None, key: tuple[Any, ...]) -> None:
        self.conn, self.req_id, self.state, self.not_pid, self.key = conn, req_id, state, not_pid, key


class Daemon:
    def __init__(self, config: Config, log_stream: TextIO | None = None) -> None:
        self.config = config
        self.flag_overrides = self._stored_flags()
        self.flags = self._flags(config)
        self.tree = core.Tree(flags.resolve(config.root, self.flags))
        self.selector = selectors.DefaultSelector()
        self.children: dict[str, Child] = {}
        self.beats = liveness.Beats()  # shared with every child: mapped before the first fork
        self.owing: set[Child] = set()  # children with input they have not woken for yet
        self.stopped: set[Child] = set()
        self.spares: dict[str, Child] = {}  # child id -> its warm spare
        self.spares_wanted: set[str] = set()
        self._specs: list[AgentSpec] = []
        self._specs_of: Config | None = None
        self.streams = codec.Streams(64 << 20)  # decodes every child channel
        self.by_pid: dict[int, Child] = {}
        self.timers: list[tuple[float, int, tuple[Any, ...]]] = []
        self.timer_seq: dict[tuple[Any, ...], int] = {}
        self.seq = count(1)
        self.refs = count(1)
        self.waiters: dict[str, list[Waiter]] = {}
        self.subscribers: set[Connection] = set()
        self.history: deque[dict[str, Any]] = deque(maxlen=EVENT_HISTORY)
        self.exit_status: int | None = None
        self.started_at = self.now = time.monotonic()
        self.pid = os.getpid()
        self.log_stream = log_stream or sys.stderr
        self.log_level = LEVELS[config.daemon.log_level]
        self.journal = _stream_is_journal(self.log_stream)
        self.notify = Notifier.from_env()  # before any fork: agents must not inherit it
        self.watchdog_due = math.inf  # when WATCHDOG=1 is next owed (never without a watchdog)
        self.ready_sent = False
        self.status_dirty = False
        self.last_status = ""
        self.work: deque[core.Action] = deque()
        self.dirty_children: set[Child] = set()
        self.call_buckets: dict[int, dict[int, str]] = {}  # deadline bucket -> {ref: child id}
        self.applying = False
        self._set_sweep()
        self.store_settings = config.store_settings()
        self.seqs: dict[str, int] = {}  # highest committed seq seen per agent: it never goes back
        # op_flags_set serves "flags.set": op names are otpctl's words, dotted
        handlers = {name[3:].replace("_", "."): getattr(self, name) for name in dir(self) if name.startswith("op_")}
        for op in FORWARDED_OPS:
            handlers[op] = functools.partial(self._forward, op)
        self.server = ControlServer(
            self.selector, config.daemon.socket, config.daemon.socket_group, handlers,
            self._forget_connection, self.log, compact_call=self._call,
        )

    # -- lifecycle -----------------------------------------------------------

    def run(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, _record_only)
        self.selector.register(wake_r, selectors.EVENT_READ, lambda _m: self._on_signals(os.read(wake_r, 512)))
        self.server.open()
        self.log("info", f"otpd {__version__} pid {self.pid} listening on {self.config.daemon.socket}")
        code.note_loaded()  # what a reload compares agent modules' files with
        gc.freeze()  # keep the forked children's copy-on-write pages shared
        system.prepare_titles()
        system.become_subreaper()  # an agent's sync helper, or what an agent started, is reaped here
        system.trim_heap()  # every page the daemon holds is a page each fork copies a mapping of
        try:
            self._apply(self.tree.start(time.monotonic()))
            if self.sweep_s:
                self._set_timer(("sweep",), time.monotonic() + self.sweep_s)
            while self.exit_status is None:
                self._once()
        except Exception:
            self.log("error", "internal error, stopping every child:\n" + traceback.format_exc())
            self._kill_all()
            self.exit_status = EXIT_INTERNAL
        finally:
            self._reap_spares()
            self.server.close()
            signal.set_wakeup_fd(-1)
            self.notify.close()
        self.log("info", f"otpd exits with status {self.exit_status}")
        return self.exit_status

    def _once(self) -> None:
        timeout = None
        if self.timers:
            timeout = max(0.0, self.timers[0][0] - time.monotonic())
        events = self.selector.select(timeout)
        self.now = time.monotonic()  # one clock read per iteration for the hot paths
        for key, mask in events:
            key.data(mask)
        self._run_timers()
        # Writes go out once per iteration: a burst of calls reaches a child as one
        # read (one group commit), and its replies reach each client as one write.
        while self.dirty_children:
            self._flush_child(self.dirty_children.pop())
        self.server.flush_dirty()
        if self.spares_wanted:
            self._make_spares()
        if self.status_dirty:
            self._notify_status()

    def _on_signals(self, data: bytes) -> None:
        if signal.SIGCHLD in data:
            self._reap()
        if signal.SIGTERM in data or signal.SIGINT in data:
            self._begin_shutdown("stop requested by signal; stopping children in reverse order")
        if signal.SIGHUP in data:
            try:
                self._reload("SIGHUP")
            except OtpdError as err:
                self.log("error", f"reload refused, nothing changed:\n{err.message}")

    def _reap_spares(self) -> None:
        """Spares left at exit (the root failed or stopped): end them, by PID, and reap them."""
        spares = [c for c in self.by_pid.values() if c.spare]
        for spare in spares:
            _kill(spare.pid, signal.SIGKILL)
        for spare in spares:
            try:
                os.waitpid(spare.pid, 0)
            except ChildProcessError:
                pass

    def _kill_all(self) -> None:
        for child in list(self.children.values()):
            _kill(child.pid, signal.SIGKILL)
        for child in list(self.children.values()):
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass

    # -- the core's actions ----------------------------------------------------

    def _apply(self, actions: list[core.Action]) -> None:
        """Carry out actions in order; actions they lead to queue behind them."""
        self.work.extend(actions)
        if self.applying:
            return
        self.applying = True
        try:
            while self.work:
                self._keepalive()
                action = self.work.popleft()
                match action:
                    case core.Spawn():
                        batch = [action]  # the Spawns queued together (a group, a parallel pool)
                        while self.work and isinstance(self.work[0], core.Spawn):
                            batch.append(self.work.popleft())  # type: ignore[arg-type]
                        self._spawn(batch)
                    case core.Signal():
                        child = self.children.get(action.id)
                        if child is not None:
                            _kill(child.pid, signal.SIGKILL if action.signal == "KILL" else signal.SIGTERM)
                    case core.SetTimer():
                        self._set_timer(action.key, action.at)
                    case core.CancelTimer():
                        self.timer_seq.pop(action.key, None)
                    case core.Emit():
                        self._on_event(action)
                    case core.Exit():
                        self.exit_status = action.status
            self._check_waiters()
        finally:
            self.applying = False

    def _spawn(self, batch: list[core.Spawn]) -> None:
        """Start a process for each current Spawn: its warm spare if it has one, else a fork.

        The forks go back to back and the bookkeeping comes after them all: each fork makes
        every page of the daemon copy-on-write again, so the pages the daemon writes between
        two forks are copied once per fork (~300 pages, ~0.7 ms, when the bookkeeping ran in
        between)."""
        now = time.monotonic()
        forked: list[tuple[core.Spawn, tuple[int, socket.socket, int, int] | OSError]] = []
        for action in batch:
            self._keepalive()
            if not self.tree.spawn_is_current(action.id, action.token) or self._promote(action, now):
                continue
            try:
                forked.append((action, self._fork(action.id, action.spec, now, spare=False)))
            except OSError as exc:  # out of fds or processes: a start failure, retried with backoff
                forked.append((action, exc))
        for action, result in forked:
            self._keepalive()
            if isinstance(result, OSError):
                self.log("error", f"{action.id}: cannot start: {result}")
                self._apply(self.tree.exited(action.id, "crash", now, error=f"fork: {result}"))
                continue
            child = self._adopt(action.id, action.spec, now, result, spare=False)
            self.children[action.id] = child
            self._apply(self.tree.spawned(action.id, child.pid, now))

    def _promote(self, action: core.Spawn, now: float) -> bool:
        """Hand the agent to its warm spare, if it has one made for this spec; False if not."""
        spare = self.spares.pop(action.id, None)
        if spare is None:
            return False
        go = {"t": "go", "flags": self.flags}
        if spare.spec != action.spec or spare.sock is None or not _silent(spare.sock) \
                or not self._send_child(spare, go):
            _kill(spare.pid, signal.SIGKILL)  # made for another spec (or dying): reaped and forgotten
            return False
        spare.spare = False
        self.beats.busy[spare.slot] = self.beats.woke[spare.slot] = now  # its start counts as busy
        self._flush_child(spare)
        self.children[action.id] = spare
        self._apply(self.tree.spawned(action.id, spare.pid, now))
        return True

    def _fork(self, child_id: str, spec: AgentSpec, now: float, spare: bool) -> tuple[int, socket.socket, int, int]:
        """Fork a process for ``spec`` with its channel and output pipe: (pid, channel, output fd,
        liveness slot) for ``_adopt``; OSError if the OS says no.

        A spare boots as far as it can without the agent's state (imports, the store opened)
        and waits for ``{"t": "go"}`` on its channel; EOF ends it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            ours.close()
            theirs.close()
            raise
        slot = self.beats.take(now)
        # Signals stay blocked across fork(): one that reached the child before it reset its
        # handlers would go through the inherited wake-up fd into the daemon's own pipe.
        signal.pthread_sigmask(signal.SIG_BLOCK, FORK_BLOCKED)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED)
            self.beats.give_back(slot)
            for fd in (out_r, out_w):
                os.close(fd)
            ours.close()
            theirs.close()
            raise
        if pid == 0:  # pragma: no cover - runs in the child, which never returns
            try:  # nothing may ever return from here into a copy of the daemon's loop
                os.dup2(out_w, 1)  # stdout and stderr go to the daemon, line by line, with our id
                os.dup2(out_w, 2)
                child_main(theirs.fileno(), spec, self.pid, self.store_settings, self.flags,
                           liveness.Stamp(self.beats, slot), spare)
            finally:
                os._exit(system.EXIT_CRASH)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_BLOCKED)
        theirs.close()
        os.close(out_w)
        return pid, ours, out_r, slot

    def _adopt(self, child_id: str, spec: AgentSpec, now: float, forked: tuple[int, socket.socket, int, int],
               spare: bool) -> Child:
        """The daemon's side of a forked process: its Child, its channel and output in the selector."""
        pid, ours, out_r, slot = forked
        os.set_blocking(out_r, False)
        ours.setblocking(False)
        child = Child(child_id, pid, ours, spec, now)
        child.slot = slot
        child.spare = spare
        self.by_pid[pid] = child
        self.selector.register(ours, selectors.EVENT_READ, lambda m, c=child: self._on_channel(c, m))
        output = OutputReader(out_r, child_id, self.log, now)
        self.selector.register(out_r, selectors.EVENT_READ, lambda _m, o=output: self._on_output(o))
        return child

    # -- warm spares -------------------------------------------------------------

    def _want_spare(self, child_id: str) -> None:
        """After a child is ready: keep a spare for its next restart if its ``spare`` policy says so."""
        node = self.tree.nodes.get(child_id)
        if node is None or node.is_supervisor or child_id in self.spares:
            return
        spec = node.spec
        assert isinstance(spec, AgentSpec)
        if spec.restart == "temporary" or spec.spare == "never" or (spec.spare == "on_restart" and not node.restarts):
            return
        self.spares_wanted.add(child_id)

    def _make_spares(self) -> None:
        """Fork the spares asked for, once the iteration's real work is done."""
        wanted, self.spares_wanted = self.spares_wanted, set()
        for child_id in wanted:
            self._keepalive()
            node = self.tree.nodes.get(child_id)
            child = self.children.get(child_id)
            if node is None or node.state != "running" or child is None or child_id in self.spares \
                    or self.tree.nodes[self.tree.root_id].state not in core.UP_STATES:
                continue
            now = time.monotonic()
            try:
                spare = self.spares[child_id] = self._adopt(child_id, child.spec, now,
                                                            self._fork(child_id, child.spec, now, spare=True), True)
            except OSError as exc:
                self.log("warning", f"{child_id}: no spare: {exc}")
            else:
                self._on_event(core.Emit("spare", child_id, {"pid": spare.pid}))

    def _drop_spare(self, child_id: str) -> None:
        spare = self.spares.pop(child_id, None)
        if spare is not None:
            _kill(spare.pid, signal.SIGKILL)

    def _drop_spares(self) -> None:
        for child_id in list(self.spares):
            self._drop_spare(child_id)

    # -- child channels --------------------------------------------------------

    def _on_output(self, output: OutputReader) -> None:
        fd = output.fd
        if not output.read(time.monotonic()):
            self.selector.unregister(fd)

    def _on_channel(self, child: Child, mask: int) -> None:
        sock = child.sock
        if sock is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush_child(child)
            if not mask & selectors.EVENT_READ or child.sock is None:
                return
        try:
            data = sock.recv(codec.READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_channel(child)  # the process is gone or going: SIGCHLD tells how
            return
        self._feed(child, data)

    def _feed(self, child: Child, data: bytes) -> None:
        """Frames from a child. Anything malformed is the child's fault: it is killed."""
        try:
            frames, child.held = self.streams.decode(child.held, data)
            for frame in frames:
                self._on_frame(child, frame)
        except (msgpack.UnpackException, ValueError, TypeError, KeyError, AttributeError, IndexError):
            self.log("error", f"{child.id}: garbage on its channel; killing pid {child.pid}")
            _kill(child.pid, signal.SIGKILL)
            self._close_channel(child)

    def _on_frame(self, child: Child, frame: Any) -> None:
        if type(frame) is list:  # a reply, the one frame that comes once per call: [ref, ok, result or error]
            if len(frame) == 3:
                ref, ok, payload = frame
            else:  # the last of a batch that committed carries the seq: [ref, ok, result, seq]
                ref, ok, payload, seq = frame
                if seq > self.seqs.get(child.id, 0):
                    self.seqs[child.id] = seq
            waiting = child.pending.pop(ref, None)
            if waiting is not None:
                conn, req_id, bucket = waiting
                calls = self.call_buckets.get(bucket)  # _forget_call, inline
                if calls is not None:
                    calls.pop(ref, None)
                if ok:
                    conn.reply(req_id, payload)
                else:
                    conn.error(req_id, OtpdError.from_wire(payload))
            return
        kind = frame["t"]
        if kind == "seq":
            self.seqs[child.id] = max(self.seqs.get(child.id, 0), int(frame["seq"]))
        elif kind == "ready":
            self._check_seq(child, int(frame.get("seq", 0)))
            self._apply(self.tree.ready(child.id, time.monotonic()))
            self._want_spare(child.id)
        elif kind == "sys":
            if child.conn is None:
                child.conn = ChildConnection(child, self)
            self.server.dispatch(child.conn, {"id": frame["ref"], "op": frame["op"],  # type: ignore[arg-type]
                                              "args": frame.get("args", {})})
        elif kind == "start_error":
            child.start_error = f"{frame.get('code', 'internal')}: {frame.get('message')}"
            # Failures a restart cannot fix (the agent says so): held failed, its siblings run on.
            # A corrupt record, or a version switch with no room for its copy of the old records;
            # not any other store_full (room may come back: restarts as any start failure).
            child.fatal = frame.get("fatal") is True or frame.get("code") == "store_corrupt"

    def _check_seq(self, child: Child, seq: int) -> None:
        """A reload must find every commit the agent reported: seq never goes back."""
        known = self.seqs.get(child.id, 0)
        if seq < known:
            self.log("error", f"{child.id}: reloaded seq {seq} < {known} committed before: state went back")
            self._on_event(core.Emit("seq_regressed", child.id, {"seq": seq, "known": known}))
        self.seqs[child.id] = max(known, seq)

    def _close_channel(self, child: Child) -> None:
        if child.sock is not None:
            self.selector.unregister(child.sock)
            child.sock.close()
            child.sock = None
        self._drop_attaching(child)

    def _drain(self, child: Child) -> None:
        """Read what a dead child sent before it died, so its replies and ready count."""
        while child.sock is not None:
            try:
                data = child.sock.recv(codec.READ_SIZE)
            except OSError:
                return
            if not data:
                return
            self._feed(child, data)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED | os.WCONTINUED)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if os.WIFSTOPPED(status) or os.WIFCONTINUED(status):
                child = self.by_pid.get(pid)
                if child is not None:  # a stopped child is judged by the sweep (liveness rule 3)
                    child.stopped_at = time.monotonic() if os.WIFSTOPPED(status) else None
                    (self.stopped.add if os.WIFSTOPPED(status) else self.stopped.discard)(child)
                continue
            child = self.by_pid.pop(pid, None)
            if child is None:
                continue  # not one of ours (tolerated)
            self._keepalive()
            self._on_exit(child, status)

    def _on_exit(self, child: Child, status: int) -> None:
        self._drain(child)
        self._close_channel(child)
        if child.slot >= 0 and not child.spare:  # what it committed for its links' calls (liveness.py)
            committed = int(self.beats.seq[child.slot])
            if committed > self.seqs.get(child.id, 0):
                self.seqs[child.id] = committed
        self.beats.give_back(child.slot)
        child.slot = -1
        self.owing.discard(child)
        self.stopped.discard(child)
        if child.spare:
            if self.spares.get(child.id) is child:
                del self.spares[child.id]
            return  # it never was the agent: nothing to report
        if self.children.get(child.id) is child:
            del self.children[child.id]
        reason, facts = system.decode_status(status)
        if child.start_error:
            facts["error"] = child.start_error
        for ref, (conn, req_id, bucket) in child.pending.items():
            self._forget_call(ref, bucket)
            conn.error(req_id, OtpdError("agent_crashed", f"agent {child.id!r} exited ({reason}) during the call",
                                         {"id": child.id, "reason": reason, **facts}))
        child.pending.clear()
        if child.conn is not None:
            self._forget_connection(child.conn)  # type: ignore[arg-type]
        self._apply(self.tree.exited(child.id, reason, time.monotonic(), fatal=child.fatal, pid=child.pid, **facts))

    # -- timers ----------------------------------------------------------------

    def _set_timer(self, key: tuple[Any, ...], at: float) -> None:
        seq = next(self.seq)
        self.timer_seq[key] = seq
        heapq.heappush(self.timers, (at, seq, key))

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _at, seq, key = heapq.heappop(self.timers)
            if self.timer_seq.get(key) != seq:
                continue  # cancelled or replaced
            del self.timer_seq[key]
            kind = key[0]
            if kind in ("kill", "restart"):
                self._apply(self.tree.timer(key, now))
            elif kind == "sweep":
                self._sweep(now)
            elif kind == "watchdog":
                self._keepalive()
            elif kind == "calls":
                for ref, child_id in self.call_buckets.pop(key[1], {}).items():
                    self._call_timeout(child_id, ref)
            elif kind == "wait":
                self._wait_timeout(key)

    def _keepalive(self) -> None:
        """WATCHDOG=1 if half the watchdog period passed since the last one, and its timer again.

        Sent from the loop itself, so a stuck loop stops the pings and systemd acts.  Besides
        its timer, the long stretches of one iteration call it as they go: a pool of thousands
        forked back to back (~1-3 ms a fork), their bookkeeping, a one_for_all restart of them
        all, their warm spares.  Without it such a stretch past WatchdogSec gets the daemon
        killed while it is doing its job.  But not past KEEPALIVE_WITHIN_S into one iteration
        (``self.now`` is when it began): a loop that makes work for itself for ever is stuck too."""
        now = time.monotonic()
        if now < self.watchdog_due:
            return
        if now - self.now > KEEPALIVE_WITHIN_S:  # one iteration so long that it is stuck, whatever
            if ("watchdog",) not in self.timer_seq:  # it does; the next iteration pings, if it comes
                self._set_timer(("watchdog",), now)
            return
        self.notify.watchdog()
        self._ping_again(now)

    def _ping_again(self, now: float) -> None:
        """The next WATCHDOG=1 is owed half a period from ``now``: its timer."""
        assert self.notify.watchdog_interval
        self.watchdog_due = now + self.notify.watchdog_interval
        self._set_timer(("watchdog",), self.watchdog_due)

    def _set_sweep(self) -> None:
        """From the config's shortest liveness timeout: the sweep's interval (a fifth of it, 20 ms to 1 s)."""
        timeouts = [n.heartbeat_timeout_ms for n in self._agent_specs() if n.heartbeat_timeout_ms]
        self.min_limit_s = min(timeouts) / 1000.0 if timeouts else math.inf
        self.sweep_s = min(1.0, max(0.02, self.min_limit_s / 5.0)) if timeouts else 1.0

    def _limit(self, child: Child) -> float:
        node = self.tree.nodes.get(child.id)  # a reload may have changed the timeout in place
        spec = node.spec if node is not None and isinstance(node.spec, AgentSpec) else child.spec
        return spec.heartbeat_timeout_ms / 1000.0

    def _sweep(self, now: float) -> None:
        """Kill hung children (the rules of otpd.posix.liveness); they are then crashes."""
        beats = self.beats
        if now - beats.oldest_busy() > self.min_limit_s:  # rare: look at each child
            for child in list(self.children.values()):
                busy = beats.busy[child.slot] if child.slot >= 0 else math.inf
                limit = self._limit(child)
                if limit and child.sock is not None and now - busy > limit:
                    self._hung(child, f"busy for {now - busy:.1f}s without returning to its loop")
        for child in list(self.owing):
            woke = beats.woke[child.slot] if child.slot >= 0 else math.inf
            wrote = child.wrote_at
            if wrote is None or woke >= child.wrote_last:  # it woke after everything it was sent
                child.wrote_at = None
                self.owing.discard(child)
            elif woke >= wrote:  # it woke for older input: time the newer from when it was sent
                child.wrote_at = child.wrote_last
            elif (limit := self._limit(child)) and now - wrote > limit:
                self._hung(child, f"silent for {now - wrote:.1f}s: it has not read what it was sent")
        for child in list(self.stopped):
            at = child.stopped_at
            if at is not None and (limit := self._limit(child)) and now - at > limit:
                self._hung(child, f"silent for {now - at:.1f}s: stopped by a signal")
        self._set_timer(("sweep",), now + self.sweep_s)

    def _hung(self, child: Child, why: str) -> None:
        """SIGKILL a child judged hung, once: whatever is judged until its exit changes nothing."""
        if child.killed:
            return
        self.log("warning", f"{child.id}: {why}; SIGKILL pid {child.pid}")
        child.killed = True
        self.owing.discard(child)
        self.stopped.discard(child)
        child.wrote_at = child.stopped_at = None
        if child.slot >= 0:
            self.beats.busy[child.slot] = math.inf  # judged once; its exit follows
        _kill(child.pid, signal.SIGKILL)

    # -- events ------------------------------------------------------------------

    def _notify_status(self) -> None:
        """READY=1 once the root is up with every permanent agent running; STATUS= on change."""
        self.status_dirty = False
        if not self.notify.enabled:
            return
        counts: dict[str, int] = {}
        waiting_for = 0
        for node in self.tree.nodes.values():
            if not node.is_supervisor:
                counts[node.state] = counts.get(node.state, 0) + 1
                if node.spec.restart == "permanent" and not node.held and node.state != "running":
                    waiting_for += 1
        status = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("running", "restarting", "failed")) + " agents"
        root = self.tree.nodes[self.tree.root_id]
        if not self.ready_sent and root.state == "running" and waiting_for == 0 and self.tree.settled():
            self.ready_sent = True
            self.last_status = status
            self.notify.ready(status)
            if self.notify.watchdog_interval and self.watchdog_due == math.inf:
                # systemd arms the watchdog at the first READY=1 (start-post); a READY=1 after a
                # reload resets nothing, so the pings go on from the last one
                self._ping_again(time.monotonic())
        elif status != self.last_status and self.ready_sent:
            self.last_status = status
            self.notify.status(status)

    def _on_event(self, event: core.Emit) -> None:
        self.status_dirty = True
        if event.event in ("stopped", "removed") and event.id in self.spares:
            self._drop_spare(event.id)
        if event.event == "stopped" and self.notify.enabled and self.tree.nodes[self.tree.root_id].state == "stopping":
            # Each child that stops is progress: keep systemd's stop timeout ahead of us.
            self.notify.extend_timeout(int((self._longest_shutdown_s() + 5) * 1e6))
        details = " ".join(f"{k}={v}" for k, v in event.details.items())
        self.log("warning" if event.event == "escalated" else "info", f"{event.id}: {event.event} {details}".rstrip())
        frame = {"event": event.event, "id": event.id, "time": time.time(), **event.details}
        self.history.append(frame)
        for conn in list(self.subscribers):
            conn.send(frame)

    def log(self, level: str, message: str) -> None:
        if LEVELS[level] >= self.log_level:
            if self.journal:  # journald reads the priority from the prefix and adds its own stamp
                line = f"<{SYSLOG_PRIORITY[level]}>{message}"
            else:
                line = f"otpd[{self.pid}] {level}: {message}"
            print(line, file=self.log_stream, flush=True)

    def _agent_specs(self) -> list[AgentSpec]:
        """The config's agent specs (templates included), computed once per config."""
        if self._specs_of is not self.config:
            self._specs = self.config.agent_specs()
            self._specs_of = self.config
        return self._specs

    def _longest_shutdown_s(self) -> float:
        return max((s.shutdown_ms or 0 for s in self._agent_specs()), default=0) / 1000.0

    def _begin_shutdown(self, why: str) -> None:
        self.log("info", why)
        self._drop_spares()
        self.notify.stopping()
        # The first child to stop may take its whole shutdown_ms: cover it from the start.
        self.notify.extend_timeout(int((self._longest_shutdown_s() + 5) * 1e6))
        self._apply(self.tree.shutdown(time.monotonic()))

    # -- control operations (dispatched by name: op_<name>) -----------------------

    def op_status(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        root = self.tree.nodes[self.tree.root_id]
        return {
            "daemon": {"pid": self.pid, "version": __version__, "state": root.state,
                       "uptime_s": round(time.monotonic() - self.started_at, 3),
                       "connections": len(self.server.connections),
                       "config": str(self.config.path)},
            "children": self._children(),
        }

    def op_ps(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        return {"children": self._children()}

    def _children(self) -> list[dict[str, Any]]:
        """The tree's nodes, each agent with the seq of its last commit (0: none yet, or no
        persistent state) and how many attached links it has open, read from the liveness page."""
        nodes = self.tree.snapshot()
        for node in nodes:
            if node["type"] != "agent":
                continue
            seq, links = self.seqs.get(node["id"], 0), 0
            child = self.children.get(node["id"])
            if child is not None and child.slot >= 0:
                seq, links = max(seq, int(self.beats.seq[child.slot])), int(self.beats.links[child.slot])
            node["seq"], node["links"] = seq, links
        return nodes

    def op_kill(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        child_id = _arg(args, "id", str)
        name = args.get("signal", "KILL")
        try:
            signum = system.signal_number(name)
        except (KeyError, ValueError):
            raise OtpdError("bad_request", f"unknown signal {name!r}") from None
        node = self.tree.get(child_id)
        child = self.children.get(child_id)
        if node.is_supervisor:
            raise OtpdError("bad_request", f"{child_id!r} is a supervisor, not an agent: it has no process",
                            {"id": child_id, "type": "supervisor"})
        if child is None:
            raise OtpdError("agent_down", f"{child_id!r} has no process ({node.state})", {"id": child_id})
        _kill(child.pid, signum)
        return {"id": child_id, "pid": child.pid, "signal": signal.Signals(signum).name}

    def op_wait(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        child_id = _arg(args, "id", str)
        state = _arg(args, "state", str, "running")
        if state not in core.TRANSITIONS:
            raise OtpdError("bad_request", f"unknown state {state!r}", {"states": sorted(core.TRANSITIONS)})
        not_pid = _arg(args, "not_pid", int, None)
        timeout = _arg(args, "timeout", (int, float), 30.0)
        if not 0 <= timeout <= MAX_TIMEOUT:  # NaN fails too
            raise OtpdError("bad_request", f"argument 'timeout' must be 0..{MAX_TIMEOUT:g} seconds")
        self.tree.get(child_id)
        key = ("wait", next(self.refs))
        waiter = Waiter(conn, req_id, state, not_pid, key)
        if self._check_waiter(child_id, waiter, register=True):
            return DEFERRED
        self._set_timer(key, time.monotonic() + max(0.0, float(timeout)))
        return DEFERRED

    def _check_waiters(self) -> None:
        """Every state change the core made: answer the waits it satisfies."""
        changed, self.tree.changed = self.tree.changed, set()
        for child_id in changed:
            for waiter in list(self.waiters.get(child_id, ())):
                self._check_waiter(child_id, waiter)

    def _check_waiter(self, child_id: str, waiter: Waiter, register: bool = False) -> bool:
        node = self.tree.nodes.get(child_id)
        done = node is None or (node.state == waiter.state and (waiter.not_pid is None or node.pid != waiter.not_pid))
        if not done:
            if register:
                self.waiters.setdefault(child_id, []).append(waiter)
            return False
        if not register:
            self.waiters[child_id].remove(waiter)
            self.timer_seq.pop(waiter.key, None)
        if node is None and waiter.state != "stopped":
            waiter.conn.error(waiter.req_id, OtpdError("not_found", f"{child_id!r} was removed"))
        else:
            waiter.conn.reply(waiter.req_id, {"id": child_id, "state": waiter.state,
                                              "pid": node.pid if node else None})
        return True

    def _wait_timeout(self, key: tuple[Any, ...]) -> None:
        for child_id, waiters in self.waiters.items():
            for waiter in waiters:
                if waiter.key == key:
                    waiters.remove(waiter)
                    node = self.tree.nodes.get(child_id)
                    waiter.conn.error(waiter.req_id, OtpdError(
                        "timeout", f"{child_id!r} did not reach {waiter.state!r} in time",
                        {"id": child_id, "state": node.state if node else None}))
                    return

    def op_shutdown(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        self._begin_shutdown("shutdown requested over the control socket")
        return {"stopping": True, "pid": self.pid}

    def op_call(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        timeout = args.get("timeout", protocol.CALL_TIMEOUT_S)
        return self._call(conn, req_id, args.get("id"), args.get("request"), timeout)

    def _call(self, conn: Connection | Compact, req_id: Any, child_id: Any, request: Any, timeout: Any) -> Any:
        # The hot path of the control plane: kept to a few dict operations.
        child = self.children.get(child_id) if type(child_id) is str else None
        if child is None or child.sock is None or self.tree.nodes[child.id].state != "running":
            child = self._running_child(_arg({"id": child_id}, "id", str))  # raises the precise error
        if type(timeout) not in (int, float) or not 0 <= timeout <= MAX_TIMEOUT:  # NaN fails too
            raise OtpdError("bad_request", f"argument 'timeout' must be 0..{MAX_TIMEOUT:g} seconds")
        ref = next(self.refs)
        try:  # [ref, request], packed around its two values (an array: the agent decodes no map)
            frame = b"\x92%b%b" % (protocol.pack(ref), protocol.pack(request))
        except (TypeError, ValueError) as exc:
            raise OtpdError("bad_request", f"cannot encode the request: {exc}") from None
        if not self._send_child(child, frame):
            raise OtpdError("agent_down", f"agent {child.id!r} is not reachable")
        # Call deadlines go in 50 ms buckets, one timer per bucket: a heavy call load
        # does not fill the timer heap, and a timeout fires at most 50 ms late.
        bucket = math.ceil((self.now + timeout) / CALL_TICK)
        calls = self.call_buckets.get(bucket)
        if calls is None:
            calls = self.call_buckets[bucket] = {}
            self._set_timer(("calls", bucket), bucket * CALL_TICK)
        calls[ref] = child.id  # refs are unique across children
        child.pending[ref] = (conn, req_id, bucket)
        return DEFERRED

    def _forward(self, op: str, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        """``task.*`` / ``workflow.*`` / ``health``: a call to the agent that serves them.

        ``task.add {"id": "tasks", "payload": ...}`` becomes ``call tasks {"op": "add", "payload": ...}``;
        workflow ops go to the config's CoordinatorAgent and ``health`` to its MonitorAgent."""
        family, _, verb = op.partition(".")
        request = {k: v for k, v in args.items() if k != "timeout"}
        if family == "task":
            target = request.pop("id", None)
            node = self.tree.nodes.get(target) if type(target) is str else None
            if node is not None and isinstance(node.spec, AgentSpec) and not _is_task_agent(node.spec.agent):
                raise OtpdError("bad_request", f"{target!r} is not a TaskAgent (it runs {node.spec.agent})",
                                {"id": target})
        else:
            role = "CoordinatorAgent" if family == "workflow" else "MonitorAgent"
            target = next((s.id for s in self._agent_specs() if s.agent.endswith(":" + role)), None)
            if target is None:
                raise OtpdError("not_found", f"no {role} in the config")
        request["op"] = verb or family
        return self._call(conn, req_id, target, request, args.get("timeout", 30.0))

    def _forget_call(self, ref: int, bucket: int) -> None:
        calls = self.call_buckets.get(bucket)
        if calls is not None:
            calls.pop(ref, None)

    def _call_timeout(self, child_id: str, ref: int) -> None:
        child = self.children.get(child_id)
        waiting = child.pending.pop(ref, None) if child else None
        if waiting is not None:
            conn, req_id, _bucket = waiting
            conn.error(req_id, OtpdError("timeout", f"agent {child_id!r} did not answer in time", {"id": child_id}))

    def op_attach(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        """Hand the connection to a running agent: from now on the agent reads it and answers
        its calls itself (``[id, request]`` -> ``[id, ok, result]``), the daemon's hop skipped.
        The agent's first frame on it is this request's reply.  The link ends with the agent's
        process: the client sees the connection close, and attaches again to its replacement."""
        child = self._running_child(_arg(args, "id", str))
        sock, pending = conn.hand_off()
        frame = protocol.pack({"t": "attach", "id": req_id, "pending": pending})
        if not self._within_cap(child, len(frame)):
            sock.close()  # as its other clients', the agent's replacement is theirs to attach to
            return DEFERRED
        child.attaching.append((sock, frame))
        child.attaching_bytes += len(frame)
        self._flush_child(child)
        return DEFERRED

    def _hand_over(self, child: Child, sock: socket.socket) -> None:
        """Pass the clients waiting to attach to ``child``, each fd with its frame (SCM_RIGHTS),
        once everything queued before went out, so that no frame is split.  What does not fit
        now goes when the channel is writable again."""
        while child.attaching and not child.out:
            client, frame = child.attaching[0]
            try:
                sent = sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               array.array("i", [client.fileno()]))])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # it is dying (SIGCHLD follows)
                self._drop_attaching(child)
                return
            del child.attaching[0]
            child.attaching_bytes -= len(frame)
            client.close()  # the agent has its own copy now
            child.out += frame[sent:]  # a partial send: the fd went with its first byte, the rest is data
            self._wrote(child)

    @staticmethod
    def _drop_attaching(child: Child) -> None:
        """The clients never handed over to ``child``: they see their connection close."""
        for client, _frame in child.attaching:
            client.close()
        child.attaching.clear()
        child.attaching_bytes = 0

    def op_cast(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        child = self._running_child(_arg(args, "id", str))
        if not self._send_child(child, {"t": "cast", "msg": args.get("message")}):
            raise OtpdError("agent_down", f"agent {child.id!r} is not reachable")
        return {"id": child.id}

    def _running_child(self, child_id: str) -> Child:
        node = self.tree.get(child_id)
        if node.is_supervisor:  # never an agent: bad_request, not agent_down (which a client retries on)
            raise OtpdError("bad_request", f"{child_id!r} is a supervisor, not an agent: it takes no calls",
                            {"id": child_id, "type": "supervisor"})
        child = self.children.get(child_id)
        if node.state != "running" or child is None or child.sock is None:
            why = f"is {node.state}" if node.state != "running" else "has just ended"
            raise OtpdError("agent_down", f"{child_id!r} {why}", {"id": child_id, "state": node.state})
        return child

    def _send_child(self, child: Child, frame: dict[str, Any] | bytes) -> bool:
        """Queue a frame (or one packed already) for a child; never blocks the loop."""
        if child.sock is None:
            return False
        try:
            data = frame if type(frame) is bytes else protocol.pack(frame)
        except (TypeError, ValueError) as exc:
            raise OtpdError("bad_request", f"cannot encode the request: {exc}") from None
        if not self._within_cap(child, len(data)):
            return False
        child.out += data
        self.dirty_children.add(child)
        return True

    def _within_cap(self, child: Child, more: int) -> bool:
        """Can ``more`` bytes be queued for ``child``? Not beyond CHILD_OUT_CAP: it is hung, and killed."""
        if len(child.out) + child.attaching_bytes + more <= CHILD_OUT_CAP:
            return True
        self._hung(child, "not reading its channel")
        return False

    def _wrote(self, child: Child) -> None:
        """Input went to ``child``: liveness rule 2, it must wake for it."""
        child.wrote_last = time.monotonic()
        if child.wrote_at is None:
            child.wrote_at = child.wrote_last
            self.owing.add(child)

    def _flush_child(self, child: Child) -> None:
        sock = child.sock
        if sock is None:
            return
        while child.out:
            try:
                sent = sock.send(child.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                child.out.clear()  # it is dying; SIGCHLD follows
                break
            del child.out[:sent]
            self._wrote(child)
        if child.attaching and not child.out:
            self._hand_over(child, sock)
        want = bool(child.out) or bool(child.attaching)
        if want != child.writing:
            child.writing = want
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if child.writing else 0)
            self.selector.modify(sock, mask, lambda m, c=child: self._on_channel(c, m))

    def op_start(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        return self._command(self.tree.start_child, args)

    def op_stop(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        return self._command(self.tree.stop_child, args)

    def op_restart(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        return self._command(self.tree.restart_child, args)

    def op_remove(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        return self._command(self.tree.remove_child, args)

    def _command(self, method: Any, args: dict[str, Any]) -> Any:
        child_id = _arg(args, "id", str)
        self._apply(method(child_id, time.monotonic()))
        node = self.tree.nodes.get(child_id)
        return {"id": child_id, "state": node.state if node else "removed"}

    def op_add(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        """Add a child to a dynamic supervisor, from its template (nothing is imported)."""
        sup_id = _arg(args, "supervisor", str)
        child_id = _arg(args, "id", str)
        from otpd.config import ID_RE

        if not ID_RE.match(child_id):
            raise OtpdError("bad_request", f"{child_id!r} is not a valid id")
        if self.tree.nodes[self.tree.root_id].state not in core.UP_STATES:
            raise OtpdError("shutting_down", "the daemon is stopping: nothing is added")
        node = self.tree.get(sup_id)
        template = node.sup.template if node.is_supervisor else None
        if template is None:
            raise OtpdError("bad_request", f"{sup_id!r} is not a dynamic supervisor with a template")
        extra = _arg(args, "args", dict, {})
        # A switched template picks its class now, by this child's id: a child keeps the
        # version it started with through its restarts (running workflows finish on it).
        spec = flags.effective_agent(dataclasses.replace(template, id=child_id, args={**template.args, **extra}),
                                     self.flags)
        from otpd.config import agent_args_error, agent_class

        if child_id not in self.tree.nodes:  # (a taken id is already_exists, below)
            locked = sorted(set(extra) & set(agent_class(spec.agent).config_args))
            if locked:  # what only the config may choose (which code a workflow runs)
                raise OtpdError("bad_request", f"{child_id}: args {', '.join(locked)} of {spec.agent} are set by "
                                "the config only, not by an add", {"id": child_id, "refused_args": locked})
            problem = agent_args_error(spec.agent, spec.args)
            if problem is not None:  # refused here, not found by init at every restart until the intensity trips
                raise OtpdError("bad_request", f"{child_id}: bad args for {spec.agent}: {problem}",
                                {"id": child_id, "refused_args": True})
        self._apply(self.tree.add_child(sup_id, spec, time.monotonic()))
        return {"id": child_id, "supervisor": sup_id}

    def op_reload(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        return self._reload("the control socket")

    def _reload(self, source: str) -> dict[str, Any]:
        """Re-read the config file and move the running tree to it.

        A config that does not validate is refused whole: the running tree is left
        exactly as it was.  Settings that cannot change under a running daemon
        (paths, the store) are reported in ``not_applied``; they take effect at the
        next start.  An agent module whose file changed is imported anew (see
        ``otpd.agent.code``) and its agents restart; new code that does not import is
        refused like a bad config.
        """
        from otpd.config import ConfigError, load

        self.log("info", f"reload requested by {source}")
        if self.tree.nodes[self.tree.root_id].state not in core.UP_STATES:
            raise OtpdError("shutting_down", "the daemon is stopping: nothing is reloaded")
        self.notify.reloading()
        try:
            try:
                new = load(self.config.path)
            except ConfigError as err:
                raise OtpdError("config_invalid", "the new config is refused, nothing changed:\n" + err.message,
                                {"errors": err.errors}) from None
            self.tree.check_reload(new.root)  # before anything is imported or changed
            stale = self._reimport(new)
            old = self.config
            not_applied = [f"daemon.{k}" for k in ("state_dir", "runtime_dir", "socket", "socket_group")
                           if getattr(old.daemon, k) != getattr(new.daemon, k)]
            not_applied += [f"store.{k}" for k in ("durability", "map_size_mb", "map_size_max_mb", "sync_interval_ms",
                                                   "sync_helper")
                            if getattr(old.store, k) != getattr(new.store, k)]
            self.config = dataclasses.replace(new, daemon=dataclasses.replace(
                old.daemon, log_level=new.daemon.log_level), store=old.store)
            self._set_flags(self._flags(self.config))
            for child_id, spare in list(self.spares.items()):
                if spare.spec.agent.partition(":")[0] in stale:
                    self._drop_spare(child_id)  # booted with the old code
            actions, summary = self.tree.reload(flags.resolve(new.root, self.flags), time.monotonic(),
                                                frozenset(stale), _config_args)
            summary["reimported"] = stale
            self.log_level = LEVELS[new.daemon.log_level]
            self._set_sweep()
            self._apply(actions)
        finally:
            self.ready_sent = False  # READY=1 again once the new tree is up (sd_notify's reload protocol)
            self.status_dirty = True
        for key in not_applied:
            self.log("warning", f"reload: {key} changed; it takes effect when otpd restarts")
        return {**summary, "not_applied": not_applied}

    def _reimport(self, config: Config) -> list[str]:
        """Import afresh the agent modules of ``config`` whose files changed, and those that
        hold something of them; their names.  All or nothing: a module that does not import
        or check refuses the reload."""
        from otpd.config import agent_args_error, check_agent_class

        specs = config.agent_specs()
        refs = [ref for spec in specs for ref in (spec.agent, spec.agent_next) if ref]
        stale = code.changed(refs)
        if not stale:
            return []

        def check(names: list[str]) -> None:
            for ref in refs:
                if ref.partition(":")[0] in names:
                    try:
                        check_agent_class(ref)
                    except Exception as exc:
                        raise code.ReimportFailed(str(exc)) from None
            for spec in specs:  # the args, by the new code's checks
                for agent in (spec.agent, spec.agent_next):
                    if not agent or agent.partition(":")[0] not in names:
                        continue
                    problem = agent_args_error(agent, spec.args, template=spec.id == "*")
                    if problem is not None:
                        raise code.ReimportFailed(f"{spec.id}.args: {problem} (checked by {agent})")

        try:
            names = code.reimport(stale, check, {ref.partition(":")[0] for ref in refs})
        except code.ReimportFailed as err:
            raise OtpdError("config_invalid", f"the new code is refused, nothing changed:\n{err}",
                            {"modules": stale}) from None
        self.log("info", f"reload: imported anew {', '.join(names)}")
        return names

    # -- feature flags ------------------------------------------------------------

    def _stored_flags(self) -> dict[str, float]:
        """Flags set at run time survive restarts: they live in the store's meta records.
        (The store is opened and closed here, never held across a fork.)"""
        settings = self.config.store_settings()
        store = Store(settings.path, settings.map_size_mb, settings.map_size_max_mb, "process")
        try:
            stored = store.get_meta("flags") or {}
        finally:
            store.close()
        return {str(k): float(v) for k, v in stored.items()}

    def _flags(self, config: Config) -> dict[str, float]:
        return {**config.features, **{k: v for k, v in self.flag_overrides.items() if k in config.features}}

    def _set_flags(self, new: dict[str, float]) -> None:
        """Tell every agent, and announce each change."""
        changed = {k: v for k, v in new.items() if self.flags.get(k) != v}
        self.flags = new
        if not changed:
            return
        for child in self.children.values():
            self._send_child(child, {"t": "flags", "flags": new})
        for name, value in changed.items():
            self._on_event(core.Emit("flag_changed", name, {"value": flags.show(value)}))

    def op_flags_list(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        return {"flags": {name: {"value": flags.show(value),
                                 "source": "set" if name in self.flag_overrides else "config",
                                 "config": flags.show(self.config.features[name])}
                          for name, value in sorted(self.flags.items())}}

    def op_flags_set(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        """Set a flag (persisted), or ``default`` to go back to the config's value. Agents
        under a version switch whose class changes are restarted on it."""
        name = _arg(args, "name", str)
        if self.tree.nodes[self.tree.root_id].state not in core.UP_STATES:
            raise OtpdError("shutting_down", "the daemon is stopping: flags stay as they are")
        if name not in self.config.features:
            raise OtpdError("not_found", f"no feature {name!r} in [features]", {"known": sorted(self.flags)})
        value = _arg(args, "value", (str, int, float))
        overrides = dict(self.flag_overrides)
        if value == "default":
            overrides.pop(name, None)
        else:
            try:
                overrides[name] = flags.parse(value)
            except ValueError as exc:
                raise OtpdError("bad_request", str(exc)) from None
        settings = self.config.store_settings()
        store = Store(settings.path, settings.map_size_mb, settings.map_size_max_mb, "process")
        try:
            store.put_meta("flags", overrides)
            store.sync()
        finally:
            store.close()
        self.flag_overrides = overrides
        self._set_flags(self._flags(self.config))
        actions, summary = self.tree.reload(flags.resolve(self.config.root, self.flags), time.monotonic())
        self._apply(actions)
        return {"name": name, "value": flags.show(self.flags[name]), "restarted": summary["restarted"]}

    def op_events(self, conn: Connection, req_id: Any, args: dict[str, Any]) -> Any:
        """The recent events (``last``, at most EVENT_HISTORY); with ``follow`` the connection
        also becomes a stream of every event from now on."""
        last = _arg(args, "last", int, EVENT_HISTORY)
        recent = list(self.history)[-last:] if last > 0 else []
        if _arg(args, "follow", bool, True):
            self.subscribers.add(conn)
            if type(conn) is Connection:  # (an agent's channel subscribes too)
                conn.subscribed = True
            return {"subscribed": True, "events": recent}
        return {"subscribed": False, "events": recent}

    def _forget_connection(self, conn: Connection) -> None:
        self.subscribers.discard(conn)
        for waiters in self.waiters.values():
            waiters[:] = [w for w in waiters if w.conn is not conn]


def _is_task_agent(ref: str) -> bool:
    from otpd.agents.task import TaskAgent
    from otpd.config import agent_class

    try:
        cls = agent_class(ref)
    except Exception:  # not importable now: let the call go, and the agent answer for itself
        return True
    return isinstance(cls, type) and issubclass(cls, TaskAgent)


def _config_args(ref: str) -> tuple[str, ...]:
    """The args of ``ref``'s class that only the config sets (``Agent.config_args``)."""
    from otpd.config import agent_class

    try:
        return tuple(getattr(agent_class(ref), "config_args", ()))
    except Exception:  # not importable now: its child's next start says so; nothing follows
        return ()


def _silent(sock: socket.socket) -> bool:
    """A spare sends nothing before its go: anything on its channel (EOF, a reset) says it is
    dead or dying, killed with its agent perhaps (``pkill -f kv`` matches both), its exit
    not reaped yet.  Promoted, its death would count as the agent failing to start."""
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)
    return not poll.poll(0)


def _record_only(_signum: int, _frame: Any) -> None:
    """Signal handler: the wake-up fd already recorded the signal; the loop acts."""


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _arg(args: dict[str, Any], name: str, types: Any, default: Any = ...) -> Any:
    if name not in args or args[name] is None:
        if default is ...:
            raise OtpdError("bad_request", f"missing argument {name!r}")
        return default
    value = args[name]
    if not isinstance(value, types) or (isinstance(value, bool) and types is not bool):
        raise OtpdError("bad_request", f"argument {name!r} has the wrong type ({type(value).__name__})")
    return value


def _stream_is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is journald's (JOURNAL_STREAM names its device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)
